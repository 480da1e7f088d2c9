"""Preference records on disk → `PreferenceRecord`s, with every bad record named or counted.

Three record shapes are read, from a JSON list, from JSONL (one object a line, streamed), or from a
Hugging Face `datasets` table (a `save_to_disk` folder or a `.parquet` file, read with the `datasets`
package):

1. paper   `{"img_path", "prompt", "chosen", "rejected"}`: `prompt` holds one `<image>` placeholder
           and is usually templated for LLaVA-1.5 / Vicuna ("SYSTEM USER: <image>\\nQ ASSISTANT:", the
           mDPO code's data). `split_paper_prompt` recovers its system text and turns; the collator
           renders them with the model's own chat template (`prompt_template="model"`, default) or
           keeps the text as written (`"verbatim"`).
2. plain   `{"id"?, "image", "question", "chosen", "rejected"}`: the model's own chat template is
           applied by the collator.
3. trl     `{"images": [image], "prompt": [messages], "chosen": [messages], "rejected": [messages]}`:
           TRL's conversational shape. Message contents are lists of typed items (the prompt holding
           one `{"type": "image"}`) or plain strings; with plain strings the image goes first in the
           first user message, as TRL's `prepare_multimodal_messages` places it.

An image is a path (relative to `image_root`, default: the dataset's folder), `{"path": ...}`,
`{"bytes": ..., "path": ...}` (embedded bytes, as a `datasets` Image column stores them) or a PIL
image; embedded images are kept in memory as their encoded bytes (about the dataset's size on disk).
Every other key of a record (for example the `objects` list that `mdpo-data make-sample` writes) is
kept in `PreferenceRecord.meta`. The sample id is the record's `id` field, else the first 16 hex
digits of a BLAKE2b hash of its canonical JSON, embedded image bytes included (so the id is stable
across runs and processes); ids must be unique.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from ..errors import MdpoError
from .digests import dataset_digest  # noqa: F401 — imported from here too


IMAGE_PLACEHOLDER = "<image>"  # the placeholder of the paper shape's templated prompt
ON_BAD_RECORD = ("error", "skip")
TABLE_SUFFIXES = (".parquet",)  # data files read with the `datasets` package (besides save_to_disk folders)
# Role markers of the LLaVA-1.5 / Vicuna v1 template the paper's prompts are written in.
_VICUNA_ROLES = {"USER": "user", "ASSISTANT": "assistant"}
# Turn markers of other chat templates: a paper prompt holding one is templated in a form not parsed here.
_OTHER_TEMPLATE_MARKERS = ("<|im_start|>", "<start_of_turn>", "<|start_header_id|>", "[INST]", "<end_of_utterance>")


class BadRecordError(MdpoError, ValueError):
    """A record that cannot be used; the message names its index, its id and the reason."""

    def __init__(self, index: int, sample_id: str | None, reason: str, source: str | None = None):
        self.index, self.sample_id, self.reason, self.source = index, sample_id, reason, source
        where = f" in {source}" if source else ""
        super().__init__(f"bad record {index} (id {sample_id!r}){where}: {reason}")


class DataFileError(MdpoError, ValueError):
    """A dataset file that cannot be read as records at all: not UTF-8, not JSON, a wrapper object instead
    of a list, no records. The message names the file (and the line and column where the parser knows them)."""


class SkippedRecord(NamedTuple):
    index: int
    sample_id: str | None
    reason: str


@dataclass
class PreferenceRecord:
    """One preference pair: an image, a prompt, a chosen and a rejected response."""

    index: int  # position in the dataset file (0-based, counting records, not lines)
    sample_id: str  # the `id` field, else a content hash; unique within the dataset
    image_path: str  # absolute (or image_root-joined) path of the image
    chosen: str
    rejected: str
    shape: str  # "paper" | "plain" | "trl"
    question: str | None = None  # plain shape: the question; trl: the text of the user turn(s)
    prompt: str | list[dict] | None = None  # paper: templated text with "<image>"; trl: message list (typed items)
    meta: dict[str, Any] = field(default_factory=dict)  # every other key of the record (e.g. objects)
    image_bytes: bytes | None = None  # an embedded image's encoded bytes (then image_path is "<embedded:HASH>")

    @property
    def objects(self) -> list | None:
        """The scene's object list when the record has one (`mdpo-data make-sample` writes it)."""
        return self.meta.get("objects")

    @property
    def display_question(self) -> str:
        """The question as a person would read it (for previews and reports)."""
        if self.question is not None:
            return self.question
        text = self.prompt if isinstance(self.prompt, str) else ""
        try:
            _, messages = split_paper_prompt(text)
            return _message_text(messages, "user", "prompt").replace(IMAGE_PLACEHOLDER, "").strip()
        except ValueError:
            return text.replace(IMAGE_PLACEHOLDER, "").strip()


