"""A dataset's records without holding them: `RecordTable`, a sequence of `PreferenceRecord`s that reads
and parses a record only when it is asked for (when a batch is collated, in DataLoader workers when
data.num_workers > 0).

What it holds per record is an index, not the record: its row (and, for a JSON list or JSONL file, the
byte span of its text), its sample id, and which image file it reads. For a million records that is
about 50 bytes each (`StringArray` keeps strings as one byte buffer and offsets, not as Python objects),
and arrays loaded from the validation cache are memory-mapped, so DataLoader workers forked from the
process share them page for page. A `datasets` table (a save_to_disk folder, a parquet file) stays
memory-mapped by Arrow: an embedded image is copied out of the table when its record is read, and
dropped with the batch.

The records are the ones `parse_record` makes from the same raw rows the eager reader
(`iter_raw_records`, `iter_table_records`) yields, so every field, the sample id included, is what it
was when records were held in a list. A record whose id is no longer the one validated (the file was
rewritten under the run) is refused, naming it: nothing silent.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .records import DataFileError, PreferenceRecord, open_table, parse_record, read_json_span


class StringArray(Sequence[str]):
    """Strings kept as one UTF-8 byte buffer and n + 1 offsets (8 bytes a string besides its text, against
    about 50 bytes of Python object each); item i is decoded when it is read."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data, self.offsets = data, offsets

    @classmethod
    def from_strings(cls, strings: Sequence[str]) -> "StringArray":
        encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)

    @classmethod
    def concat(cls, parts: list["StringArray"], consume: bool = False) -> "StringArray":
        """The strings of `parts`, one after the other. consume: empty the list as each part is copied, so
        that a part is freed once copied (the peak is the result and one part, not twice the result)."""
        data = np.empty(sum(int(p.offsets[-1] - p.offsets[0]) for p in parts), dtype=np.uint8)
        offsets = np.zeros(sum(len(p) for p in parts) + 1, dtype=np.int64)
        byte, count = 0, 0
        queue = parts if consume else list(parts)
        queue.reverse()
        while queue:
            part = queue.pop()
            start, size = int(part.offsets[0]), int(part.offsets[-1] - part.offsets[0])
            data[byte : byte + size] = part.data[start : start + size]
            offsets[count + 1 : count + len(part) + 1] = part.offsets[1:] - start + byte
            byte, count = byte + size, count + len(part)
            del part
        return cls(data, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.data[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]

    def take(self, positions: np.ndarray, block: int = 1 << 12) -> "StringArray":
        """The strings at `positions`, in that order (copied as bytes, block by block: no Python string made;
        the byte indices of a block cost 24 bytes a byte, about 4 MB for 4096 paths of 40 bytes)."""
        positions = np.asarray(positions, dtype=np.int64)
        starts, ends = self.offsets[positions], self.offsets[positions + 1]
        lengths = ends - starts
        offsets = np.zeros(len(positions) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        data = np.empty(int(offsets[-1]), dtype=np.uint8)
        for b in range(0, len(positions), block):  # every byte's source index, for one block of strings at a time
            s, n = starts[b : b + block], lengths[b : b + block]
            within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
            data[offsets[b] : offsets[b] + len(within)] = self.data[np.repeat(s, n) + within]
        return StringArray(data, offsets)


class JsonRecordReader:
    """A JSON list / JSONL file read one record at a time by byte span; the file is opened once per
    process (a DataLoader worker forked from this one opens its own)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handle, self._pid = None, None

    def raw(self, row: int, span: tuple[int, int]) -> Any:
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = open(self.path, "rb"), os.getpid()
        return read_json_span(self._handle, int(span[0]), int(span[1]))

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


class TableRecordReader:
    """A `datasets` table read one row at a time (memory-mapped Arrow; `open_table`). Image cells stay
    {"bytes", "path"} structs, as `iter_table_records` yields them."""

    def __init__(self, path: str | os.PathLike, table=None):
        self.path = Path(path)
        self.table = table if table is not None else open_table(path)
        self._arrow = self.table.with_format("arrow")

    def raw(self, row: int, span=None) -> Any:
        return self._arrow[int(row) : int(row) + 1].to_pylist()[0]

    def __len__(self) -> int:
        return len(self.table)


class RecordTable(Sequence[PreferenceRecord]):
    """The kept records of a dataset, read on demand (see the module docstring).

    reader: `JsonRecordReader` or `TableRecordReader`; index: the `DatasetIndex` validation made (rows,
    ids, spans, image files ...); image_root: what relative image paths are joined to.
    Besides the Sequence protocol: `sample_ids` (all ids, without reading a record), `image_files`
    (the distinct image files read), `image_entries()` (sample id, image path) for `random_image`,
    `shape_counts`, `identical_positions`, `images_digest`.
    """

    def __init__(self, reader, index, image_root: str | os.PathLike):
        self.reader, self.index, self.image_root = reader, index, Path(image_root)

    def __len__(self) -> int:
        return len(self.index.rows)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        k = int(k)
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(f"record {k} of {len(self)}")
        index = self.index
        row = int(index.rows[k])
        raw = self.reader.raw(row, None if index.spans is None else index.spans[k])
        record = parse_record(raw, row, self.image_root, check_images=False)
        if record.sample_id != index.ids[k]:
            raise DataFileError(f"{self.reader.path}: record {row} changed after it was validated (id {index.ids[k]!r} then, "
                                f"{record.sample_id!r} now); the data must not change under a run: start it again")
        return record

    def __iter__(self) -> Iterator[PreferenceRecord]:
        for k in range(len(self)):
            yield self[k]

    @property
    def sample_ids(self) -> Sequence[str]:
        return self.index.ids

    @property
    def image_files(self) -> Sequence[str]:
        return self.index.image_files

    @property
    def shape_counts(self) -> dict[str, int]:
        return dict(self.index.shapes)

    @property
    def identical_positions(self) -> list[int]:
        return list(self.index.identical)

    @property
    def images_digest(self) -> str | None:
        return self.index.images_digest

    @property
    def data_digest(self) -> str:
        return self.index.digest

    def embedded_images(self) -> tuple[int, str | None]:
        """(records whose image is embedded in the data, the first one's sample id)."""
        embedded = np.flatnonzero(np.asarray(self.index.image_of) < 0)
        return len(embedded), (self.index.ids[int(embedded[0])] if len(embedded) else None)

    def image_entries(self) -> list[tuple[str, str]]:
        """(sample id, image file) of every record that reads an image file (for `random_image`)."""
        files, image_of = self.index.image_files, np.asarray(self.index.image_of)
        return [(self.index.ids[k], files[int(image_of[k])]) for k in np.flatnonzero(image_of >= 0)]
