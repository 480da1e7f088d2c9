"""Records → one batch for one policy forward: rows [chosen | rejected | corrupted].

For B records the batch has 3B rows (2B for the objectives without a corrupted branch):

    rows 0 … B-1     chosen     original image m_w, chosen response y_w
    rows B … 2B-1    rejected   original image m_w, rejected response y_l
    rows 2B … 3B-1   corrupted  corrupted image m_l, chosen response y_w   (mdpo, mdpo_no_anchor)

`dpo_no_image` (the paper's "DPO (No Image)") has 2B text-only rows: no image, no placeholder, no
pixel inputs.

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

Truncation to `max_length` cuts prompt text only, oldest first (system prompt, then the start of the
question), and never an image token or a special token (BOS, `<|vision_start|>`, `<|im_start|>` …);
the response is always kept whole. A row that still does not fit makes its record bad
(`BadRecordError`); `load_records(..., processor, max_length)` finds such records up front.

The paper shape's prompt is already templated for some model, with "<image>" as its placeholder.
For a family whose placeholder differs, "<image>" is replaced by the family's own (Qwen:
`<|vision_start|><|image_pad|><|vision_end|>`); for PaliGemma the placeholder is moved to the start
(its processor wants the image tokens first). The rest of that template is kept as written, so train
a model on paper-shape prompts only if that template is the model's own; the plain and TRL shapes
use the processor's chat template instead.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from .corruption import CorruptionConfig, ImagePool, corrupt_image
from .records import IMAGE_PLACEHOLDER, BadRecordError, PreferenceRecord, load_image

# Objectives that need the corrupted branch (3B rows); every other objective gets 2B rows.
OBJECTIVES_WITH_CORRUPTED = ("mdpo", "mdpo_no_anchor")
OBJECTIVES = ("mdpo", "mdpo_no_anchor", "mdpo_no_conditional", "dpo", "dpo_no_image")
FAMILIES = ("llava", "qwen2-vl", "qwen2.5-vl", "idefics3", "smolvlm", "paligemma", "generic")
_QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
# Per-token keys: value appended for response tokens, value used for padding.
_TOKEN_KEY_FILL = {
    "input_ids": (None, None),  # response ids / the pad id
    "attention_mask": (1, 0),
    "token_type_ids": (1, 0),  # PaliGemma: 1 = suffix (causal), 0 = prefix (bidirectional)
    "mm_token_type_ids": (0, 0),  # Qwen2-VL / Idefics3: 1 = image token
}


def load_processor(path_or_processor: Any):
    """A processor object from a local folder (offline), "tiny:FAMILY", or the object itself.

    Registers the tiny image-only Qwen processors first, so folders written by
    `mdpo.tiny_processors.build_tiny_processor(..., save_dir)` load here without torchvision.
    """
    if not isinstance(path_or_processor, (str, os.PathLike)):
        return path_or_processor
    if str(path_or_processor).startswith("tiny:"):  # e.g. "tiny:llava": the offline tiny processor
        from ..tiny_processors import build_tiny_processor

        return build_tiny_processor(str(path_or_processor)[len("tiny:"):])
    from transformers import AutoProcessor

    from ..tiny_processors import register_auto_classes

    register_auto_classes()
    return AutoProcessor.from_pretrained(str(path_or_processor), local_files_only=True)


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
        (2B text-only rows).
    max_length: tokens per row, image tokens included.
    corruption: how the corrupted image is made (only used with a corrupted branch).
    family: llava | qwen2-vl | qwen2.5-vl | idefics3 | smolvlm | paligemma (default: from the
        processor's class; "generic" uses `processor.image_token` as the placeholder).
    image_pool: records (or an ImagePool) that `random_image` draws from; also `set_image_pool`.
    system_prompt: optional system message for the plain and TRL shapes.
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
    ):
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
        self.image_pool = records if isinstance(records, ImagePool) else ImagePool(records)

    def __call__(self, records: Sequence[PreferenceRecord]) -> dict[str, Any]:
        if not records:
            raise ValueError("PreferenceCollator: empty list of records")
        if self.with_corrupted and self.corruption.strategy == "random_image" and self.image_pool is None:
            raise ValueError("corruption strategy 'random_image' needs image_pool= (or set_image_pool(records))")
        chosen_rows, rejected_rows, corrupted_rows = [], [], []
        for record in records:
            image = load_image(record) if self.with_image else None
            prompt = self.encode_prompt(record, image)
            chosen = self._encode_response(record.chosen, prompt)
            chosen_rows.append(self._row(record, prompt, chosen))
            rejected_rows.append(self._row(record, prompt, self._encode_response(record.rejected, prompt)))
            if self.with_corrupted:
                bad_image = corrupt_image(image, record.sample_id, self.epoch, self.corruption,
                                          pool=self.image_pool, own_path=record.image_path)
                corrupted_rows.append(self._row(record, self.encode_prompt(record, bad_image), chosen))
        batch = self._stack(chosen_rows + rejected_rows + corrupted_rows)
        batch["sample_ids"] = [r.sample_id for r in records]
        batch["num_pairs"] = len(records)
        return batch

    def prompt_text(self, record: PreferenceRecord, with_image: bool = True) -> str:
        """The prompt text handed to the processor, with the family's image placeholder (or none)."""
        if record.shape == "paper":
            return self._map_paper_prompt(record.prompt, with_image)
        if record.shape == "plain":
            content = [{"type": "image"}] if with_image else []
            messages = [{"role": "user", "content": content + [{"type": "text", "text": record.question}]}]
        else:
            messages = [dict(m) for m in record.prompt]
            if not with_image:
                for m in messages:
                    if isinstance(m.get("content"), list):
                        m["content"] = [c for c in m["content"] if not (isinstance(c, dict) and c.get("type") == "image")]
        if self.system_prompt is not None and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}] + messages
        template = getattr(self.processor, "chat_template", None)
        if template is None:
            if self.family == "paligemma":  # no chat template: the question is the prefix
                question = record.question if record.question is not None else record.display_question
                return (IMAGE_PLACEHOLDER if with_image else "") + question
            raise ValueError(
                f"processor {type(self.processor).__name__} has no chat template, needed for {record.shape}-shape records"
            )
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def measure(self, record: PreferenceRecord) -> dict[str, int]:
        """Token counts of a record's rows before truncation (with its image):
        prompt, protected (image + special tokens of the prompt), chosen, rejected (EOS included)."""
        image = load_image(record) if self.with_image else None
        prompt = self.encode_prompt(record, image)
        ids = prompt["tokens"]["input_ids"]
        return {
            "prompt": len(ids),
            "protected": sum(1 for i in ids if i in self.protected_ids),
            "chosen": len(self._encode_response(record.chosen, prompt)),
            "rejected": len(self._encode_response(record.rejected, prompt)),
        }

    def check_fits(self, record: PreferenceRecord) -> None:
        """Raise BadRecordError if a row of `record` cannot fit in max_length even with all prompt text cut."""
        n = self.measure(record)
        need = n["protected"] + max(n["chosen"], n["rejected"])
        if need > self.max_length:
            raise BadRecordError(record.index, record.sample_id, self._too_long(n["prompt"], n["protected"],
                                                                                max(n["chosen"], n["rejected"])))

    # ------------------------------------------------------------------------------ internals
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
            out = self.processor(text=[text], images=[image], return_tensors="pt")
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
        return (
            f"too long for max_length={self.max_length}: the prompt has {prompt_len} tokens of which {protected} "
            f"are image or special tokens that are never cut, and the response {response_len} tokens "
            f"(EOS included), so at least {protected + response_len} tokens remain after cutting all prompt text"
        )

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