@dataclass
class LoadResult:
    records: Sequence[PreferenceRecord]  # load_records: a RecordTable (records read when asked for)
    skipped: list[SkippedRecord]
    path: str
    num_read: int  # records in the file, good and bad
    lengths: dict[str, Any] = field(default_factory=dict)  # per kept record: token counts (with a processor) or words

    def summary(self) -> str:
        """Counts, then one line per skipped record (for the run's output)."""
        lines = [f"{self.path}: {self.num_read} records read, {len(self.records)} kept, {len(self.skipped)} skipped"]
        lines += [f"  skipped record {s.index} (id {s.sample_id!r}): {s.reason}" for s in self.skipped]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- reading
def iter_raw_records(path: str | os.PathLike) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (index, raw object, parse error or None) for every record of a JSON list or JSONL file.

    A file whose first non-blank character is "[" is a JSON list; otherwise it is read line by line
    as JSONL (streamed, so large files are never held whole). Blank JSONL lines are not records.
    A file that is not UTF-8, a JSON list that does not parse, or one JSON object (pretty-printed, or a
    wrapper such as {"records": [...]}) raises DataFileError naming the file; a JSONL line that does not
    parse is a bad record (its line and column in the parse error).
    """
    for index, raw, error, _, _ in iter_json_spans(path):
        yield index, raw, error


def iter_json_spans(path: str | os.PathLike, wanted: Callable[[int], bool] | None = None
                    ) -> Iterator[tuple[int, Any, str | None, int, int]]:
    """(index, raw object, parse error or None, start byte, end byte) of every record of a JSON list or
    JSONL file, read as `iter_raw_records` describes; bytes [start, end) of the file hold the record
    (`read_json_span` parses it again from there: a record is found later by its span alone).

    wanted(index): parse this record (default: every one); for the others raw and error are None (a
    JSONL line is then only counted and checked to be UTF-8; a JSON list's elements are all decoded, as
    finding where one ends is parsing it). A JSON list is decoded from its text one element at a time,
    so its records are never all held as objects; a list that does not parse raises json's own error
    (line and column), possibly after its first elements were yielded.
    """
    path = Path(path)
    try:
        yield from _iter_json_spans(path, wanted)
    except UnicodeDecodeError:
        raise DataFileError(f"{path}: not UTF-8 text ({_first_non_utf8(path)}); save it as UTF-8") from None


def read_json_span(handle, start: int, end: int) -> Any:
    """The record in bytes [start, end) of an open binary file (`iter_json_spans` gave the span)."""
    return json.loads(os.pread(handle.fileno(), end - start, start).decode("utf-8"))


def _first_non_utf8(path: Path) -> str:
    """Where a file first stops being UTF-8: 'byte 0xe9 at line 3, column 17' (column in bytes).
    Reads the file again in binary, line by line (an error path only)."""
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"byte {line[err.start]:#04x} at line {line_number}, column {err.start + 1}"
    return "a byte sequence that is not UTF-8"


def _head(path: Path) -> str:
    """The file's first character that is not whitespace ("" for a blank file)."""
    with open(path, encoding="utf-8") as handle:
        while True:
            ch = handle.read(1)
            if not ch or not ch.isspace():
                return ch


_JSON_SPACE = re.compile(r"[ \t\n\r]*")  # the whitespace json allows between values


