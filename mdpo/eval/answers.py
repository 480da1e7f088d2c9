"""Answers files produced elsewhere, read and checked one way for every benchmark (CHAIR, POPE, AMBER).

    answers = read_answers_file("answers.jsonl", expected_ids=["1", "2", "3"], id_keys=("question_id",),
                                text_keys=("text", "answer"))
    answers.texts        # {"1": "Yes, there is.", ...}: in the order of expected_ids
    answers.records      # the same ids -> the whole record (token counts and other fields kept)
    answers.coverage()   # {"answered": 3, "expected": 3, "partial": False}

Checks (each failure is one AnswersDataError naming the file, the record and its id):
- the file exists and is a JSON list or JSONL of objects, each with an id (the first of `id_keys`
  present) and an answer string (the first of `text_keys` present);
- every id is one of the benchmark's questions (`aliases` may map another spelling of an id, e.g. a
  question id to its image id, onto one of them);
- no id is answered twice: scoring both would count the question twice (a CHAIR_s of 60.0 instead
  of 50.0 for 5 answers to 4 questions);
- every question is answered, unless `allow_partial=True` (`--allow-partial`): then only the answered
  questions are scored, and every table and metrics.json says how many of how many (`coverage()`).
Ids are compared as strings ("3" and 3 are the same question), as the benchmarks' own files mix them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .chair import HallucinationDataError, _iter_json_records

MISSING_SHOWN = 5  # missing ids named in the error message


class AnswersDataError(HallucinationDataError):
    """An answers file that cannot be scored as it is (duplicate, unknown or missing answers, a bad record)."""


@dataclass
class AnswerSet:
    """The checked answers of one file: id -> text / record, in the order of the expected ids."""

    source: str
    texts: dict[str, str]
    records: dict[str, dict[str, Any]]
    expected: int  # questions the benchmark asks
    missing: list[str] = field(default_factory=list)  # expected ids without an answer (allow_partial only)

    @property
    def answered(self) -> int:
        return len(self.texts)

    @property
    def partial(self) -> bool:
        return self.answered < self.expected

    def coverage(self) -> dict[str, Any]:
        """For metrics.json: {"answered", "expected", "partial"}."""
        return {"answered": self.answered, "expected": self.expected, "partial": self.partial}


def coverage_note(label: str, coverage: Mapping[str, Any]) -> str | None:
    """The line a table carries under it for a partial answers file; None when every question is answered."""
    if not coverage or not coverage.get("partial"):
        return None
    return (f"{label}: {coverage['answered']} of {coverage['expected']} questions answered and scored "
            "(--allow-partial); its figures are over those only")


def read_answers_file(
    path: str | os.PathLike,
    *,
    expected_ids: Sequence[Any],
    id_keys: Sequence[str] = ("id",),
    text_keys: Sequence[str] = ("answer",),
    aliases: Mapping[str, str] | None = None,
    allow_partial: bool = False,
    questions_source: str = "the questions",
) -> AnswerSet:
    """Read and check an answers file (module docstring). -> AnswerSet in the order of `expected_ids`."""
    path = Path(path)
    if not path.is_file():
        raise AnswersDataError(f"answers file not found: {path}")
    expected = list(dict.fromkeys(str(i) for i in expected_ids))  # questions sharing an image: one answer
    wanted = set(expected)
    aliases = {str(k): str(v) for k, v in (aliases or {}).items()}
    texts: dict[str, str] = {}
    records: dict[str, dict[str, Any]] = {}
    first_seen: dict[str, int] = {}
    for index, raw in _iter_json_records(path):
        where = f"{path}: record {index}"
        if not isinstance(raw, Mapping):
            raise AnswersDataError(f"{where}: not a JSON object but {type(raw).__name__}")
        key_name = next((k for k in id_keys if raw.get(k) is not None), None)
        if key_name is None:
            raise AnswersDataError(f"{where}: no {' or '.join(map(repr, id_keys))} (keys: {sorted(raw)})")
        raw_id = raw[key_name]
        if isinstance(raw_id, (dict, list, bool, float)):
            raise AnswersDataError(f"{where}: {key_name!r} must be a string or an integer, got {raw_id!r}")
        key = str(raw_id)
        key = key if key in wanted else aliases.get(key, key)
        text_name = next((k for k in text_keys if k in raw), None)
        text = raw.get(text_name) if text_name else None
        if not isinstance(text, str):
            raise AnswersDataError(f"{where} (id {raw_id!r}): the answer ({' or '.join(map(repr, text_keys))}) "
                                   f"must be a string, got {text!r}")
        if key not in wanted:
            raise AnswersDataError(f"{where} (id {raw_id!r}): no question with this id in {questions_source}")
        if key in first_seen:
            raise AnswersDataError(f"{where} (id {raw_id!r}): a second answer to the same question (record "
                                   f"{first_seen[key]} answers it too); scoring both would count it twice")
        first_seen[key] = index
        texts[key], records[key] = text, dict(raw)
    if not texts:
        raise AnswersDataError(f"{path}: no answers (an empty answers file is almost always a wrong path)")
    missing = [i for i in expected if i not in texts]
    if missing and not allow_partial:
        shown = ", ".join(repr(i) for i in missing[:MISSING_SHOWN]) + (", ..." if len(missing) > MISSING_SHOWN else "")
        raise AnswersDataError(
            f"{path} answers {len(texts)} of the {len(expected)} questions in {questions_source} (missing ids {shown}); "
            f"answer them all, or pass --allow-partial to score the {len(texts)} answered (the tables then say so)")
    order = [i for i in expected if i in texts]
    return AnswerSet(str(path), {i: texts[i] for i in order}, {i: records[i] for i in order}, len(expected), missing)
