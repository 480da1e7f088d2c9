"""What training, evaluation and generation all build from a `TrainConfig`: the model (with LoRA or
full fine-tuning), the corruption settings, the collator and the criterion.

`mdpo.train`, `mdpo.evaluate` and `mdpo.eval` import these from here, so none of them imports another.
"""
from __future__ import annotations

import copy
import random

import numpy as np
import torch

from .config import TrainConfig
from .loss import MDPOLoss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, device: torch.device):
    """Model + processor + adapter, with LoRA (or full fine-tuning of the language model)."""
    from .models import apply_lora, build_preset, enable_gradient_checkpointing, freeze_for_full_finetune, load_model

    if cfg.model.preset is not None:
        dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
        loaded = build_preset(cfg.model.preset, seed=cfg.seed, dtype=dtype)
    else:
        attn = None if cfg.model.attn_implementation == "auto" else cfg.model.attn_implementation
        loaded = load_model(cfg.model.path, family=cfg.model.family, dtype=cfg.model.dtype, attn_implementation=attn, device=device)
    reference_model = None
    if cfg.model.finetune == "lora":
        loaded.model = apply_lora(loaded.model, loaded.family, r=cfg.model.lora_r, alpha=cfg.model.lora_alpha, dropout=cfg.model.lora_dropout)
    else:
        freeze_for_full_finetune(loaded.model, loaded.family)
        if cfg.reference.mode == "live":  # the frozen reference is a separate copy of the initial weights
            reference_model = copy.deepcopy(loaded.model).eval().requires_grad_(False)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(loaded.model)
    loaded.model.train()
    return loaded, reference_model


def make_criterion(cfg: TrainConfig) -> MDPOLoss:
    return MDPOLoss(beta=cfg.loss.beta, delta=cfg.loss.delta, objective=cfg.objective, dpo_weight=cfg.loss.dpo_weight,
                    conditional_weight=cfg.loss.conditional_weight, anchor_weight=cfg.loss.anchor_weight,
                    rejected_anchor=cfg.loss.rejected_anchor, corrupted_anchor=cfg.loss.corrupted_anchor)


def make_collator(cfg: TrainConfig, loaded, corruption, records):
    """The [chosen | rejected | corrupted] collator of a record set (random_image draws from `records`)."""
    from .data import PreferenceCollator

    collator = PreferenceCollator(loaded.processor, objective=cfg.objective, max_length=cfg.data.max_length,
                                  corruption=corruption, family=loaded.family)
    if cfg.data.corruption == "random_image" and hasattr(collator, "set_image_pool"):
        collator.set_image_pool(records)
    return collator


def make_corruption(cfg: TrainConfig):
    """The run's `CorruptionConfig` (strategy, crop range, seed, one image for all epochs or not)."""
    from .data import CorruptionConfig

    return CorruptionConfig(strategy=cfg.data.corruption, area=tuple(cfg.data.crop_area), seed=cfg.data.corruption_seed,
                            same_every_epoch=cfg.data.same_corruption_every_epoch)