def _iter_json_spans(path: Path, wanted: Callable[[int], bool] | None) -> Iterator[tuple[int, Any, str | None, int, int]]:
    head = _head(path)
    if head == "[":
        text = path.read_text(encoding="utf-8")
        ascii_only = text.isascii()
        last_char = last_byte = 0

        def byte_at(pos: int) -> int:  # char offset -> byte offset (positions only grow)
            nonlocal last_char, last_byte
            if ascii_only:
                return pos
            last_byte += len(text[last_char:pos].encode("utf-8"))
            last_char = pos
            return last_byte

        decoder, index = json.JSONDecoder(), 0
        try:
            pos = _JSON_SPACE.match(text).end()
            if not text.startswith("[", pos):
                raise ValueError(pos)
            pos = _JSON_SPACE.match(text, pos + 1).end()
            if text.startswith("]", pos):
                pos += 1
            else:
                while True:
                    raw, end = decoder.raw_decode(text, pos)
                    take = wanted is None or wanted(index)
                    yield index, raw if take else None, None, byte_at(pos), byte_at(end)
                    index += 1
                    pos = _JSON_SPACE.match(text, end).end()
                    if text.startswith(",", pos):
                        pos = _JSON_SPACE.match(text, pos + 1).end()
                    elif text.startswith("]", pos):
                        pos += 1
                        break
                    else:
                        raise ValueError(pos)
            if _JSON_SPACE.match(text, pos).end() != len(text):
                raise ValueError(pos)
        except ValueError:  # json's own message (line, column) for what does not parse
            try:
                json.loads(text)
            except json.JSONDecodeError as err:
                cut = "; it does not end with ']' (cut off?)" if not err.doc.rstrip().endswith("]") else ""
                raise DataFileError(f"{path}: not valid JSON ({err.msg}: line {err.lineno}, column {err.colno}){cut}") from None
            raise
        return
    index, offset = 0, 0
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            start, offset = offset, offset + len(line)
            text = line.decode("utf-8")
            if not text.strip():
                continue
            take = wanted is None or wanted(index)
            raw = error = None
            if take or index == 0:  # the first record is always parsed: it tells a wrapper object from records
                text = text.rstrip("\r\n")  # an error at the line's end is then in this line, not at "line 2, column 1"
                try:
                    raw = json.loads(text)
                except json.JSONDecodeError as err:
                    if index == 0 and head == "{":
                        _refuse_single_object(path)
                    cut = "; it does not end with '}' (cut off?)" if not text.rstrip().endswith("}") else ""
                    error = f"line {line_number} is not valid JSON ({err.msg}: column {err.pos + 1}){cut}"
                else:
                    if index == 0:
                        _refuse_wrapper(path, raw)
                if not take:
                    raw = error = None
            yield index, raw, error, start, offset
            index += 1


def is_table(path: str | os.PathLike) -> bool:
    """A `datasets` table: a `save_to_disk` folder or a `.parquet` file."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() in TABLE_SUFFIXES


def open_table(path: str | os.PathLike):
    """The `datasets.Dataset` of a `datasets` table, memory-mapped: a `save_to_disk` folder (a Dataset, or a
    DatasetDict with one split or a "train" split) or a `.parquet` file (which `datasets` converts once to
    an Arrow file in its own cache, HF_DATASETS_CACHE, and maps from there). Needs the `datasets` package
    (imported here only)."""
    path = Path(path)
    try:
        import datasets
    except ImportError:
        raise DataFileError(f"{path}: reading a Hugging Face datasets folder or a parquet file needs the `datasets` "
                            "package (pip install datasets)") from None
    if not path.is_dir():
        return datasets.Dataset.from_parquet(str(path))
    try:
        table = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataFileError(f"{path}: a folder, but not one written by datasets' save_to_disk ({err})") from None
    if isinstance(table, datasets.DatasetDict):
        splits = list(table)
        if len(splits) == 1 or "train" in splits:
            table = table[splits[0] if len(splits) == 1 else "train"]
        else:
            raise DataFileError(f"{path}: a DatasetDict with splits {splits} and none named 'train'; "
                                "give the folder of one split")
    return table


def iter_table_rows(table, start: int = 0, stop: int | None = None, batch_size: int = 256) -> Iterator[tuple[int, Any]]:
    """(row index, row dict) for rows [start, stop) of a `datasets.Dataset`, read in Arrow batches.

    Rows come as Arrow gives them: Image cells stay {"bytes", "path"} structs (never decoded to PIL,
    nothing re-cast or written next to the user's table). The only copies made are of the rows read.
    """
    arrow = table.with_format("arrow")
    stop = len(table) if stop is None else min(stop, len(table))
    for begin in range(start, stop, batch_size):
        for offset, row in enumerate(arrow[begin : min(begin + batch_size, stop)].to_pylist()):
            yield begin + offset, row


def iter_table_records(path: str | os.PathLike) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (index, row, None) for every row of a `datasets` table (`open_table`), image cells undecoded."""
    for index, row in iter_table_rows(open_table(path)):
        yield index, row, None


RECORD_KEYS = frozenset({"prompt", "question", "chosen", "rejected", "image", "img_path", "images"})


def _refuse_single_object(path: Path) -> None:
    """A pretty-printed JSON object is neither a list nor JSONL: say so instead of N bad lines."""
    try:
        whole = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return
    if isinstance(whole, dict):
        _refuse_wrapper(path, whole)
        raise DataFileError(f"{path}: holds one JSON object; expected a JSON list of records or JSONL (one record a line)")


def _refuse_wrapper(path: Path, obj: Any) -> None:
    """A JSON object holding the records under a key ({"records": [...]}, {"data": [...]}) is not read:
    which key holds them is a guess. Say what the file is and how to give the list itself."""
    if not isinstance(obj, dict) or RECORD_KEYS & set(obj):
        return
    for key, value in obj.items():
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value[:10]):
            raise DataFileError(
                f"{path}: one JSON object whose {key!r} key holds a list of {len(value)} records; expected a JSON list "
                f"of records or JSONL (one record a line): save that list alone, e.g. `jq '.{key}' {path} > records.json`")


