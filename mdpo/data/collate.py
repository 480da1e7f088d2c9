"""Records → one batch for one policy forward: rows [chosen | rejected | corrupted].

For B records the batch has 3B rows (2B for the objectives without a corrupted branch):

    rows 0 … B-1     chosen     original image m_w, chosen response y_w
    rows B … 2B-1    rejected   original image m_w, rejected response y_l
    rows 2B … 3B-1   corrupted  corrupted image m_l, chosen response y_w   (mdpo, mdpo_no_anchor)

`dpo_no_image` (the paper's "DPO (No Image)") has 2B text-only rows: no image, no placeholder, no
pixel inputs. `sft` has the B chosen rows only.

How a row is built. The prompt (with its image placeholder in the family's own form) goes through
the processor with its image, which expands the placeholder into the image tokens and returns the
pixel inputs; the response is tokenised on its own (no special tokens) and the EOS id appended; the
two id lists are concatenated. So the prompt/response boundary is exact for every tokenizer, and
`labels` are the response ids (EOS included) and −100 on every prompt position (image tokens
included) and on padding. Labels are not shifted (Hugging Face convention: the loss shifts).

Padding is on the right for every row (`attention_mask` 0 there), so response positions do not
move with the batch's longest row. Per-token inputs the processor returns besides `input_ids` and
`attention_mask` are carried along: `token_type_ids` (PaliGemma: 0 prefix, 1 response; padding 0)
and `mm_token_type_ids` (Qwen2-VL: 1 on image tokens; response and padding 0). Pixel inputs
(`pixel_values`, `image_grid_thw`, `pixel_attention_mask`, …) are concatenated along dim 0 in row
order, padded with zeros where images of a batch differ in the other dims.

Truncation to `max_length` cuts prompt text first, oldest first (system prompt, then the start of the
question), and never an image token or a special token (BOS, `<|vision_start|>`, `<|im_start|>` …).
With `truncate_response=False` (default) the response is kept whole and a row that still does not
fit makes its record bad (`BadRecordError`, naming the keys that fix it); with
`truncate_response=True` the response is cut at its end instead (the prompt kept whole while it
leaves room for one response token; like TRL's `keep_start` and the paper code), and a cut response
has no EOS (the model is not taught to stop where the budget ran out). The corrupted row gets the
same cut of the chosen response as the chosen row. `load_records(..., processor, max_length)` finds
bad records up front.

Prompts: every shape becomes a list of chat messages with typed items, rendered by the processor's
chat template (`apply_chat_template(..., add_generation_prompt=True)`), with `system_prompt` added
as a system message to a conversation that has none. The paper shape's prompt is templated for
LLaVA-1.5 ("SYSTEM USER: <image>\\nQ ASSISTANT:"); with `prompt_template="model"` (default) its
system text and turns are recovered (`records.split_paper_prompt`) and rendered like the other
shapes, so a Qwen / Idefics3 model sees its own template. For LLaVA-1.5 (llava-hf's template) that
rendering gives the paper's text again, character for character. `prompt_template="verbatim"` keeps
the paper text as written, only "<image>" replaced by the family's placeholder (Qwen:
`<|vision_start|><|image_pad|><|vision_end|>`; PaliGemma: moved to the start). PaliGemma has no
chat template: its prompt is the user text after the image.

Image size: `max_pixels` / `min_pixels` bound the pixels per image for the families with dynamic
resolution (Qwen2-VL, Qwen2.5-VL: passed to the image processor as `size`, so they decide the
number of image tokens); the other families resize every image to a fixed size and refuse them.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from ..errors import ConfigError
from .corruption import CorruptionConfig, ImagePool, corrupt_image
from .records import IMAGE_PLACEHOLDER, MAX_DECODED_PIXELS, BadRecordError, PreferenceRecord, load_image, split_paper_prompt

# Objectives that need the corrupted branch (3B rows); every other objective gets 2B rows.
OBJECTIVES_WITH_CORRUPTED = ("mdpo", "mdpo_no_anchor")
OBJECTIVES = ("mdpo", "mdpo_no_anchor", "mdpo_no_conditional", "dpo", "dpo_no_image", "sft")
FAMILIES = ("llava", "qwen2-vl", "qwen2.5-vl", "idefics3", "smolvlm", "paligemma", "generic")
PROMPT_TEMPLATES = ("model", "verbatim")  # how paper-shape prompts are rendered (see the module docstring)
PIXEL_BUDGET_FAMILIES = ("qwen2-vl", "qwen2.5-vl")  # families whose image processor takes max_pixels / min_pixels
_FIX_TOO_LONG = ("raise data.max_length, lower data.max_pixels (Qwen2-VL / Qwen2.5-VL), set data.truncate_response: true, "
                 "or set data.on_bad_record: skip to leave such records out")
_QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
# Per-token keys: value appended for response tokens, value used for padding.
_TOKEN_KEY_FILL = {
    "input_ids": (None, None),  # response ids / the pad id
    "attention_mask": (1, 0),
    "token_type_ids": (1, 0),  # PaliGemma: 1 = suffix (causal), 0 = prefix (bidirectional)
    "mm_token_type_ids": (0, 0),  # Qwen2-VL / Idefics3: 1 = image token
}


_QWEN_PROCESSOR_CLASSES = {"Qwen2VLProcessor": "qwen2-vl", "Qwen2_5_VLProcessor": "qwen2.5-vl"}
_QWEN_MODEL_TYPES = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl"}


def folder_processor_class(folder: str | os.PathLike) -> str | None:
    """The processor class a saved folder names (processor / preprocessor / tokenizer config), else None."""
    import json

    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json",
                 "video_preprocessor_config.json"):
        path = os.path.join(str(folder), name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as handle:
                    value = json.load(handle).get("processor_class")
            except (OSError, ValueError, AttributeError):
                continue
            if value:
                return str(value)
    return None


def _torchvision_loads() -> bool:
    """Whether torchvision imports here (transformers' video processors need it)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 — missing, or a CUDA wheel beside a CPU-only torch
        return False
    return True


def _qwen_family_of_folder(folder: str | os.PathLike) -> str | None:
    """"qwen2-vl" / "qwen2.5-vl" when the folder holds a Qwen2(.5)-VL processor (or model), else None."""
    import json

    named = folder_processor_class(folder)
    if named is not None:
        return _QWEN_PROCESSOR_CLASSES.get(named)
    config = os.path.join(str(folder), "config.json")
    if os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as handle:
                return _QWEN_MODEL_TYPES.get(json.load(handle).get("model_type"))
        except (OSError, ValueError, AttributeError):
            return None
    return None


def load_processor(path_or_processor: Any):
    """A processor object from a local folder (offline), "tiny:FAMILY", or the object itself.

    Registers the tiny image-only Qwen processors first, so folders written by
    `mdpo.tiny_processors.build_tiny_processor(..., save_dir)` load here without torchvision. A
    Qwen2-VL / Qwen2.5-VL folder (a real checkpoint's, whose processor also wants a video processor,
    which needs torchvision) is loaded as the image-only subclass when torchvision does not import:
    same tokenizer, image processor, chat template and outputs for images and text; no videos.
    """
    if not isinstance(path_or_processor, (str, os.PathLike)):
        return path_or_processor
    if str(path_or_processor).startswith("tiny:"):  # e.g. "tiny:llava": the offline tiny processor
        from ..tiny_processors import build_tiny_processor

        return build_tiny_processor(str(path_or_processor)[len("tiny:"):])
    from transformers import AutoProcessor

    from ..tiny_processors import image_only_qwen_processor_class, register_auto_classes

    register_auto_classes()
    folder = str(path_or_processor)
    qwen = _qwen_family_of_folder(folder) if os.path.isdir(folder) else None
    if qwen is not None and not _torchvision_loads():
        return image_only_qwen_processor_class(qwen).from_pretrained(folder, local_files_only=True)
    return AutoProcessor.from_pretrained(folder, local_files_only=True)


def detect_family(processor: Any) -> str:
    """The model family from the processor's class name ("generic" when unknown)."""
    name = type(processor).__name__.lower()
    for needle, family in (("qwen2_5_vl", "qwen2.5-vl"), ("qwen2vl", "qwen2-vl"), ("idefics3", "idefics3"),
                           ("smolvlm", "smolvlm"), ("paligemma", "paligemma"), ("llava", "llava")):
        if needle in name:
            return family
    return "generic"


class PreferenceCollator:
    """Collate PreferenceRecords into one [chosen | rejected | corrupted] batch (see module docstring).

    processor: a Hugging Face processor object, or a local folder to load one from.
    objective: mdpo | mdpo_no_anchor (3B rows) | mdpo_no_conditional | dpo (2B rows) | dpo_no_image
        (2B text-only rows) | sft (B chosen rows).
    max_length: tokens per row, image tokens included.
    corruption: how the corrupted image is made (only used with a corrupted branch).
    family: llava | qwen2-vl | qwen2.5-vl | idefics3 | smolvlm | paligemma (default: from the
        processor's class; "generic" uses `processor.image_token` as the placeholder).
    image_pool: records (or an ImagePool) that `random_image` draws from; also `set_image_pool`.
    system_prompt: system message for conversations that have none (a TRL prompt's own system
        message, or a paper prompt's system text, wins).
    prompt_template: "model" (default) | "verbatim": how paper-shape prompts are rendered.
    max_pixels, min_pixels: pixels per image for Qwen2-VL / Qwen2.5-VL (None: the processor's own).
    truncate_response: cut a response that does not fit (no EOS then) instead of refusing the record.
    """

    def __init__(
        self,
        processor: Any,
        objective: str = "mdpo",
        max_length: int = 512,
        corruption: CorruptionConfig = CorruptionConfig(),
        family: str | None = None,
        image_pool: ImagePool | Sequence[PreferenceRecord] | None = None,
        system_prompt: str | None = None,
        prompt_template: str = "model",
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        truncate_response: bool = False,
    ):
        if prompt_template not in PROMPT_TEMPLATES:
            raise ConfigError(f"data.prompt_template={prompt_template!r} must be one of {PROMPT_TEMPLATES}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r} must be one of {OBJECTIVES}")
        if not isinstance(max_length, int) or max_length <= 0:
            raise ValueError(f"max_length={max_length!r} must be a positive int")
        if not isinstance(corruption, CorruptionConfig):
            raise TypeError(f"corruption must be a CorruptionConfig, not {type(corruption).__name__}")
        self.processor = load_processor(processor)
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError(f"processor {type(self.processor).__name__} has no tokenizer")
        family = (family or detect_family(self.processor)).lower()
        family = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl", "qwen2.5_vl": "qwen2.5-vl"}.get(family, family)
        if family not in FAMILIES:
            raise ValueError(f"family={family!r} must be one of {FAMILIES}")
        self.family = family
        self.objective = objective
        self.max_length = max_length
        self.corruption = corruption
        self.system_prompt = system_prompt
        self.prompt_template = prompt_template
        self.truncate_response = bool(truncate_response)
        self.image_kwargs = self._pixel_budget(max_pixels, min_pixels)
        self.decode_pixels = max(MAX_DECODED_PIXELS, max_pixels or 0)  # a bigger image is decoded reduced (load_image)
        self.with_corrupted = objective in OBJECTIVES_WITH_CORRUPTED
        self.with_image = objective != "dpo_no_image"
        self.epoch = 0
        self.image_pool: ImagePool | None = None
        if image_pool is not None:
            self.set_image_pool(image_pool)

        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise ValueError(f"the tokenizer of {type(self.processor).__name__} has no EOS token")
        self.eos_id = int(tok.eos_token_id)
        self.pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else self.eos_id
        self.image_token = getattr(self.processor, "image_token", None) or IMAGE_PLACEHOLDER
        self.image_token_id = getattr(self.processor, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = tok.convert_tokens_to_ids(self.image_token)
        # Never cut: image tokens and every special token (BOS, vision start/end, turn markers …).
        protected = set(tok.all_special_ids)
        protected.update(i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False))
        protected.add(int(self.image_token_id))
        for name in ("fake_image_token_id", "global_image_token_id", "video_token_id"):
            if getattr(self.processor, name, None) is not None:
                protected.add(int(getattr(self.processor, name)))
        self.protected_ids = frozenset(int(i) for i in protected)
        # SentencePiece-style tokenizers put a word-start marker on the first word of any text, so
        # the response needs no leading space of its own; byte-level BPE does.
        first = tok.convert_ids_to_tokens(tok("a", add_special_tokens=False)["input_ids"][:1])
        self._spm_style = bool(first) and str(first[0]).startswith("▁")

    # ------------------------------------------------------------------------------ public API
    def set_epoch(self, epoch: int) -> None:
        """The epoch the corrupted images are drawn for (ignored with same_every_epoch)."""
        self.epoch = int(epoch)

    def set_image_pool(self, records: ImagePool | Sequence[PreferenceRecord]) -> None:
        """The images `random_image` picks from (normally the whole dataset)."""
        if not isinstance(records, ImagePool):
            if hasattr(records, "embedded_images"):  # a RecordTable: known from validation, no record read
                n_embedded, example = records.embedded_images()
            else:
                embedded = [r.sample_id for r in records if getattr(r, "image_bytes", None) is not None]
                n_embedded, example = len(embedded), embedded[0] if embedded else None
            if n_embedded:
                raise ConfigError(f"data.corruption: random_image draws other records' image files, but {n_embedded} "
                                  f"record(s) hold embedded images (e.g. id {example!r}); use crop or moco_v2 for them")
        self.image_pool = records if isinstance(records, ImagePool) else ImagePool(records)

    def __call__(self, records: Sequence[PreferenceRecord], branches: Sequence[str] | None = None) -> dict[str, Any]:
        """branches: only these rows, in this order (e.g. ("chosen", "rejected") or ("corrupted",): the
        reference pass); default all of the objective's [chosen | rejected | corrupted]."""
        if not records:
            raise ValueError("PreferenceCollator: empty list of records")
        if self.with_corrupted and self.corruption.strategy == "random_image" and self.image_pool is None:
            raise ValueError("corruption strategy 'random_image' needs image_pool= (or set_image_pool(records))")
        chosen_rows, rejected_rows, corrupted_rows = [], [], []
        for record in records:
            image = load_image(record, self.decode_pixels) if self.with_image else None
            prompt = self.encode_prompt(record, image)
            bad_prompt = None
            if self.with_corrupted:
                bad_image = corrupt_image(image, record.sample_id, self.epoch, self.corruption,
                                          pool=self.image_pool, own_path=record.image_path)
                bad_prompt = self.encode_prompt(record, bad_image)
            chosen = self._encode_response(record.chosen, prompt)
            if self.truncate_response:  # one cut of y_w for its chosen and corrupted rows
                longest = max(len(p["tokens"]["input_ids"]) for p in (prompt, bad_prompt) if p is not None)
                chosen = self._cut_response(chosen, longest)
            chosen_rows.append(self._row(record, prompt, chosen))
            if self.objective != "sft":  # sft: B chosen rows only
                rejected = self._encode_response(record.rejected, prompt)
                if self.truncate_response:
                    rejected = self._cut_response(rejected, len(prompt["tokens"]["input_ids"]))
                rejected_rows.append(self._row(record, prompt, rejected))
            if bad_prompt is not None:
                corrupted_rows.append(self._row(record, bad_prompt, chosen))
        rows = {"chosen": chosen_rows, "rejected": rejected_rows, "corrupted": corrupted_rows}
        if branches is not None and (set(branches) - set(rows) or not all(rows[b] for b in branches)):
            raise ValueError(f"branches={list(branches)}: this collator builds {[b for b in rows if rows[b]]}")
        batch = self._stack([row for name in (branches or rows) for row in rows[name]])
        batch["sample_ids"] = [r.sample_id for r in records]
        batch["num_pairs"] = len(records)
        return batch

    def prompt_text(self, record: PreferenceRecord, with_image: bool = True) -> str:
        """The prompt text handed to the processor, with the family's image placeholder (or none)."""
        if record.shape == "paper" and self.prompt_template == "verbatim":
            return self._map_paper_prompt(record.prompt, with_image)
        messages = self.prompt_messages(record, with_image)
        template = getattr(self.processor, "chat_template", None)
        if template is None:
            if self.family == "paligemma":  # no chat template: the user text is the prefix
                question = "\n".join(item["text"] for m in messages if m.get("role") == "user"
                                     for item in m["content"] if item.get("type") == "text")
                return (IMAGE_PLACEHOLDER if with_image else "") + question
            hint = "; set data.prompt_template: verbatim to use paper prompts as written" if record.shape == "paper" else ""
            raise BadRecordError(record.index, record.sample_id, f"processor {type(self.processor).__name__} has no chat "
                                 f"template, needed to render {record.shape}-shape records{hint}")
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prompt_messages(self, record: PreferenceRecord, with_image: bool = True) -> list[dict]:
        """The record's prompt as chat messages with typed content items (system_prompt added where
        the conversation has no system message); the image item left out when with_image is False."""
        if record.shape == "paper":
            try:
                _, messages = split_paper_prompt(record.prompt)
            except ValueError as err:
                raise BadRecordError(record.index, record.sample_id, str(err)) from None
        elif record.shape == "plain":
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record.question}]}]
        else:
            messages = [dict(m) for m in record.prompt]
        if not with_image:
            for m in messages:
                if isinstance(m.get("content"), list):
                    m["content"] = [c for c in m["content"] if not (isinstance(c, dict) and c.get("type") == "image")]
        if self.system_prompt is not None and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}] + messages
        return messages

    def describe_prompts(self, records: Sequence[PreferenceRecord] = ()) -> str:
        """One line saying how this collator renders the prompts of `records` (the trainer prints it once)."""
        via = ("the processor's chat template" if getattr(self.processor, "chat_template", None) is not None
               else "no chat template (the image, then the user text)")
        if self.prompt_template == "verbatim":
            paper = f"used as written (only '<image>' mapped to the {self.family} placeholder)"
        else:
            paper = f"re-rendered from their recovered system text and turns with {via}"
        counts = getattr(records, "shape_counts", None)  # a RecordTable: counted at validation
        n_paper = counts.get("paper", 0) if counts is not None else sum(1 for r in records if r.shape == "paper")
        parts = [f"{n_paper} paper-shape record(s) {paper}"] if n_paper else []
        if len(records) > n_paper:
            parts.append(f"{len(records) - n_paper} plain / TRL-shape record(s) rendered with {via}")
        if not records:
            parts.append(f"paper-shape records {paper}, the other shapes rendered with {via}")
        system = f"; system prompt {self.system_prompt!r} where a record has none" if self.system_prompt else ""
        return (f"prompts (data.prompt_template: {self.prompt_template}): {'; '.join(parts)} "
                f"({type(self.processor).__name__}){system}")

    def measure(self, record: PreferenceRecord) -> dict[str, int]:
        """Token counts of a record's rows before truncation (with its image):
        prompt, protected (image + special tokens of the prompt), chosen, rejected (EOS included)."""
        image = load_image(record, self.decode_pixels) if self.with_image else None
        prompt = self.encode_prompt(record, image)
        ids = prompt["tokens"]["input_ids"]
        return {
            "prompt": len(ids),
            "protected": sum(1 for i in ids if i in self.protected_ids),
            "chosen": len(self._encode_response(record.chosen, prompt)),
            "rejected": len(self._encode_response(record.rejected, prompt)),
        }

    def check_fits(self, record: PreferenceRecord) -> None:
        """Raise BadRecordError if a row of `record` cannot fit in max_length even with all prompt text cut
        (with truncate_response: even with the response cut to one token)."""
        n = self.measure(record)
        need = n["protected"] + (1 if self.truncate_response else max(n["chosen"], n["rejected"]))
        if need > self.max_length:
            raise BadRecordError(record.index, record.sample_id, self._too_long(n["prompt"], n["protected"],
                                                                                max(n["chosen"], n["rejected"])))

    # ------------------------------------------------------------------------------ internals
    def _pixel_budget(self, max_pixels: int | None, min_pixels: int | None) -> dict[str, Any]:
        """The image-processor call arguments for max_pixels / min_pixels ({} when both are None)."""
        if max_pixels is None and min_pixels is None:
            return {}
        for name, value in (("max_pixels", max_pixels), ("min_pixels", min_pixels)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"data.{name}={value!r} must be a positive integer (pixels per image)")
        if self.family not in PIXEL_BUDGET_FAMILIES:
            raise ConfigError(
                f"data.max_pixels / data.min_pixels apply to the families with dynamic resolution "
                f"({', '.join(PIXEL_BUDGET_FAMILIES)}); the {self.family} image processor resizes every image to one "
                f"fixed size, so leave them unset (null)")
        image_processor = self.processor.image_processor
        size = getattr(image_processor, "size", None) or {}
        get = size.get if hasattr(size, "get") else (lambda key: getattr(size, key, None))
        low = next((v for v in (min_pixels, get("shortest_edge"), getattr(image_processor, "min_pixels", None))
                    if v is not None), None)
        high = next((v for v in (max_pixels, get("longest_edge"), getattr(image_processor, "max_pixels", None))
                     if v is not None), None)
        if low is None or high is None:
            missing = "data.min_pixels" if low is None else "data.max_pixels"
            raise ConfigError(f"the image processor {type(image_processor).__name__} names no pixel bound of its own; "
                              f"set {missing} too")
        if low > high:
            if min_pixels is not None and max_pixels is not None:
                raise ConfigError(f"data.min_pixels={min_pixels} is larger than data.max_pixels={max_pixels}")
            low, high = (high, high) if max_pixels is not None else (low, low)  # the one given wins
        return {"size": {"shortest_edge": int(low), "longest_edge": int(high)}}

    def _cut_response(self, response: list[int], prompt_len: int) -> list[int]:
        """truncate_response: the response's first max_length − prompt_len ids (at least one); a cut
        response loses its EOS with its tail."""
        return response[: max(1, self.max_length - prompt_len)]

    def _map_paper_prompt(self, prompt: str, with_image: bool) -> str:
        if not with_image:
            return prompt.replace(IMAGE_PLACEHOLDER + "\n", "", 1).replace(IMAGE_PLACEHOLDER, "", 1)
        if self.family == "paligemma":
            rest = prompt.replace(IMAGE_PLACEHOLDER + "\n", "", 1).replace(IMAGE_PLACEHOLDER, "", 1)
            return IMAGE_PLACEHOLDER + rest
        if self.family in ("qwen2-vl", "qwen2.5-vl"):
            return prompt.replace(IMAGE_PLACEHOLDER, _QWEN_PLACEHOLDER, 1)
        if self.family == "generic" and self.image_token != IMAGE_PLACEHOLDER:
            return prompt.replace(IMAGE_PLACEHOLDER, self.image_token, 1)
        return prompt

    def encode_prompt(self, record: PreferenceRecord, image) -> dict[str, Any]:
        """Run the processor on the prompt (and image): {"tokens": per-token lists (input_ids, attention_mask,
        family keys), "pixels": the pixel tensors, "text": the prompt text}. The one place prompts are
        rendered: training rows, the reference pass and generation all go through it."""
        text = self.prompt_text(record, with_image=image is not None)
        tok = self.tokenizer
        if image is None:
            if self.family == "paligemma":  # what PaliGemma's processor does around a prefix
                enc = tok((tok.bos_token or "") + text + "\n", add_special_tokens=False)
                tokens = {"input_ids": list(enc["input_ids"]), "attention_mask": [1] * len(enc["input_ids"])}
                tokens["token_type_ids"] = [0] * len(tokens["input_ids"])
            else:
                enc = tok(text)
                tokens = {"input_ids": list(enc["input_ids"]), "attention_mask": list(enc["attention_mask"])}
                if self.family in ("qwen2-vl", "qwen2.5-vl"):
                    tokens["mm_token_type_ids"] = [0] * len(tokens["input_ids"])
            return {"tokens": self._drop_double_bos(tokens), "pixels": {}, "text": text}
        try:
            out = self.processor(text=[text], images=[image], return_tensors="pt", **self.image_kwargs)
        except Exception as err:  # noqa: BLE001 — name the record, keep the processor's message
            raise BadRecordError(record.index, record.sample_id,
                                 f"the processor failed on this record: {type(err).__name__}: {err}") from err
        length = out["input_ids"].shape[-1]
        tokens, pixels = {}, {}
        for key, value in out.items():
            if key == "labels":  # PaliGemma's processor makes its own; ours are built below
                continue
            if key in _TOKEN_KEY_FILL or (key.endswith("token_type_ids") and torch.is_tensor(value)
                                          and value.dim() == 2 and value.shape[-1] == length):
                tokens[key] = value[0].tolist()
            elif torch.is_tensor(value):
                pixels[key] = value
        if int(sum(1 for i in tokens["input_ids"] if i == self.image_token_id)) == 0:
            raise BadRecordError(record.index, record.sample_id,
                                 f"no image token {self.image_token!r} in the processed prompt: {text[:120]!r}")
        return {"tokens": self._drop_double_bos(tokens), "pixels": pixels, "text": text}

    def _drop_double_bos(self, tokens: dict[str, list[int]]) -> dict[str, list[int]]:
        """A chat template that writes BOS itself plus a tokenizer that adds one gives two: keep one."""
        bos = self.tokenizer.bos_token_id
        ids = tokens["input_ids"]
        if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            tokens = {k: v[1:] for k, v in tokens.items()}
        return tokens

    def _encode_response(self, text: str, prompt: dict[str, Any]) -> list[int]:
        """Response ids (no special tokens) + EOS. A leading space is added after a prompt that does
        not end in whitespace, for tokenizers that do not mark word starts themselves."""
        tok = self.tokenizer
        ids = prompt["tokens"]["input_ids"]
        if not text[:1].isspace() and not self._spm_style and ids:
            last = tok.decode(ids[-1:])
            if last and not last[-1].isspace():
                text = " " + text
        response = list(tok(text, add_special_tokens=False)["input_ids"])
        if not response or response[-1] != self.eos_id:
            response.append(self.eos_id)
        return response

    def _too_long(self, prompt_len: int, protected: int, response_len: int) -> str:
        if self.truncate_response:
            what = ("the image and special tokens alone leave no room for one response token "
                    f"(data.truncate_response: true already cuts the {response_len}-token response)")
            fix = _FIX_TOO_LONG.replace(", set data.truncate_response: true", "")
        else:
            what = (f"the response has {response_len} tokens (EOS included), so at least {protected + response_len} "
                    "tokens remain after cutting all prompt text")
            fix = _FIX_TOO_LONG
        return (f"too long for max_length={self.max_length}: the prompt has {prompt_len} tokens of which {protected} "
                f"are image or special tokens that are never cut, and {what}; to fix: {fix}")

    def _row(self, record: PreferenceRecord, prompt: dict[str, Any], response: list[int]) -> dict[str, Any]:
        """One row: prompt tokens (truncated if needed) + response; labels; the pixel inputs."""
        tokens = prompt["tokens"]
        ids = tokens["input_ids"]
        excess = len(ids) + len(response) - self.max_length
        keep = list(range(len(ids)))
        if excess > 0:
            cuttable = [i for i, t in enumerate(ids) if t not in self.protected_ids]
            if "mm_token_type_ids" in tokens:  # also never cut what the processor marks as image
                cuttable = [i for i in cuttable if tokens["mm_token_type_ids"][i] == 0]
            if len(cuttable) < excess:
                raise BadRecordError(record.index, record.sample_id,
                                     self._too_long(len(ids), len(ids) - len(cuttable), len(response)))
            dropped = set(cuttable[:excess])  # oldest prompt text first
            keep = [i for i in keep if i not in dropped]
        row = {}
        for key, values in tokens.items():
            kept = [values[i] for i in keep]
            extra = response if key == "input_ids" else [_TOKEN_KEY_FILL.get(key, (0, 0))[0]] * len(response)
            row[key] = kept + extra
        row["labels"] = [-100] * len(keep) + response
        row["pixels"] = prompt["pixels"]
        return row

    def _stack(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        length = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, Any] = {}
        token_keys = [k for k in rows[0] if k not in ("pixels",)]
        for key in token_keys:
            if key == "labels":
                pad = -100
            elif key == "input_ids":
                pad = self.pad_id
            else:
                pad = _TOKEN_KEY_FILL.get(key, (0, 0))[1]
            batch[key] = torch.tensor([r[key] + [pad] * (length - len(r[key])) for r in rows], dtype=torch.long)
        for key in rows[0]["pixels"]:
            batch[key] = _concat_padded([r["pixels"][key] for r in rows])
        return batch


def _concat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0; tensors that differ in other dims are zero-padded to the largest."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    if all(list(t.shape[1:]) == shape for t in tensors):
        return torch.cat(tensors, dim=0)
    padded = []
    for t in tensors:
        out = t.new_zeros((t.shape[0], *shape))
        out[(slice(None),) + tuple(slice(0, s) for s in t.shape[1:])] = t
        padded.append(out)
    return torch.cat(padded, dim=0)
