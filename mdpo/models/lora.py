"""What gets trained: LoRA on the language model's linear layers, or the language model in full.

The paper's setting (mDPO §4): LoRA r = 64, α = 128, dropout 0.05 on every linear layer of the
language model; the vision tower and the multimodal projector are frozen and carry no adapters; the LM
head is not adapted (its weight feeds the fused loss directly).
"""
from __future__ import annotations

import re
import warnings
from typing import Sequence

import torch
from torch import nn

from ..config import ConfigError

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

    target: 'all-linear-language' (every nn.Linear of the language model), or a list of module-name
        suffixes such as ['q_proj', 'v_proj'] or ['self_attn.o_proj'], matched on whole name parts
        inside the language model only. A suffix that matches no linear layer there is a ConfigError
        naming it (and the layer names there are).
    Every base parameter ends up frozen; only the LoRA A/B matrices train. Returns the PeftModel.
    """
    from peft import LoraConfig, get_peft_model

    adapter = _adapter(family)
    if int(r) <= 0:
        raise ConfigError(f"model.lora_r must be positive, got {r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"model.lora_dropout must be in [0, 1), got {dropout}")
    linear_names = language_model_linear_names(model, adapter)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
    if isinstance(target, str):
        if target != "all-linear-language":
            raise ConfigError(f"LoRA target {target!r} not understood; use 'all-linear-language' or a list of "
                              f"layer names among {leaves}")
        selected = linear_names
    else:
        suffixes = [str(t).strip(".") for t in target]
        if not suffixes:
            raise ConfigError("model.lora_target_modules is an empty list; leave it unset (null) to adapt every "
                              f"linear layer of the language model, or choose among {leaves}")
        matches = {s: [n for n in linear_names if n == s or n.endswith("." + s)] for s in suffixes}
        unknown = [s for s, found in matches.items() if not found]
        if unknown:
            raise ConfigError(f"model.lora_target_modules: {', '.join(map(repr, unknown))} match(es) no linear layer of "
                              f"the {adapter.family} language model; its linear layers end in {leaves}")
        selected = sorted({n for found in matches.values() for n in found})
    # One regex of the selected full module names, so vision tower, projector and lm_head can never
    # match (peft uses re.fullmatch for a string target).
    pattern = "|".join(map(re.escape, selected))
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

    transformers' `activation_checkpointing_enable` (and peft's `get_peft_model` on a checkpointed
    model) call `enable_input_require_grads`, which hooks the input embeddings of *every* sub-model,
    the vision tower's patch embedding included: its output then requires grad and every step runs a
    backward through the whole frozen vision tower (same gradients, up to 2× the step time). Those
    hooks are removed here and one is put back on the language model's token embeddings only, the one
    a frozen-embedding LoRA needs so that checkpointed layers see an input that requires grad.
    Turns the KV cache off. Returns the same model.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers ≥ 5.x name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for module in base.modules():  # the hooks sit on the module that registered them (the top model)
        if hasattr(module, "disable_input_require_grads"):
            module.disable_input_require_grads()
    embeddings = base.get_input_embeddings()  # the language model's token embeddings in every family here
    base._require_grads_hooks = [embeddings.register_forward_hook(_output_requires_grad)]
    if getattr(base.config, "use_cache", None) is not None:
        base.config.use_cache = False
    return model


def _output_requires_grad(module, inputs, output):
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)


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