def _canonical(value: Any) -> Any:
    """JSON stand-in for what JSON cannot hold: bytes → their BLAKE2b, a PIL image → a hash of its
    mode, size and pixels (never its memory address), anything else → str."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes:" + hashlib.blake2b(bytes(value), digest_size=16).hexdigest()
    if hasattr(value, "tobytes") and hasattr(value, "mode") and hasattr(value, "size"):  # PIL image
        digest = hashlib.blake2b(value.tobytes(), digest_size=16)
        digest.update(f"{value.mode}{value.size}".encode())
        return "image:" + digest.hexdigest()
    return str(value)


def content_id(raw: Any) -> str:
    """A stable id from a record's content: BLAKE2b of its canonical JSON, 16 hex digits.
    Embedded image bytes (or a PIL image's pixels) are part of it."""
    blob = json.dumps(raw, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_canonical)
    return hashlib.blake2b(blob.encode("utf-8"), digest_size=8).hexdigest()


def split_paper_prompt(prompt: str) -> tuple[bool, list[dict]]:
    """A paper-shape prompt → (templated, messages) with typed content items.

    A prompt in the LLaVA-1.5 / Vicuna v1 template, "SYSTEM USER: <image>\\nQ ASSISTANT:" (more
    turns allowed: "… ASSISTANT: A</s>USER: Q2 ASSISTANT:"), gives templated=True and its system
    text (if any) as a system message, then the user / assistant turns, the image as a
    `{"type": "image"}` item where its placeholder stood. A prompt without "USER:" / "ASSISTANT:"
    markers is a bare question: templated=False and one user message. Raises ValueError for a
    prompt in another chat template, or a Vicuna one that does not end with "ASSISTANT:" or whose
    turns do not alternate.
    """
    markers = list(_VICUNA_MARKER.finditer(prompt))
    if not markers:
        for marker in _OTHER_TEMPLATE_MARKERS:
            if marker in prompt:
                raise ValueError(f"the prompt is written in a chat template with {marker!r} turns, not LLaVA-1.5's "
                                 "'USER: … ASSISTANT:'; set data.prompt_template: verbatim to use it as written")
        return False, [{"role": "user", "content": _content_items(prompt.strip())}]
    turns = []
    for i, marker in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(prompt)
        turns.append((_VICUNA_ROLES[marker.group(1)], prompt[marker.end():end]))
    if turns[-1][0] != "assistant" or turns[-1][1].strip():
        raise ValueError("the prompt has LLaVA-1.5 'USER:' turns but does not end with 'ASSISTANT:'; "
                         "set data.prompt_template: verbatim to use it as written")
    turns = turns[:-1]
    for i, (role, _) in enumerate(turns):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError("the prompt's 'USER:' / 'ASSISTANT:' turns do not alternate starting with 'USER:'")
    messages = []
    system = prompt[:markers[0].start()].strip()
    if system:
        if IMAGE_PLACEHOLDER in system:
            raise ValueError(f"the image placeholder {IMAGE_PLACEHOLDER!r} is in the system text, not in a 'USER:' turn")
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    for role, text in turns:
        text = text.strip()
        if role == "assistant" and text.endswith("</s>"):
            text = text[: -len("</s>")].rstrip()
        messages.append({"role": role, "content": _content_items(text)})
    return True, messages


_VICUNA_MARKER = re.compile(r"\b(USER|ASSISTANT):")  # at a word start: after a space, "</s>", "." …


def _content_items(text: str) -> list[dict]:
    """Text with at most one "<image>" → typed items, the image where its placeholder stood
    (the newline LLaVA writes after it dropped)."""
    if IMAGE_PLACEHOLDER not in text:
        return [{"type": "text", "text": text}] if text else []
    before, after = text.split(IMAGE_PLACEHOLDER, 1)
    items = [{"type": "text", "text": before.strip()}] if before.strip() else []
    items.append({"type": "image"})
    if after.strip():
        items.append({"type": "text", "text": after.strip()})
    return items


def normalize_trl_prompt(prompt: list, num_images: int = 1) -> list[dict]:
    """TRL prompt messages → messages with typed content items.

    String contents become `[{"type": "text", ...}]`; when no message holds an image item, the
    first user message with a string content gets `num_images` `{"type": "image"}` items in front
    of its text, as TRL's `prepare_multimodal_messages` does (TRL's collator docstring form)."""
    need_image = count_image_items(prompt) == 0
    out = []
    for message in prompt:
        message = dict(message)
        content = message.get("content")
        if isinstance(content, str):
            items = [{"type": "text", "text": content}] if content else []
            if need_image and message.get("role") == "user":
                items = [{"type": "image"}] * num_images + items
                need_image = False
            message["content"] = items
        out.append(message)
    return out


def _message_text(messages: Any, role: str | None, what: str) -> str:
    """The text of the messages (of `role`, if given): string contents and {"type": "text"} items."""
    if isinstance(messages, str):
        return messages
    if not isinstance(messages, list):
        raise _Reason(f"'{what}' must be a string or a list of messages, not {type(messages).__name__}")
    parts = []
    for message in messages:
        if not isinstance(message, dict) or "content" not in message:
            raise _Reason(f"'{what}' holds an entry that is not a message with 'role' and 'content'")
        if role is not None and message.get("role") != role:
            continue
        content = message["content"]
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(item.get("text", "")) for item in content if isinstance(item, dict) and item.get("type") == "text")
    return "\n".join(p for p in parts if p)


