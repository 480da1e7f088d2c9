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
import json
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


def cached_file_sha256(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """SHA-256 (hex) of one file's bytes, remembered by (resolved path, size, mtime_ns) in
    `<cache>/file-digests/` (one small JSON file per data file): read once, then only stat-ed."""
    path = Path(path).resolve()
    st = os.stat(path)
    folder = data_cache_dir(cache_dir)
    entry = None
    if folder is not None:
        entry = folder / "file-digests" / f"{hashlib.sha256(str(path).encode('utf-8', 'surrogateescape')).hexdigest()[:32]}.json"
        try:
            known = json.loads(entry.read_text())
            if known.get("path") == str(path) and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
                return str(known["sha256"])
        except (OSError, ValueError, AttributeError, KeyError):
            pass
    digest = file_sha256(path).hex()
    if entry is not None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f"{entry.stem}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}))
            os.replace(tmp, entry)
        except OSError as err:
            warn_unwritable(folder, err)
    return digest


def datasets_fingerprint(folder: str | os.PathLike) -> str | None:
    """A `save_to_disk` folder's identity without reading its rows: `datasets`' own fingerprint(s) from
    state.json (every split's, for a DatasetDict) with every file's relative name and size, hashed
    (SHA-256, hex); None when a state.json has no fingerprint (then the bytes are digested instead).

    Why it is sound there: `datasets` gives a table made from data a fingerprint hashed from that data
    (`generate_fingerprint`) and a transformed table (map, filter, select, cast, concatenate ...) a new
    one hashed from the previous fingerprint and the transform with its arguments
    (`update_fingerprint`; a transform it cannot hash gets a random one), and save_to_disk writes it to
    state.json: a table with other rows has another fingerprint. It is also what `datasets` itself trusts
    to reuse its cache files. Copying the folder keeps it (nothing is reread after a copy, unlike a
    digest keyed by mtime). Where it is not sound, and not used: a parquet file (no fingerprint of its
    own; `datasets` names it by path and mtime, so `cached_file_sha256`); arrow files edited or replaced
    by other tools than `datasets` (the sizes catch a replacement of another length, not an in-place
    edit of the same length); a user-given `new_fingerprint`, or a `from_generator` table whose generator
    read other data under the same code and arguments (`datasets` would reuse its cache there too).
    """
    folder = Path(folder)
    states = sorted(folder.rglob("state.json"))
    if not states:
        return None
    h = hashlib.sha256(b"datasets-fingerprint\0")
    for state in states:
        try:
            fingerprint = json.loads(state.read_text()).get("_fingerprint")
        except (OSError, ValueError, AttributeError):
            return None
        if not fingerprint:
            return None
        h.update(f"{state.parent.relative_to(folder).as_posix()}:{fingerprint}\0".encode())
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{file.relative_to(folder).as_posix()}:{file.stat().st_size}\0".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def dataset_digest(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """The run fingerprint's `data.sha256` of a dataset (hex SHA-256).

    A JSON / JSONL / parquet file: SHA-256 of its bytes (`cached_file_sha256`: read once per size and
    mtime). A `datasets` save_to_disk folder: `datasets_fingerprint` (no row read), else, for a folder
    without one, SHA-256 over every file's relative name and bytes in sorted order (each file's bytes
    digested once per size and mtime), as before.
    """
    path = Path(path)
    if not path.is_dir():
        return cached_file_sha256(path, cache_dir)
    fingerprint = datasets_fingerprint(path)
    if fingerprint is not None:
        return fingerprint
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
        h.update(bytes.fromhex(cached_file_sha256(file, cache_dir)))
    return h.hexdigest()


@dataclass
class ImagesDigest:
    """What `image_files_digest` found: the combined digest, and the files read again whose bytes differ
    from the ones remembered (to name them)."""

    value: str  # "N files, sha256 HEX": the run fingerprint's data.images
    n_files: int
    changed: list[str] = field(default_factory=list)  # files whose bytes changed since they were last digested
    read: int = 0  # files read (not found in the store, or with another size or mtime)


def image_files_digest(paths: Iterable[str], cache_dir: str | os.PathLike | None = None,
                       sorted_unique: bool = False) -> ImagesDigest | None:
    """The combined digest of the image files `paths` name (duplicates count once); None for no path.

    Combined: SHA-256 over the count and every file's SHA-256 in the order of the sorted paths. The
    record → path mapping is in the data file (data.sha256) and data.image_root, so the path strings
    themselves are left out: moving the image folder with its dataset (data.image_root unchanged)
    keeps the digest; swapping two files' bytes changes it. A file that cannot be stat-ed or read
    counts as "missing" (the record that names it is refused elsewhere, naming it).

    Per-file digests are remembered in `<cache>/image-digests/<key>.npz` (key: SHA-256 of the sorted
    path list; arrays of size, mtime_ns and digest per path: 48 bytes a file). sorted_unique: `paths`
    is already sorted without repeats (e.g. a `StringArray` of a validated index): it is read one string
    at a time and never held as a Python list.
    """
    unique = paths if sorted_unique else sorted(set(str(p) for p in paths))
    n = len(unique)
    if not n:
        return None
    sizes, mtimes = np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    key = hashlib.sha256()
    for i, path in enumerate(unique):
        key.update(path.encode("utf-8", "surrogateescape") + (b"\0" if i < n - 1 else b""))
        try:
            st = os.stat(path)
        except OSError:
            continue
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    folder = data_cache_dir(cache_dir)
    store = folder / "image-digests" / f"{key.hexdigest()}.npz" if folder is not None else None
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


def records_images_digest(records: Sequence, cache_dir: str | os.PathLike | None = None) -> str | None:
    """The run fingerprint's `data.images` of a record set: what a `RecordTable` found when it was read
    (validation checks the files at every start), else `image_files_digest` of their image files."""
    if hasattr(records, "images_digest"):
        return records.images_digest
    found = image_files_digest(record_image_files(records), cache_dir)
    return found.value if found is not None else None


def dataset_identity(records: Sequence, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> dict:
    """What a run trained on, for its checkpoints: the data's digest, its image files' digest and the number
    of records kept. A resume compares it with its own (`mdpo.checkpoints.check_same_data`)."""
    digest = getattr(records, "data_digest", None) or dataset_digest(path, cache_dir)
    return {"data.sha256": digest, "data.images": records_images_digest(records, cache_dir), "records": len(records)}
