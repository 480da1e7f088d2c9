"""One small adapter per vision-language model family.

An adapter knows three things about a family's `…ForConditionalGeneration` model:

- where the language model sits (`model.model.language_model` or `model.model.text_model`), so LoRA
  and full fine-tuning touch it and nothing else (vision tower and projector stay frozen);
- which batch keys the inner base model takes (token ids, masks and the family's pixel inputs);
- that the logits are exactly `lm_head(last_hidden_state)` — no soft-capping or scaling after the head —
  so the loss can run through `linear_sequence_logprobs(hidden, weight, labels)` and the (R, T, V)
  logits are never built.

`hidden_states` calls the inner base model (`model.model`, the transformers 5 layout of every family
here), never the top-level forward, which would apply the LM head. It works on a plain model, on a
peft `PeftModel` (LoRA layers are injected in place, so `with model.disable_adapter():` is honoured),
and on a `HiddenStatesModel` (below), the wrapper to hand to DDP/FSDP so their forward hooks run.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ModelLoadError, UnsupportedModelError

# Keys every family's inner model takes besides its pixel inputs.
_TEXT_KEYS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")


class FamilyAdapter:
    """What the trainer needs to know about one model family. Subclasses set the class attributes."""

    family: str = ""
    model_types: tuple[str, ...] = ()  # config.model_type values this adapter serves
    model_classes: Mapping[str, str] = {}  # model_type -> transformers class name
    language_model_attr: str = "language_model"  # attribute of `model.model` holding the decoder
    frozen_module_attrs: tuple[str, ...] = ()  # attributes of `model.model` never trained (vision, projector)
    pixel_keys: tuple[str, ...] = ()  # batch keys the inner model takes besides _TEXT_KEYS

    # ---- locating modules --------------------------------------------------------------------
    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The `…ForConditionalGeneration` module under peft / HiddenStatesModel wrappers."""
        if isinstance(model, HiddenStatesModel):
            model = model.model
        if _is_distributed_wrapper(model):
            raise TypeError(
                "adapter got a DDP/FSDP-wrapped model; calling its inner modules would skip the wrapper's "
                "gradient sync. Wrap the model in mdpo.models.HiddenStatesModel before accelerator.prepare "
                "and call that wrapper instead."
            )
        if hasattr(model, "get_base_model"):  # peft.PeftModel; LoRA layers live inside the base model
            model = model.get_base_model()
        if not hasattr(model, "model") or not hasattr(model, "lm_head"):
            raise TypeError(
                f"{type(model).__name__} is not a vision-language …ForConditionalGeneration model "
                "(expected `.model` and `.lm_head` attributes)"
            )
        return model

    def inner_model(self, model: nn.Module) -> nn.Module:
        """The base model without LM head: vision tower + projector + language model."""
        return self.unwrap(model).model

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder whose last hidden state feeds the LM head."""
        return getattr(self.inner_model(model), self.language_model_attr)

    @property
    def language_model_prefix(self) -> str:
        """Qualified name of the language model inside the `…ForConditionalGeneration` module."""
        return f"model.{self.language_model_attr}"

    @property
    def frozen_prefixes(self) -> tuple[str, ...]:
        return tuple(f"model.{name}" for name in self.frozen_module_attrs)

    # ---- the two things the loss needs ---------------------------------------------------------
    def model_inputs(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch keys the inner model takes (labels, sample ids, … dropped; None values dropped)."""
        keys = _TEXT_KEYS + self.pixel_keys
        inputs = {k: batch[k] for k in keys if batch.get(k) is not None}
        if "input_ids" not in inputs and "inputs_embeds" not in inputs:
            raise KeyError(f"batch has neither 'input_ids' nor 'inputs_embeds' (keys: {sorted(batch)})")
        return inputs

    def hidden_states(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """Last hidden states of the language model, after its final norm, before the LM head.

        batch: the collator's dict (input_ids (R, T), attention_mask (R, T), the family's pixel inputs,
        extra keys ignored). Returns (R, T, H) in the model's dtype; `lm_head(hidden)` equals the
        full model's logits.
        """
        inner = self.inner_model(model)
        out = inner(**self.model_inputs(model, batch), use_cache=False, return_dict=True)
        return out.last_hidden_state

    def lm_head_module(self, model: nn.Module) -> nn.Module:
        """The LM head module (an `nn.Linear`; `mdpo.scoring.FusedLMHead` once the scorer fused it)."""
        while _is_distributed_wrapper(model):
            model = model.module
        if isinstance(model, HiddenStatesModel):
            model = model.model
        head = self.unwrap(model).lm_head
        if hasattr(head, "base_layer"):  # a peft-wrapped head; its LoRA delta is not in `weight`
            raise ValueError("the LM head carries a LoRA adapter; apply_lora keeps lm_head out of LoRA")
        return head

    def lm_head(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (V, H), bias (V,) or None) of the LM head, as used by the full model's forward.

        Outside a forward, under FSDP2 / ZeRO-3 these are shards: the scorer calls the head module
        instead (`mdpo.scoring.FusedLMHead`)."""
        head = self.lm_head_module(model)
        return head.weight, head.bias

    def check_fused_head(self, model: nn.Module) -> None:
        """Refuse models whose logits are not exactly lm_head(hidden) (e.g. Gemma-2 soft-capping)."""
        base = self.unwrap(model)
        text_config = base.config.get_text_config()
        softcap = getattr(text_config, "final_logit_softcapping", None)
        if softcap is not None:
            raise UnsupportedModelError(
                f"{self.family}: model_type {text_config.model_type!r} soft-caps its logits "
                f"(final_logit_softcapping={softcap}); the fused LM-head loss computes plain "
                "hidden @ weightᵀ and would give different numbers"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r})"


class LlavaAdapter(FamilyAdapter):
    """LLaVA-1.5 (`llava`) and LLaVA-NeXT (`llava_next`, any-resolution tiles with `image_sizes`)."""

    family = "llava"
    model_types = ("llava", "llava_next")
    model_classes = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}
    language_model_attr = "language_model"
    frozen_module_attrs = ("vision_tower", "multi_modal_projector")
    pixel_keys = ("pixel_values", "image_sizes")


class Qwen2VLAdapter(FamilyAdapter):
    """Qwen2-VL: flattened patches `pixel_values` (N_patches, C·T·P·P) with `image_grid_thw` (images, 3).

    M-RoPE positions need `mm_token_type_ids` (0 text, 1 image, 2 video); Qwen2.5-VL silently falls
    back to 1-D positions without it, so it is rebuilt from the image/video token ids when missing.
    """

    family = "qwen2-vl"
    model_types = ("qwen2_vl",)
    model_classes = {"qwen2_vl": "Qwen2VLForConditionalGeneration"}
    language_model_attr = "language_model"
    frozen_module_attrs = ("visual",)  # the patch merger (projector) is `visual.merger`
    pixel_keys = (
        "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids",
    )

    def model_inputs(self, model, batch):
        inputs = super().model_inputs(model, batch)
        has_vision = "image_grid_thw" in inputs or "video_grid_thw" in inputs
        if has_vision and "mm_token_type_ids" not in inputs and "input_ids" in inputs:
            config = self.unwrap(model).config
            ids = inputs["input_ids"]
            types = torch.zeros_like(ids, dtype=torch.int32)
            types[ids == config.image_token_id] = 1
            types[ids == config.video_token_id] = 2
            inputs["mm_token_type_ids"] = types
        return inputs


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: as Qwen2-VL, plus `second_per_grid_ts` for videos."""

    family = "qwen2.5-vl"
    model_types = ("qwen2_5_vl",)
    model_classes = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
    pixel_keys = Qwen2VLAdapter.pixel_keys + ("second_per_grid_ts",)


class Idefics3Adapter(FamilyAdapter):
    """Idefics3 and SmolVLM: `pixel_values` (B, N_tiles, C, H, W) with `pixel_attention_mask`.

    The decoder is `model.model.text_model`; the projector is `model.model.connector`. SmolVLM
    (v1) checkpoints say model_type `idefics3`; SmolVLM2 says `smolvlm` (SmolVLMForConditionalGeneration).
    """

    family = "idefics3"
    model_types = ("idefics3", "smolvlm")
    model_classes = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}
    language_model_attr = "text_model"
    frozen_module_attrs = ("vision_model", "connector")
    pixel_keys = ("pixel_values", "pixel_attention_mask")


