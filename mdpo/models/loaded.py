"""What a loaded model is (`LoadedModel`) and the dtype / attention choices made when loading one: kept
apart from `loading` (folders) and `presets` (tiny random models), which both build on it."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError
from .adapters import FamilyAdapter

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass
class LoadedModel:
    """A model ready for the trainer: the HF model, its processor and the family adapter."""

    model: nn.Module | None  # …ForConditionalGeneration (a peft PeftModel after apply_lora); None before the weights load
    processor: Any  # the family's ProcessorMixin (tokenizer + image processor)
    adapter: FamilyAdapter
    family: str
    source: str = ""  # folder or preset name it came from (for fingerprints and messages)


def choose_attn_implementation(device: str | torch.device | None) -> str:
    """'flash_attention_2' on CUDA when flash-attn is importable, else 'sdpa'. Never requires flash-attn."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        try:
            import flash_attn  # noqa: F401  (a broken build fails here, not mid-forward)
        except Exception:  # pragma: no cover - depends on the machine
            return "sdpa"
        return "flash_attention_2"
    return "sdpa"


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """torch dtype from a name ('bf16', 'float32', …); None → bf16 on CUDA, fp32 elsewhere."""
    if dtype is None or dtype == "auto":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ModelLoadError(f"dtype must be a floating type (fp32, bf16, fp16), got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ModelLoadError(f"dtype {dtype!r} not understood; use one of {sorted(_DTYPES)} or 'auto'")
