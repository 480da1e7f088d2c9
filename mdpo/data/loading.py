"""Reading a whole dataset: every record parsed, checked and, with a processor, measured against
`data.max_length` the way the collator will tokenise it (`load_records`), once per dataset version.

The records come back as a `RecordTable`: an index of the kept records (rows, byte spans, ids, image
files) that reads a record when it is asked for, so a table of a million pairs costs tens of MB, not
its images' bytes, in every process. What validation found is cached (`mdpo.data.validation`), so a
later start only checks the data and its image files are unchanged.

Kept apart from `records` (one record's shape and parsing) because measuring needs the collator, which
itself builds on `records`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

from .processes import Processes
from .records import ON_BAD_RECORD, BadRecordError, DataFileError, LoadResult, is_table, open_table
from .table import JsonRecordReader, RecordTable, TableRecordReader
from .validation import validated_index

logger = logging.getLogger("mdpo.data.records")


def load_records(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    on_bad_record: str = "error",
    processor: Any = None,
    max_length: int | None = None,
    *,
    family: str | None = None,
    check_images: bool = True,
    collator_options: dict[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    processes: Processes | None = None,
    log: Callable[[str], None] | None = None,
    workers: int = 0,
) -> LoadResult:
    """Read and validate every record of a JSON list / JSONL file or a `datasets` table.

    path: the dataset file (JSON / JSONL), or a `datasets` `save_to_disk` folder or `.parquet` file.
    image_root: folder the image paths are relative to (default: the file's folder; a dataset folder itself).
    on_bad_record: "error" raises BadRecordError for the first bad record; "skip" lists every bad one in
        `LoadResult.skipped` (index, sample_id, reason) and goes on. Nothing is dropped silently.
    processor, max_length: when both are given, every record is also tokenised as the collator would
        (image loaded, image tokens counted) and one that does not fit in `max_length` tokens even
        after cutting all prompt text is bad. `family` as for PreferenceCollator; `collator_options`
        are the other PreferenceCollator arguments that change the tokens (prompt_template,
        system_prompt, max_pixels, min_pixels, truncate_response): give the run's own, so that the
        check measures what training will see. A processor without max_length measures only
        (`LoadResult.lengths`, for `mdpo-data check`).
    check_images: open every image and verify it (set False to trust the files and load faster).
    cache_dir: the data cache folder (`digests.data_cache_dir`: data.cache_dir, $MDPO_DATA_CACHE,
        ~/.cache/mdpo/data): what validation found is kept there and reused while the data, its image
        files and the settings above are unchanged.
    processes: the processes validation is shared over (`Processes.current()`: the torch.distributed
        group; every process of it must then call load_records); default this process alone.
    log: where the one-line report of the validation (reused, or run in N s) goes (main process only).
    workers: validate this process's share in that many forked processes (training: data.num_workers).
    returns: LoadResult(records: a RecordTable, skipped, path, num_read, lengths).
    """
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"on_bad_record={on_bad_record!r} must be one of {ON_BAD_RECORD}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset file not found: {path}")
    table = is_table(path)
    if not table and not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    root = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
    processes = processes or Processes()
    reader = TableRecordReader(path, open_table(path)) if table else JsonRecordReader(path)
    index = validated_index(path, root, check_images=check_images, processor=processor,
                            max_length=max_length if processor is not None else None, family=family,
                            collator_options=collator_options if processor is not None else None, cache_dir=cache_dir,
                            processes=processes, log=log, table=reader.table if table else None, workers=workers)
    if index.n_read == 0:
        raise DataFileError(f"{path}: holds no records (an empty file, an empty list or only blank lines)")
    if index.skipped:
        if on_bad_record == "error":
            first = index.skipped[0]
            raise BadRecordError(first.index, first.sample_id, first.reason, str(path))
        if processes.is_main:
            logger.warning("%s: skipped %d of %d records (on_bad_record='skip')", path, len(index.skipped), index.n_read)
    records = RecordTable(reader, index, root)
    return LoadResult(records=records, skipped=list(index.skipped), path=str(path), num_read=index.n_read,
                      lengths={name: index.lengths[:, k] for k, name in enumerate(index.length_names)})