def count_image_items(messages: list) -> int:
    return sum(
        1
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for item in message["content"]
        if isinstance(item, dict) and item.get("type") == "image"
    )


class _Reason(Exception):
    """Internal: why a raw record is bad (turned into BadRecordError with index and id)."""


def _text_field(raw: dict, key: str, shape: str) -> str:
    if key not in raw or raw[key] is None:
        raise _Reason(f"missing '{key}'")
    value = raw[key]
    text = _message_text(value, "assistant", key) if shape == "trl" and not isinstance(value, str) else value
    if not isinstance(text, str):
        raise _Reason(f"'{key}' must be a string, not {type(text).__name__}")
    if not text.strip():
        raise _Reason(f"empty '{key}'")
    return text


def _image_field(raw: dict) -> str | bytes:
    """The record's image: a path (str) or embedded encoded bytes (from {"bytes": ...} or a PIL image)."""
    for key in ("img_path", "image", "images"):
        if key in raw and raw[key] is not None:
            value = raw[key]
            if isinstance(value, list):
                if len(value) != 1:
                    raise _Reason(f"'{key}' holds {len(value)} images; one image per record is supported")
                value = value[0]
            if isinstance(value, dict):  # {"path": ...} or a `datasets` Image cell {"bytes": ..., "path": ...}
                if isinstance(value.get("bytes"), str):
                    raise _Reason(f"'{key}' holds {{'bytes': <text>}}; embedded image bytes must be bytes (a datasets "
                                  "Image cell), not text such as base64: give an image path instead")
                if value.get("bytes") is not None:
                    value = value["bytes"]
                else:
                    value = value.get("path")
            if isinstance(value, (bytearray, memoryview)):
                value = bytes(value)
            if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image (a decoded `datasets` cell)
                buffer = io.BytesIO()
                value.save(buffer, format="PNG")
                value = buffer.getvalue()
            if isinstance(value, bytes):
                if not value:
                    raise _Reason(f"'{key}' holds empty image bytes")
                return value
            if not isinstance(value, str) or not value:
                raise _Reason(f"'{key}' must be an image path, {{'bytes': ...}} or a PIL image, not {type(value).__name__}")
            return value
    raise _Reason("missing image ('img_path', 'image' or 'images')")


