"""Digests of the files a dataset reads, each computed once and remembered by (path, size, mtime_ns).

The reference log-probs of a record depend on its image's bytes as much as on its text, so a run's
fingerprint covers both: the data file (`data.sha256`) and, for records that name image files, the
bytes of every one of them (`data.images`, `image_files_digest`). Re-saving an image in place (another
size, a fixed orientation, a flip) changes `data.images` and the cached reference is stale.

Reading every image at every start would cost minutes at 100k images, so each file's SHA-256 is kept in
a small store under the data cache folder (`data_cache_dir`) with the size and modification time it was
read at: a later start stats each file (about 2 µs each) and reads again only those whose size or
mtime changed. A file rewritten with other bytes gets a new mtime, so it is read again; a file only
touched is read again and found unchanged. (A rewrite that keeps both its size and its mtime to the
nanosecond goes unseen, as it does for make and rsync.)

The data cache folder: `data.cache_dir`, else $MDPO_DATA_CACHE, else $XDG_CACHE_HOME/mdpo/data
(~/.cache/mdpo/data). It holds facts about dataset files, not about a run: a new run (its own
output_dir) and `mdpo-data check` share them. It is not beside the data, which may be read-only or shared
by users of other processors, and whose folder (a `save_to_disk` table) should not gain files. Where it
cannot be written, digests are computed and used, not kept (one warning).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

logger = logging.getLogger("mdpo.data")

CACHE_ENV = "MDPO_DATA_CACHE"  # a folder, or "off": keep nothing
_BLOCK = 1 << 20  # bytes read per hashing step
_warned: set[str] = set()


def data_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder digests and validation results are kept in (see the module docstring); None: keep nothing."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV)
    if cache_dir is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache_dir = os.path.join(base, "mdpo", "data")
    if str(cache_dir).strip().lower() in ("", "off", "none"):
        return None
    return Path(cache_dir)


def warn_unwritable(folder: Path, err: OSError) -> None:
    """One warning per folder: the cache is not kept there, the run goes on."""
    if str(folder) not in _warned:
        _warned.add(str(folder))
        logger.warning("data cache %s cannot be written (%s); digests and validation results are recomputed at "
                       "every start (set data.cache_dir or %s to a writable folder)", folder, err, CACHE_ENV)


def file_sha256(path: str | os.PathLike) -> bytes:
    """SHA-256 of a file's bytes (32 bytes), read in 1 MiB blocks (about 1.7 GB/s on one core with SHA-NI)."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            h.update(block)
    return h.digest()


@dataclass
class ImagesDigest:
    """What `image_files_digest` found: the combined digest, and the files read again whose bytes differ
    from the ones remembered (to name them)."""

    value: str  # "N files, sha256 HEX": the run fingerprint's data.images
    n_files: int
    changed: list[str] = field(default_factory=list)  # files whose bytes changed since they were last digested
    read: int = 0  # files read (not found in the store, or with another size or mtime)


def image_files_digest(paths: Iterable[str], cache_dir: str | os.PathLike | None = None) -> ImagesDigest | None:
    """The combined digest of the image files `paths` name (duplicates count once); None for no path.

    Combined: SHA-256 over the count and every file's SHA-256 in the order of the sorted paths. The
    record → path mapping is in the data file (data.sha256) and data.image_root, so the path strings
    themselves are left out: moving the image folder with its dataset (data.image_root unchanged)
    keeps the digest; swapping two files' bytes changes it. A file that cannot be stat-ed or read
    counts as "missing" (the record that names it is refused elsewhere, naming it).

    Per-file digests are remembered in `<cache>/image-digests/<key>.npz` (key: SHA-256 of the sorted
    path list; arrays of size, mtime_ns and digest per path: 48 bytes a file).
    """
    unique = sorted(set(str(p) for p in paths))
    if not unique:
        return None
    n = len(unique)
    sizes, mtimes = np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    for i, path in enumerate(unique):
        try:
            st = os.stat(path)
        except OSError:
            continue
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    folder = data_cache_dir(cache_dir)
    store = None
    if folder is not None:
        key = hashlib.sha256("\0".join(unique).encode("utf-8", "surrogateescape")).hexdigest()
        store = folder / "image-digests" / f"{key}.npz"
    digests = np.zeros((n, 32), dtype=np.uint8)
    known = np.zeros(n, dtype=bool)
    old = None
    if store is not None and store.is_file():
        try:
            with np.load(store) as blob:
                old = {k: blob[k] for k in ("size", "mtime_ns", "digest")}
            if len(old["size"]) == n:
                known = (old["size"] == sizes) & (old["mtime_ns"] == mtimes) & (sizes >= 0)
                digests[known] = old["digest"][known]
            else:
                old = None
        except (OSError, ValueError, KeyError):  # a damaged store is recomputed
            old = None
    changed, read = [], 0
    for i in np.flatnonzero(~known):
        if sizes[i] < 0:
            continue  # missing: all-zero digest
        try:
            digest = file_sha256(unique[i])
        except OSError:
            sizes[i] = -1
            continue
        read += 1
        digests[i] = np.frombuffer(digest, dtype=np.uint8)
        if old is not None and old["size"][i] >= 0 and bytes(old["digest"][i]) != digest:
            changed.append(unique[i])
    if store is not None and read:
        _save_store(store, sizes, mtimes, digests)
    h = hashlib.sha256(f"{n}:".encode())
    h.update(digests.tobytes())
    missing = int((sizes < 0).sum())
    value = f"{n} files, sha256 {h.hexdigest()[:32]}" + (f" ({missing} missing)" if missing else "")
    return ImagesDigest(value=value, n_files=n, changed=changed, read=read)


def _save_store(store: Path, sizes: np.ndarray, mtimes: np.ndarray, digests: np.ndarray) -> None:
    """Write the store atomically (a temporary file renamed over it: concurrent writers leave one whole file)."""
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f"{store.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, size=sizes, mtime_ns=mtimes, digest=digests)
        os.replace(tmp, store)
    except OSError as err:
        warn_unwritable(store.parent.parent, err)


def record_image_files(records: Sequence) -> list[str]:
    """The image files the records read (embedded images are in the data file itself, not listed)."""
    files = getattr(records, "image_files", None)
    if files is not None:
        return list(files)
    return [r.image_path for r in records if getattr(r, "image_bytes", None) is None]
