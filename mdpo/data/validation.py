"""Validating a dataset once per version: every record parsed, its image opened, its rows measured against
data.max_length; the result (`DatasetIndex`) kept in the data cache and reused by every later start,
`mdpo-data check` included.

What is checked is what `load_records` always checked, record by record, with the same messages: the
record's shape and fields (`parse_record`), that its image opens (`check_image_file` /
`check_image_bytes`), that its id is not an earlier kept record's, and, with a processor, that its rows
fit (`PreferenceCollator.measure`: the image decoded and run through the processor). That costs a few
milliseconds a record (decoding and the processor), so 100k records cost minutes: it runs once per
dataset version, sharded over the run's processes (`Processes`: each validates its share, rank 0
merges), and is cached.

The cache entry is a folder under `<data cache>/validation/` (`digests.data_cache_dir`) named by a key
of everything the result depends on: the dataset's digest (`digests.dataset_digest`: a file's bytes,
a save_to_disk table's `datasets` fingerprint), the image root, whether images are checked, and with a
processor its `processor_fingerprint`, the transformers version, the family and the row settings
(`DATA_KEYS_OF_ROWS`: max_length, prompt_template, max_pixels, ...). A change of any of them is another
key, so another validation. The image files the records name are not in the key (they are only known
once the data is read): the entry records their combined digest, and a start whose
`image_files_digest` differs (a file re-saved in place) validates again.

An entry holds, per kept record: its row, its byte span (JSON / JSONL), its sample id, its image file,
its lengths (tokens with a processor, else words); and the skipped records with their reasons, the
shapes, the identical pairs. Arrays are .npy files read memory-mapped.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .digests import data_cache_dir, dataset_digest, image_files_digest, warn_unwritable
from .fingerprint import DATA_KEYS_OF_ROWS, processor_fingerprint
from .processes import Processes
from .records import (BadRecordError, DataFileError, SkippedRecord, _Reason, check_image_bytes, check_image_file,
                      iter_json_spans, iter_table_rows, parse_record)
from .table import StringArray

INDEX_VERSION = 1  # bump when what a record's validation decides changes
SHAPES = ("paper", "plain", "trl")
TOKEN_LENGTHS = ("prompt", "protected", "chosen", "rejected")  # PreferenceCollator.measure, per kept record
WORD_LENGTHS = ("question", "chosen", "rejected")  # without a processor: words


@dataclass
class DatasetIndex:
    """What validating a dataset found (see the module docstring); arrays are aligned with the kept records."""

    n_read: int  # records in the data, good and bad
    rows: np.ndarray  # int64 (n,): each kept record's index in the data (row, or record of the file)
    ids: StringArray  # each kept record's sample id
    spans: np.ndarray | None  # int64 (n, 2): each kept record's bytes in a JSON / JSONL file; None for a table
    image_files: StringArray  # the distinct image files of the kept records, sorted
    image_of: np.ndarray  # int32 (n,): index into image_files; -1: an embedded image
    lengths: np.ndarray  # int32 (n, len(length_names))
    length_names: tuple[str, ...]
    skipped: list[SkippedRecord]
    shapes: dict[str, int]
    identical: list[int]  # positions (into the kept records) of pairs with chosen == rejected
    n_images: int  # distinct images of the kept records (files and embedded)
    images_digest: str | None = None  # image_files_digest(image_files).value when validated
    digest: str = ""  # the dataset's digest (digests.dataset_digest) when validated
    key: str = ""
    folder: Path | None = None  # the cache entry it was read from or written to

    ARRAYS = ("rows", "spans", "image_of", "lengths")

    def save(self, folder: Path) -> None:
        """Write the entry atomically: a temporary folder renamed into place (a concurrent writer's whole
        entry, or ours, wins)."""
        tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in self.ARRAYS:
            value = getattr(self, name)
            if value is not None:
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(value))
        for name in ("ids", "image_files"):
            strings = getattr(self, name)
            np.save(tmp / f"{name}.data.npy", strings.data)
            np.save(tmp / f"{name}.offsets.npy", strings.offsets)
        meta = {"version": INDEX_VERSION, "key": self.key, "n_read": self.n_read, "length_names": list(self.length_names),
                "skipped": [list(s) for s in self.skipped], "shapes": self.shapes, "identical": self.identical,
                "n_images": self.n_images, "images_digest": self.images_digest, "digest": self.digest}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process wrote the entry first (rename onto a non-empty folder)
            shutil.rmtree(tmp, ignore_errors=True)
        self.folder = folder

    @classmethod
    def load(cls, folder: Path) -> "DatasetIndex | None":
        """The entry in `folder`, arrays memory-mapped; None when it is missing, of another version or damaged."""
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if meta.get("version") != INDEX_VERSION:
                return None
            arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") if (folder / f"{name}.npy").exists() else None
                      for name in cls.ARRAYS}
            strings = {name: StringArray(np.load(folder / f"{name}.data.npy", mmap_mode="r"),
                                         np.load(folder / f"{name}.offsets.npy", mmap_mode="r"))
                       for name in ("ids", "image_files")}
            index = cls(n_read=int(meta["n_read"]), ids=strings["ids"], image_files=strings["image_files"],
                        length_names=tuple(meta["length_names"]), skipped=[SkippedRecord(*s) for s in meta["skipped"]],
                        shapes=dict(meta["shapes"]), identical=list(meta["identical"]), n_images=int(meta["n_images"]),
                        images_digest=meta["images_digest"], digest=meta["digest"], key=meta["key"], folder=folder, **arrays)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        n = len(index.rows)
        if len(index.ids) != n or len(index.image_of) != n or len(index.lengths) != n or (
                index.spans is not None and len(index.spans) != n):
            return None
        return index


def validation_key(digest: str, image_root: Path, check_images: bool, processor: Any, family: str | None,
                   max_length: int | None, collator_options: dict[str, Any] | None) -> tuple[str, dict]:
    """(hex key, what it hashes) of one validation: see the module docstring."""
    described: dict[str, Any] = {"version": INDEX_VERSION, "data": digest, "image_root": str(image_root.resolve()),
                                 "check_images": bool(check_images)}
    if processor is not None:
        import transformers

        settings = {"max_length": max_length, **(collator_options or {})}
        described.update(processor=processor_fingerprint(processor), transformers=transformers.__version__,
                         family=family, rows={name: settings.get(name) for name in DATA_KEYS_OF_ROWS})
    text = json.dumps(described, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest(), described


# ----------------------------------------------------------------------------------- one process's share
@dataclass
class _Part:
    """What one process found in its share of the records, column by column (compact: a share of a million
    records is tens of MB, not a Python object per field)."""

    bad: list[tuple[int, str | None, str]] = field(default_factory=list)  # (index, id, reason): parse-level
    index: array = field(default_factory=lambda: array("q"))  # the records that parsed, in order
    ids: list = field(default_factory=list)  # StringArray chunks
    too_long: dict[int, str] = field(default_factory=dict)  # index -> reason: does not fit (checked after the id)
    shape: array = field(default_factory=lambda: array("b"))
    identical: array = field(default_factory=lambda: array("b"))
    images: list = field(default_factory=list)  # StringArray chunks: image path, or "<embedded:HASH>"
    embedded: array = field(default_factory=lambda: array("b"))
    spans: array = field(default_factory=lambda: array("q"))  # start, end per record (JSON / JSONL)
    lengths: array = field(default_factory=lambda: array("i"))
    n_read: int = 0
    error: str | None = None  # a DataFileError (or an unexpected one) that ends the load on every process
    _ids: list = field(default_factory=list)
    _images: list = field(default_factory=list)

    def flush(self) -> None:
        """Move the strings collected so far into StringArray chunks."""
        if self._ids:
            self.ids.append(StringArray.from_strings(self._ids))
            self.images.append(StringArray.from_strings(self._images))
            self._ids, self._images = [], []


def _validate_share(path: Path, table, image_root: Path, check_images: bool, measurer, processes: Processes) -> _Part:
    """Validate this process's share of the records: a contiguous range of a table's rows, or every
    world-th record of a JSON / JSONL file (which every process reads whole, to count its records)."""
    part = _Part()
    checked: dict[str, str | None] = {}  # image path -> why it is bad (None: it opens); each file opened once here
    try:
        if table is not None:
            part.n_read = len(table)
            share = processes.range_of(part.n_read)
            for index, row in iter_table_rows(table, share.start, share.stop):
                _validate_one(part, index, row, None, None, image_root, check_images, measurer, checked)
        else:
            rank, world = processes.rank, processes.world
            for index, raw, error, start, end in iter_json_spans(path, wanted=lambda i: i % world == rank):
                part.n_read = index + 1
                if index % world == rank:
                    _validate_one(part, index, raw, error, (start, end), image_root, check_images, measurer, checked)
    except DataFileError as err:
        part.error = str(err)
    part.flush()
    return part


def _validate_one(part: _Part, index: int, raw, parse_error: str | None, span, image_root: Path, check_images: bool,
                  measurer, checked: dict[str, str | None]) -> None:
    sample_id = None
    try:
        if parse_error is not None:
            raise BadRecordError(index, None, parse_error)
        record = parse_record(raw, index, image_root, check_images=False)
        sample_id = record.sample_id
        if check_images:
            if record.image_bytes is not None:
                try:
                    check_image_bytes(record.image_bytes)
                except _Reason as reason:
                    raise BadRecordError(index, sample_id, str(reason)) from None
            else:
                if record.image_path not in checked:
                    try:
                        check_image_file(record.image_path)
                        checked[record.image_path] = None
                    except _Reason as reason:
                        checked[record.image_path] = str(reason)
                if checked[record.image_path] is not None:
                    raise BadRecordError(index, sample_id, checked[record.image_path])
    except BadRecordError as err:
        part.bad.append((err.index, err.sample_id, err.reason))
        return
    if measurer is not None:
        try:
            n = measurer.measure(record)
            lengths = [n[k] for k in TOKEN_LENGTHS]
            need = n["protected"] + (1 if measurer.truncate_response else max(n["chosen"], n["rejected"]))
            if need > measurer.max_length:
                part.too_long[index] = measurer._too_long(n["prompt"], n["protected"], max(n["chosen"], n["rejected"]))
        except BadRecordError as err:
            lengths = [0] * len(TOKEN_LENGTHS)
            part.too_long[index] = err.reason
    else:
        lengths = [len(record.display_question.split()), len(record.chosen.split()), len(record.rejected.split())]
    part.index.append(index)
    part._ids.append(sample_id)
    part.shape.append(SHAPES.index(record.shape))
    part.identical.append(record.chosen.strip() == record.rejected.strip())
    part._images.append(record.image_path)
    part.embedded.append(record.image_bytes is not None)
    part.lengths.extend(lengths)
    if span is not None:
        part.spans.extend(span)
    if len(part._ids) >= 8192:
        part.flush()


_FORKED: dict[str, Any] = {}  # what forked validation workers inherit instead of receiving it pickled


def _validate_in_worker(share: tuple[int, int]) -> _Part:
    """A validation worker (forked): its (rank, world) share of the records, on one torch thread."""
    import torch

    torch.set_num_threads(1)
    return _validate_share(*_FORKED["args"], Processes(*share))


def _validate_here(args: tuple, processes: Processes, workers: int) -> list[_Part]:
    """This process's share, validated here or split over `workers` forked processes (each the share
    of a virtual process world·workers wide: contiguous rows of a table, every k-th record of a file)."""
    if workers <= 1:
        return [_validate_share(*args, processes)]
    import multiprocessing

    shares = [(processes.rank * workers + w, processes.world * workers) for w in range(workers)]
    _FORKED["args"] = args
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(_validate_in_worker, shares)
    finally:
        _FORKED.clear()


# ----------------------------------------------------------------------------------------- merging
def _merge(parts: list[_Part], json_file: bool, length_names: tuple[str, ...]) -> DatasetIndex:
    """One index from the processes' parts: records in data order; a record is skipped for its parse-level
    reason, else for repeating the id of an earlier kept record, else for not fitting — the order in which
    `load_records` always decided.

    Consumes `parts`: each column is dropped from the parts once it is copied out, so the merge holds about
    one copy of a column at a time, not three (for a million JSONL records: about 100 MB at its peak
    beyond the parts, against 300 MB when every column was concatenated, reordered and filtered whole)."""

    def column(name: str, dtype) -> np.ndarray:
        chunks = [np.frombuffer(getattr(p, name), dtype=dtype) for p in parts]
        for p in parts:
            setattr(p, name, array(getattr(p, name).typecode))
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype)

    def strings(name: str) -> StringArray:
        chunks = [chunk for p in parts for chunk in getattr(p, name)]
        for p in parts:
            setattr(p, name, [])
        return StringArray.concat(chunks, consume=True)

    index = column("index", np.int64)
    order = np.argsort(index, kind="stable")  # shares of a JSON file interleave
    index = index[order]
    ids = strings("ids")
    too_long = {i: r for p in parts for i, r in p.too_long.items()}
    # Repeated ids: only the records of an id seen more than once need deciding in order.
    hashes = np.fromiter((hash(ids[int(j)]) for j in order), dtype=np.int64, count=len(order))
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    del hashes
    keep = ~np.isin(index, np.fromiter(too_long, dtype=np.int64, count=len(too_long)))
    bad = {i: (sid, reason) for p in parts for i, sid, reason in p.bad}
    repeated = np.flatnonzero(counts[inverse] > 1)
    del inverse, counts
    first: dict[str, int] = {}
    for pos in repeated:  # in data order
        sid, i = ids[int(order[pos])], int(index[pos])
        if sid in first:
            keep[pos] = False
            bad[i] = (sid, f"duplicate id (first used by record {first[sid]})")
        elif i not in too_long:
            first[sid] = i
    for pos in np.flatnonzero(~keep):
        i = int(index[pos])
        if i in too_long and i not in bad:
            bad[i] = (ids[int(order[pos])], too_long[i])
    rows = index[keep]
    del index
    kept = order[keep]  # positions (in the parts' order) of the kept records, in data order
    del order
    ids = ids.take(kept)
    width = len(length_names)
    lengths = column("lengths", np.int32).reshape(-1, width)[kept]
    spans = column("spans", np.int64).reshape(-1, 2)[kept] if json_file else None
    embedded = column("embedded", np.int8)[kept].astype(bool)
    image_files, image_of, n_images = _image_numbers(strings("images"), kept, embedded)
    shape_codes = column("shape", np.int8)[kept]
    return DatasetIndex(
        n_read=max((p.n_read for p in parts), default=0),
        rows=rows, ids=ids, spans=spans, image_files=image_files, image_of=image_of, lengths=lengths,
        length_names=length_names, skipped=[SkippedRecord(i, *bad[i]) for i in sorted(bad)],
        shapes={SHAPES[c]: int((shape_codes == c).sum()) for c in range(len(SHAPES)) if (shape_codes == c).any()},
        identical=[int(k) for k in np.flatnonzero(column("identical", np.int8)[kept])],
        n_images=n_images,
    )


def _image_numbers(images: StringArray, kept: np.ndarray, embedded: np.ndarray) -> tuple[StringArray, np.ndarray, int]:
    """(the distinct image files of the kept records, sorted; each kept record's index into them, -1 for an
    embedded image; distinct images, files and embedded) from every parsed record's image string.

    Without a Python string per record (a million records, a million files: a dict of paths would cost
    about 150 MB): the paths are grouped by their 64-bit hash, the groups checked byte for byte against
    their first path (a hash collision falls back to a dict), and the distinct paths sorted as
    fixed-width byte rows (UTF-8 byte order is code point order, as `sorted` of the strings)."""
    hashes = np.fromiter((hash(images[int(k)]) for k in kept), dtype=np.int64, count=len(kept))
    n_embedded = len(np.unique(hashes[embedded]))
    positions = kept[~embedded]  # records that read an image file
    _, first, group = np.unique(hashes[~embedded], return_index=True, return_inverse=True)
    del hashes
    distinct = images.take(positions[first])
    for b in range(0, len(positions), 1 << 16):  # every path equals its group's first path
        mine, theirs = images.take(positions[b : b + (1 << 16)]), distinct.take(group[b : b + (1 << 16)])
        if not (np.array_equal(mine.offsets, theirs.offsets) and np.array_equal(mine.data, theirs.data)):
            codes: dict[str, int] = {}  # a hash collision (about 1e-8 at a million paths): group by the strings
            group = np.array([codes.setdefault(images[int(k)], len(codes)) for k in positions], dtype=np.int64)
            distinct = StringArray.from_strings(list(codes))
            break
    del images  # every record's path (tens of MB at a million records): no longer needed, freed before sorting
    lengths = np.diff(distinct.offsets)
    width = max(int(lengths.max()), 1) if len(lengths) else 1
    rows = np.zeros((len(distinct), width), dtype=np.uint8)  # each path's bytes, zero-padded (paths hold no NUL)
    for b in range(0, len(distinct), 1 << 12):  # a block of paths at a time: byte indices cost 24 bytes a byte
        n = lengths[b : b + (1 << 12)]
        row_of = np.repeat(np.arange(b, b + len(n)), n)
        start, end = distinct.offsets[b], distinct.offsets[b + len(n)]
        rows[row_of, np.arange(start, end) - np.repeat(distinct.offsets[b : b + len(n)], n)] = distinct.data[start:end]
    rank = np.argsort(rows.view(f"S{width}").ravel(), kind="stable")
    del rows
    place = np.empty(len(rank), dtype=np.int32)  # group -> position in the sorted files
    place[rank] = np.arange(len(rank), dtype=np.int32)
    image_of = np.full(len(kept), -1, dtype=np.int32)
    image_of[~embedded] = place[group]
    return distinct.take(rank), image_of, len(distinct) + n_embedded


# ------------------------------------------------------------------------------------------- entry point
def validated_index(path: Path, image_root: Path, *, check_images: bool = True, processor: Any = None,
                    max_length: int | None = None, family: str | None = None, collator_options: dict | None = None,
                    cache_dir: str | os.PathLike | None = None, processes: Processes | None = None,
                    log: Callable[[str], None] | None = None, table=None, workers: int = 0) -> DatasetIndex:
    """The `DatasetIndex` of the dataset at `path`: from the cache when an entry of the same key holds it
    and its image files are unchanged, else validated (sharded over `processes`) and cached.

    processor / max_length / family / collator_options: measure every record as the collator will
    tokenise it (with max_length: refuse those that cannot fit; without it, lengths only). table: the
    dataset's `datasets.Dataset` when it is a table (opened by the caller, on every process).
    log: where the one-line report of what happened goes (the main process calls it).
    workers: validate this process's share in that many forked processes (0 or 1: here). Validation
    decodes every image and runs the processor on it (milliseconds a record): on a machine with cores to
    spare a cold start is about that many times faster; the result does not depend on it.
    """
    processes = processes or Processes()
    log = log or (lambda line: None)
    folder = data_cache_dir(cache_dir)
    measurer = None
    if processor is not None:  # measures rows as training will collate them; its family is the resolved one
        from .collate import PreferenceCollator

        measurer = PreferenceCollator(processor, objective="dpo", max_length=max_length if max_length is not None else 10**9,
                                      family=family, **(collator_options or {}))
    decision, found = None, None
    if processes.is_main:  # rank 0 decides: a cached entry, or a new validation
        try:
            digest = dataset_digest(path, cache_dir)
            key, _ = validation_key(digest, image_root, check_images, processor, measurer and measurer.family, max_length,
                                    collator_options)
            entry = folder / "validation" / f"{path.name[:40]}-{key[:24]}" if folder is not None else None
            found = DatasetIndex.load(entry) if entry is not None and entry.is_dir() else None
            if found is not None and found.image_files:
                now = image_files_digest(found.image_files, cache_dir, sorted_unique=True)
                if now.value != found.images_digest:
                    named = ", ".join(now.changed[:3]) + (", …" if len(now.changed) > 3 else "")
                    log(f"data: {path}: image files changed since it was validated{f' ({named})' if named else ''}; "
                        "validating it again")
                    found = None
            decision = ("hit" if found is not None else "miss", key, str(entry) if entry is not None else None)
        except Exception as err:  # noqa: BLE001 — told to the other processes, raised here with its traceback
            processes.broadcast(("error", f"{type(err).__name__}: {err}", None))
            raise
    kind, key, entry = processes.broadcast(decision)
    if kind == "error":
        raise RuntimeError(f"reading the validation cache of {path} failed on process 0: {key}")
    if kind == "hit":
        index = found if processes.is_main else DatasetIndex.load(Path(entry))
        if processes.all_true(index is not None):
            if processes.is_main:
                log(f"data: {path}: validation reused ({index.n_read} records, {len(index.rows)} kept, "
                    f"{len(index.skipped)} skipped; {entry})")
            return index
        index = processes.broadcast(found)  # a process that cannot read the cache folder gets rank 0's copy
        return index
    # A new validation: every process its share, merged on rank 0.
    start = time.perf_counter()
    mine = _validate_here((path, table, image_root, check_images, measurer), processes, workers)
    gathered = processes.gather(mine)
    result = None
    if processes.is_main:
        parts = [part for rank_parts in gathered for part in rank_parts]
        del gathered
        errors = [p.error for p in parts if p.error is not None]
        if errors:  # the file cannot be read as records: every process raises the same DataFileError
            result = ("data", errors[0])
        else:
            try:
                index = _merge(parts, table is None, TOKEN_LENGTHS if measurer is not None else WORD_LENGTHS)
                del parts
                if index.image_files:
                    index.images_digest = image_files_digest(index.image_files, cache_dir, sorted_unique=True).value
                index.key, index.digest = key, digest
                result = ("ok", index)
            except Exception as err:  # noqa: BLE001 — a bug: told to the other processes, raised here with its traceback
                processes.broadcast(("bug", f"{type(err).__name__}: {err}"))
                raise
    kind, index = processes.broadcast(result)
    if kind == "data":
        raise DataFileError(index)
    if kind == "bug":
        raise RuntimeError(f"validating {path} failed on process 0: {index}")
    if processes.is_main:
        where = "not kept (no data cache folder)"
        if entry is not None:
            try:
                index.save(Path(entry))
                where = f"kept in {entry}"
            except OSError as err:
                warn_unwritable(folder, err)
                where = "not kept (the data cache folder cannot be written)"
        over = f"{processes.world} process(es)" + (f" × {workers} workers" if workers > 1 else "")
        log(f"data: {path}: {index.n_read} records validated in {time.perf_counter() - start:.1f} s over {over} "
            f"({len(index.rows)} kept, {len(index.skipped)} skipped); {where}")
    return index