def parse_record(raw: Any, index: int, image_root: str | os.PathLike, check_images: bool = True) -> PreferenceRecord:
    """One raw JSON object → PreferenceRecord; raises BadRecordError naming index, id and reason."""
    sample_id = None
    try:
        if not isinstance(raw, dict):
            raise _Reason(f"not a JSON object but {type(raw).__name__}")
        sample_id = str(raw["id"]) if raw.get("id") is not None else content_id(raw)
        prompt = raw.get("prompt")
        if isinstance(prompt, list):
            shape = "trl"
        elif isinstance(prompt, str) and "question" not in raw:
            shape = "paper"
        elif "question" in raw:
            shape = "plain"
        elif prompt is not None:
            raise _Reason(f"'prompt' must be a string (paper shape) or a list of messages (TRL shape), not {type(prompt).__name__}")
        else:
            raise _Reason(f"unrecognised record shape: keys {sorted(raw)}; expected 'prompt' or 'question'")
        chosen = _text_field(raw, "chosen", shape)
        rejected = _text_field(raw, "rejected", shape)
        image = _image_field(raw)
        image_bytes = None
        if isinstance(image, bytes):
            image_bytes = image
            image = f"<embedded:{hashlib.blake2b(image, digest_size=8).hexdigest()}>"
        question = None
        if shape == "paper":
            n = prompt.count(IMAGE_PLACEHOLDER)
            if n != 1:
                raise _Reason(
                    f"prompt has {n} image placeholders '{IMAGE_PLACEHOLDER}'; the paper shape needs exactly one"
                )
        elif shape == "plain":
            question = raw["question"]
            if question is None:
                raise _Reason("missing 'question' (null)")
            if not isinstance(question, str):
                raise _Reason(f"'question' must be a string, not {type(question).__name__} ({_short(question)})")
            if not question.strip():
                raise _Reason("empty 'question'")
        else:
            _message_text(prompt, None, "prompt")  # every entry a message
            prompt = normalize_trl_prompt(prompt)
            n = count_image_items(prompt)
            if n != 1:
                raise _Reason(f"prompt messages hold {n} image placeholders ({{'type': 'image'}}); exactly one is needed")
            question = _message_text(prompt, "user", "prompt")
        if image_bytes is not None:
            image_path = image
            if check_images:
                check_image_bytes(image_bytes)
        else:
            image_path = image if os.path.isabs(image) else os.path.join(str(image_root), image)
            if check_images:
                check_image_file(image_path)
        known = {"id", "img_path", "image", "images", "prompt", "question", "chosen", "rejected"}
        meta = {k: v for k, v in raw.items() if k not in known}
        return PreferenceRecord(
            index=index, sample_id=sample_id, image_path=image_path, chosen=chosen, rejected=rejected, shape=shape,
            question=question, prompt=prompt if shape != "plain" else None, meta=meta, image_bytes=image_bytes,
        )
    except _Reason as reason:
        raise BadRecordError(index, sample_id, str(reason)) from None


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def identical_pairs(records: list[PreferenceRecord]) -> list[PreferenceRecord]:
    """Records whose chosen and rejected responses are the same text (surrounding whitespace aside).

    Such a pair is not refused: its DPO term is constant (equal log-ratios, no gradient), but the
    conditional and anchor terms read only the chosen response and still train on it, and `sft` never
    reads the rejected one. It is counted and named instead, so a data bug that makes many is seen.
    A `RecordTable` knows them from its validation: only those records are read.
    """
    positions = getattr(records, "identical_positions", None)
    if positions is not None:
        return [records[k] for k in positions]
    return [r for r in records if r.chosen.strip() == r.rejected.strip()]


