"""Reading a whole dataset: every record parsed, checked and, with a processor, measured against
`data.max_length` the way the collator will tokenise it (`load_records`).

Kept apart from `records` (one record's shape and parsing) because measuring needs the collator, which
itself builds on `records`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .collate import PreferenceCollator
from .records import (ON_BAD_RECORD, BadRecordError, DataFileError, LoadResult, PreferenceRecord, SkippedRecord, is_table,
                      iter_raw_records, iter_table_records, parse_record)

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
) -> LoadResult:
    """Read and validate every record of a JSON list / JSONL file or a `datasets` table.

    path: the dataset file (JSON / JSONL), or a `datasets` `save_to_disk` folder or `.parquet` file.
    image_root: folder the image paths are relative to (default: the file's folder; a dataset folder itself).
    on_bad_record: "error" raises BadRecordError at the first bad record; "skip" lists it in
        `LoadResult.skipped` (index, sample_id, reason) and goes on. Nothing is dropped silently.
    processor, max_length: when both are given, every record is also tokenised as the collator would
        (image loaded, image tokens counted) and one that does not fit in `max_length` tokens even
        after cutting all prompt text is bad. `family` as for PreferenceCollator; `collator_options`
        are the other PreferenceCollator arguments that change the tokens (prompt_template,
        system_prompt, max_pixels, min_pixels, truncate_response): give the run's own, so that the
        check measures what training will see.
    check_images: open every image and verify it (set False to trust the files and load faster).
    returns: LoadResult(records, skipped, path, num_read).
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
    measurer = None
    if processor is not None and max_length is not None:
        measurer = PreferenceCollator(processor, objective="dpo", max_length=max_length, family=family,
                                      **(collator_options or {}))
    records: list[PreferenceRecord] = []
    skipped: list[SkippedRecord] = []
    first_index: dict[str, int] = {}
    num_read = 0
    for index, raw, parse_error in (iter_table_records(path) if table else iter_raw_records(path)):
        num_read += 1
        try:
            if parse_error is not None:
                raise BadRecordError(index, None, parse_error)
            record = parse_record(raw, index, root, check_images=check_images)
            if record.sample_id in first_index:
                raise BadRecordError(index, record.sample_id,
                                     f"duplicate id (first used by record {first_index[record.sample_id]})")
            if measurer is not None:
                measurer.check_fits(record)
        except BadRecordError as err:
            err.source = str(path)
            if on_bad_record == "error":
                raise BadRecordError(err.index, err.sample_id, err.reason, str(path)) from None
            skipped.append(SkippedRecord(err.index, err.sample_id, err.reason))
            continue
        first_index[record.sample_id] = index
        records.append(record)
    if num_read == 0:
        raise DataFileError(f"{path}: holds no records (an empty file, an empty list or only blank lines)")
    if skipped:
        logger.warning("%s: skipped %d of %d records (on_bad_record='skip')", path, len(skipped), num_read)
    return LoadResult(records=records, skipped=skipped, path=str(path), num_read=num_read)
