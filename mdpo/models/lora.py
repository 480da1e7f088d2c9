"""What gets trained: LoRA on the language model's linear layers, or the language model in full.

The paper's setting (mDPO §4): LoRA r = 64, α = 128, dropout 0.05 on every linear layer of the
language model; the vision tower and the multimodal projector are frozen and carry no adapters; the LM
head is not adapted (its weight feeds the fused loss directly).
"""
from __future__ import annotations

import re
import warnings
from typing import Sequence

from torch import nn

from .adapters import FamilyAdapter, get_adapter


def _adapter(family: str | FamilyAdapter) -> FamilyAdapter:
    return family if isinstance(family, FamilyAdapter) else get_adapter(family)


def language_model_linear_names(model: nn.Module, family: str | FamilyAdapter) -> list[str]:
    """Qualified names of every nn.Linear inside the language model (lm_head is outside it)."""
    adapter = _adapter(family)
    base = adapter.unwrap(model)
    prefix = adapter.language_model_prefix + "."
    return [n for n, m in base.named_modules() if n.startswith(prefix) and isinstance(m, nn.Linear)]


def apply_lora(
    model: nn.Module,
    family: str | FamilyAdapter,
    r: int = 64,
    alpha: int = 128,
    dropout: float = 0.05,
    target: str | Sequence[str] = "all-linear-language",
):
    """Wrap `model` in a peft PeftModel with LoRA on the language model's linear layers only.

    target: 'all-linear-language' (every nn.Linear of the language model), or a list of leaf names
        such as ['q_proj', 'v_proj'] restricted to the language model.
    Every base parameter ends up frozen; only the LoRA A/B matrices train. Returns the PeftModel.
    """
    from peft import LoraConfig, get_peft_model

    adapter = _adapter(family)
    if int(r) <= 0:
        raise ValueError(f"LoRA r must be positive, got {r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    linear_names = language_model_linear_names(model, adapter)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
    if isinstance(target, str):
        if target != "all-linear-language":
            raise ValueError(f"LoRA target {target!r} not understood; use 'all-linear-language' or a list of "
                             f"layer names among {leaves}")
    else:
        unknown = sorted(set(target) - set(leaves))
        if unknown or not target:
            raise ValueError(f"LoRA target names {unknown or list(target)} are not linear layers of the "
                             f"{adapter.family} language model; choose among {leaves}")
        leaves = sorted(set(target))
    # One regex on full module names: the language-model prefix AND a linear leaf name, so vision
    # tower, projector and lm_head can never match (peft uses re.fullmatch for a string target).
    pattern = rf"{re.escape(adapter.language_model_prefix)}\.(?:.*\.)?(?:{'|'.join(map(re.escape, leaves))})"
    config = LoraConfig(
        r=int(r), lora_alpha=alpha, lora_dropout=float(dropout), bias="none",
        target_modules=pattern, task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft reads the deprecated `is_gradient_checkpointing` property
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    _check_lora_placement(peft_model, adapter)
    return peft_model


def _check_lora_placement(peft_model: nn.Module, adapter: FamilyAdapter) -> None:
    """Every LoRA layer must sit inside the language model (defends the regex above)."""
    base = adapter.unwrap(peft_model)
    prefix = adapter.language_model_prefix + "."
    adapted = [n for n, m in base.named_modules() if hasattr(m, "lora_A") and n]
    stray = [n for n in adapted if not n.startswith(prefix)]
    if stray or not adapted:
        raise RuntimeError(f"LoRA placement wrong for {adapter.family}: {stray or 'no layer adapted'}")


def freeze_for_full_finetune(model: nn.Module, family: str | FamilyAdapter, train_lm_head: bool = True) -> nn.Module:
    """Train the language model (and, by default, the LM head); freeze vision tower and projector.

    With tied embeddings (PaliGemma) the LM head weight *is* the input embedding, so it trains with
    the language model whatever `train_lm_head` says. Returns the same model.
    """
    adapter = _adapter(family)
    base = adapter.unwrap(model)
    base.requires_grad_(False)
    adapter.language_model(base).requires_grad_(True)
    if train_lm_head:
        base.lm_head.requires_grad_(True)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Activation checkpointing of every decoder layer, non-reentrant, on a plain or peft model.

    The non-reentrant implementation needs no input that requires grad, so LoRA under frozen
    embeddings gets its gradients without `enable_input_require_grads` (which would also hook the
    frozen vision tower's embeddings and run a useless backward through it). Turns the KV cache off.
    Call it after `apply_lora` (peft otherwise hooks every input embedding to require grad).
    Returns the same model.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers ≥ 5.x name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(base.config, "use_cache", None) is not None:
        base.config.use_cache = False
    return model


def trainable_parameter_counts(model: nn.Module, family: str | FamilyAdapter | None = None) -> dict[str, int]:
    """Parameter counts: {'trainable', 'total', and per part: 'language_model', 'vision', 'lm_head', 'lora'}.

    Per-part counts are of *trainable* parameters; a tied LM head is counted once (in the language
    model). Without `family` only 'trainable', 'total' and 'lora' are given.
    """
    counts = {"trainable": 0, "total": 0, "lora": 0}
    seen: set[int] = set()
    adapter = _adapter(family) if family is not None else None
    base = adapter.unwrap(model) if adapter is not None else model
    if adapter is not None:
        counts.update(language_model=0, vision=0, lm_head=0)
        lm_prefix = adapter.language_model_prefix + "."
        frozen = tuple(p + "." for p in adapter.frozen_prefixes)
    for name, p in base.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        counts["total"] += p.numel()
        if not p.requires_grad:
            continue
        counts["trainable"] += p.numel()
        if "lora_" in name:
            counts["lora"] += p.numel()
        if adapter is not None:
            if name.startswith(lm_prefix):
                counts["language_model"] += p.numel()
            elif name.startswith(frozen):
                counts["vision"] += p.numel()
            elif name.startswith("lm_head."):
                counts["lm_head"] += p.numel()
    return counts