def sample_ids_of(records: Sequence[PreferenceRecord]) -> Sequence[str]:
    """Every record's sample id, in order (a `RecordTable` gives them without reading a record)."""
    ids = getattr(records, "sample_ids", None)
    return ids if ids is not None else [r.sample_id for r in records]


def identical_pairs_note(records: list[PreferenceRecord], source: str, objective: str = "mdpo") -> str | None:
    """One line for a run's output when some pairs have chosen == rejected (None when none do, or for
    `sft`, which never reads the rejected answer)."""
    same = identical_pairs(records)
    if not same or objective == "sft":
        return None
    named = ", ".join(f"{r.index} (id {r.sample_id!r})" for r in same[:3]) + (", …" if len(same) > 3 else "")
    effect = ("they teach nothing under this objective" if objective in ("dpo", "dpo_no_image") else
              "the conditional and anchor terms still train on their chosen answer")
    return (f"note: {len(same)} of {len(records)} pair(s) in {source} have chosen == rejected (records {named}): their DPO "
            f"term is constant (no gradient); {effect}")


def check_image_file(image_path: str) -> None:
    """Raise _Reason when the image is missing or Pillow cannot read it (header and data checked)."""
    from PIL import Image

    if not os.path.isfile(image_path):
        raise _Reason(f"image file not found: {image_path}")
    try:
        with Image.open(image_path) as image:
            image.verify()
    except Exception as err:  # noqa: BLE001 — any decoder error means an unreadable file
        raise _Reason(f"image file unreadable: {image_path} ({type(err).__name__}: {err})") from None


def check_image_bytes(data: bytes) -> None:
    """Raise _Reason when Pillow cannot read embedded image bytes."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception as err:  # noqa: BLE001
        raise _Reason(f"embedded image unreadable ({type(err).__name__}: {err})") from None


# Most pixels an image is decoded to: above every supported processor's own input size (Qwen2-VL's default
# max_pixels is 12,845,056; LLaVA, Idefics3, PaliGemma resize to far less), so no model sees fewer pixels.
MAX_DECODED_PIXELS = 4096 * 4096


def decode_rgb(source, max_pixels: int = MAX_DECODED_PIXELS):
    """An image file (a path or a file object) decoded as RGB, reduced by the smallest integer factor that
    brings it to at most `max_pixels` pixels; an image within it decodes exactly as before.

    A reduced image is decoded small where the codec can (JPEG `draft`: the DCT at 1/2, 1/4 or 1/8 scale)
    and otherwise box-averaged once after decoding (`Image.reduce`). A 12000×12000 flat PNG then costs its
    decoded bytes once (432 MB RGB) instead of the processor's float copies and a full-size corrupted
    copy (several GB). Pillow's own limit still refuses a larger one (`Image.MAX_IMAGE_PIXELS`, 2× of it:
    DecompressionBombError) before it is decoded; its warning for the sizes in between is not repeated.
    """
    import math
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # handled here: such an image is reduced
        with Image.open(source) as image:
            factor = math.ceil(math.sqrt(image.width * image.height / max_pixels))
            if factor > 1:
                image.draft("RGB", (math.ceil(image.width / factor), math.ceil(image.height / factor)))
            image.load()
            factor = math.ceil(math.sqrt(image.width * image.height / max_pixels))  # after draft: what is left
            if factor <= 1:
                return to_rgb(image)
            if image.mode in ("L", "RGB", "RGBA", "LA", "I", "F", "CMYK", "YCbCr"):  # modes Image.reduce takes
                return to_rgb(image.reduce(factor))
            return to_rgb(image).reduce(factor)  # P, 1, I;16: converted first


def load_image(record: PreferenceRecord, max_pixels: int = MAX_DECODED_PIXELS):
    """The record's image as RGB, at most `max_pixels` pixels (`decode_rgb`: a larger one is decoded
    reduced). RGBA / LA / P-with-transparency are composited on white; other modes (L, P, CMYK, I;16 …)
    are converted. Raises BadRecordError naming the record if the file cannot be read or is refused."""
    try:
        source = io.BytesIO(record.image_bytes) if record.image_bytes is not None else record.image_path
        return decode_rgb(source, max_pixels)
    except Exception as err:  # noqa: BLE001
        raise BadRecordError(record.index, record.sample_id,
                             f"image file unreadable: {record.image_path} ({type(err).__name__}: {err})") from None


def to_rgb(image):
    from PIL import Image

    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")
