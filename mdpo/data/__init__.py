"""Multimodal preference data: records, corrupted images, and one [chosen | rejected | corrupted] batch.

    from mdpo.data import load_records, CorruptionConfig, PreferenceCollator

    result = load_records("data.json", on_bad_record="skip", processor=processor, max_length=512)
    collator = PreferenceCollator(processor, objective="mdpo", max_length=512, corruption=CorruptionConfig())
    collator.set_epoch(0)
    batch = collator(result.records[:4])   # 12 rows: 4 chosen | 4 rejected | 4 corrupted

Importing this package is light (no torch, no transformers): the collator and the processor loader
are imported on first use.
"""
from .corruption import STRATEGIES, CorruptionConfig, ImagePool, corrupt_image, crop_box
from .records import (
    BadRecordError,
    DataFileError,
    LoadResult,
    PreferenceRecord,
    SkippedRecord,
    dataset_digest,
    identical_pairs,
    identical_pairs_note,
    load_image,
    split_paper_prompt,
)

_LAZY = {
    "load_records": "loading",
    "PreferenceCollator": "collate",
    "load_processor": "collate",
    "detect_family": "collate",
    "OBJECTIVES": "collate",
    "PROMPT_TEMPLATES": "collate",
    "make_sample": "sample",
    "render_preview": "preview",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "STRATEGIES", "BadRecordError", "CorruptionConfig", "DataFileError", "ImagePool", "LoadResult", "PreferenceRecord",
    "SkippedRecord", "corrupt_image", "crop_box", "dataset_digest", "identical_pairs", "identical_pairs_note", "load_image", "load_records", "split_paper_prompt",
    *_LAZY,
]