class PaliGemmaAdapter(FamilyAdapter):
    """PaliGemma: image tokens first; `token_type_ids` (0 prefix, 1 suffix) make the prefix bidirectional.

    PaliGemma 2 (Gemma-2 text model) soft-caps its logits and is refused by `check_fused_head`.
    """

    family = "paligemma"
    model_types = ("paligemma",)
    model_classes = {"paligemma": "PaliGemmaForConditionalGeneration"}
    language_model_attr = "language_model"
    frozen_module_attrs = ("vision_tower", "multi_modal_projector")
    pixel_keys = ("pixel_values", "token_type_ids")


_ADAPTERS: dict[str, FamilyAdapter] = {
    a.family: a for a in (LlavaAdapter(), Qwen2VLAdapter(), Qwen25VLAdapter(), Idefics3Adapter(), PaliGemmaAdapter())
}
# Other names a config or a user may give for a family.
_FAMILY_ALIASES = {
    "llava-1.5": "llava", "llava-next": "llava", "llava_next": "llava",
    "qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl", "qwen2.5_vl": "qwen2.5-vl",
    "smolvlm": "idefics3",
}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_ADAPTERS) + ("smolvlm",)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in _ADAPTERS.values() for t in a.model_types)


def get_adapter(family: str) -> FamilyAdapter:
    """The adapter for a family name (see SUPPORTED_FAMILIES; a few aliases such as 'smolvlm' too)."""
    if not isinstance(family, str):
        raise TypeError(f"family must be a string, got {type(family).__name__}")
    key = family.strip().lower()
    key = _FAMILY_ALIASES.get(key, key)
    if key not in _ADAPTERS:
        raise ModelLoadError(
            f"unsupported model family {family!r}; supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return _ADAPTERS[key]


def adapter_for_model_type(model_type: str, source: str = "") -> FamilyAdapter:
    """The adapter serving a `config.model_type`; a clear error listing the supported ones otherwise."""
    for adapter in _ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    where = f" (from {source})" if source else ""
    raise ModelLoadError(
        f"unsupported model_type {model_type!r}{where}; supported model types: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)} (families: {', '.join(SUPPORTED_FAMILIES)})"
    )


class HiddenStatesModel(nn.Module):
    """`forward(**batch) -> hidden (R, T, H)`: the module to hand to DDP / FSDP / accelerator.prepare.

    Distributed wrappers sync gradients through their own forward, so the trainer must call the
    wrapped module, not reach inside it. `self.model` is the HF or peft model (use
    `self.model.disable_adapter()` for reference passes); `lm_head()` gives the head's parameters.
    """

    def __init__(self, model: nn.Module, adapter: FamilyAdapter):
        super().__init__()
        self.model = model
        self.adapter = adapter

    def forward(self, **batch) -> torch.Tensor:
        return self.adapter.hidden_states(self.model, batch)

    def lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.adapter.lm_head(self.model)


def _is_distributed_wrapper(model: nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return True
    try:  # FSDP1 wraps the module; FSDP2 (fully_shard) shards in place and needs no check
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(model, FullyShardedDataParallel)
