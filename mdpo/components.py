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


def load_processor(cfg: TrainConfig):
    """The run's processor and family adapter, no weights (`LoadedModel` with model=None): cheap.

    Records are read and checked with it before `build_model` spends minutes loading weights; a missing
    folder, a folder without config.json, an unknown model_type, a family mismatch or a
    `model.quantization` this machine cannot do (no bitsandbytes) fail here.
    """
    from .models import load_processor_only
    from .models.quantization import check_quantization_available

    check_quantization_available(cfg.model.quantization, "cuda" if torch.cuda.is_available() else "cpu")
    return load_processor_only(cfg.model.preset if cfg.model.preset is not None else cfg.model.path, family=cfg.model.family)


def build_model(cfg: TrainConfig, device: torch.device, prepared=None):
    """Model + processor + adapter, with LoRA (or full fine-tuning of the language model).

    prepared: the result of `load_processor(cfg)`; its processor is kept and its `model` filled in.
    Returns (loaded, reference_model): reference_model is a frozen copy for full fine-tuning with a
    live reference, else None. Full fine-tuning of a bf16 model trains through fp32 master weights
    (`mdpo.optim.make_optimizer`, chosen by the trained parameters' dtype). With `model.quantization`
    the language model's linear layers load quantised on `device` (mdpo.models.quantization) and LoRA
    goes on top; the reference is the same quantised base with the adapters off.
    """
    from .models import apply_lora, build_preset, enable_gradient_checkpointing, freeze_for_full_finetune, load_model
    from .models.quantization import check_quantization_available, quantization_settings, quantize_in_memory

    quantization = quantization_settings(cfg.model, device)
    if cfg.model.preset is not None:
        dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
        loaded = build_preset(cfg.model.preset, seed=cfg.seed, dtype=dtype)
        if quantization is not None:
            check_quantization_available(quantization.method, device)
            loaded.model = quantize_in_memory(loaded.model, quantization, loaded.adapter, device)
        if prepared is not None:
            prepared.model = loaded.model  # the records were checked with prepared's processor: keep it
            loaded = prepared
    else:
        attn = None if cfg.model.attn_implementation == "auto" else cfg.model.attn_implementation
        loaded = load_model(cfg.model.path, family=cfg.model.family, dtype=cfg.model.dtype, attn_implementation=attn,
                            device=device, prepared=prepared, quantization=quantization)
    reference_model = None
    if cfg.model.finetune == "lora":
        target = "all-linear-language" if cfg.model.lora_target_modules is None else cfg.model.lora_target_modules
        loaded.model = apply_lora(loaded.model, loaded.family, r=cfg.model.lora_r, alpha=cfg.model.lora_alpha,
                                  dropout=cfg.model.lora_dropout, target=target)
    else:
        if cfg.model.finetune == "all":  # every weight trains, vision tower and projector too
            loaded.model.requires_grad_(True)
        else:
            freeze_for_full_finetune(loaded.model, loaded.family)
        if cfg.reference.mode == "live":  # the frozen reference is a separate copy of the initial weights
            reference_model = copy.deepcopy(loaded.model).eval().requires_grad_(False)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(loaded.model)
    loaded.model.train()
    return loaded, reference_model


def read_records(cfg: TrainConfig, path: str, loaded, what: str = "data.path", log=None):
    """`load_records` of a run's file, checked with the run's processor (no model weights needed), validated
    once per dataset version (cached under data.cache_dir), shared over the run's processes and, in each,
    over data.num_workers forked workers.

    A bad record that aborts the run (data.on_bad_record: error) says how to skip such records instead.
    log: where the line saying whether validation ran or was reused goes (e.g. the engine's print).
    """
    from .data import BadRecordError, load_records
    from .data.processes import Processes

    try:
        return load_records(path, image_root=cfg.data.image_root, on_bad_record=cfg.data.on_bad_record,
                            processor=loaded.processor, max_length=cfg.data.max_length, family=loaded.family,
                            collator_options=collator_options(cfg), cache_dir=cfg.data.cache_dir,
                            processes=Processes.current(), log=log, workers=cfg.data.num_workers)
    except BadRecordError as err:
        raise BadRecordError(err.index, err.sample_id, f"{err.reason} ({what}; to skip such records and train on the "
                             "others, set data.on_bad_record: skip)", err.source) from None


def out_of_memory_message(cfg: TrainConfig, exc: BaseException) -> str:
    """What to change after an accelerator out-of-memory error, from the run's settings."""
    hints = [f"lower micro_batch_size (now {cfg.micro_batch_size}; effective_batch_size={cfg.effective_batch_size} "
             "stays, gradient accumulation makes up the rest)",
             f"lower data.max_length (now {cfg.data.max_length}; longer records are cut or skipped)"]
    if not cfg.model.gradient_checkpointing:
        hints.insert(1, "set model.gradient_checkpointing: true (now false; recomputes activations in the backward)")
    else:
        hints.append("model.gradient_checkpointing is already true")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"out of accelerator memory ({first}); to fit: " + "; ".join(hints)


class _WandbWriter:
    """The two SummaryWriter calls the trainer makes, sent to a wandb run."""

    def __init__(self, wandb, run):
        self.wandb, self.run = wandb, run

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: value}, step=step)

    def close(self) -> None:
        self.run.finish()


def check_report_to(cfg: TrainConfig) -> None:
    """Fail before any model loads when report_to names a logger that is not installed."""
    import importlib.util

    from .config import ConfigError

    if cfg.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("report_to=wandb needs the wandb package (pip install wandb), or set report_to: tensorboard | none")


def make_metrics_writer(cfg: TrainConfig, out_dir):
    """Where metrics rows also go besides metrics.jsonl: a TensorBoard SummaryWriter, a wandb run, or None.

    wandb is imported only here and only for report_to: wandb (its own settings, e.g. WANDB_MODE=offline
    and WANDB_PROJECT, come from the environment); the run's config is logged with it.
    """
    from pathlib import Path

    check_report_to(cfg)
    if cfg.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(Path(out_dir) / "tensorboard"))
    if cfg.report_to == "wandb":
        import wandb

        from .config import to_dict

        run = wandb.init(dir=str(out_dir), config=to_dict(cfg), name=Path(out_dir).name)
        return _WandbWriter(wandb, run)
    return None


def make_criterion(cfg: TrainConfig) -> MDPOLoss:
    return MDPOLoss(beta=cfg.loss.beta, delta=cfg.loss.delta, objective=cfg.objective, dpo_weight=cfg.loss.dpo_weight,
                    conditional_weight=cfg.loss.conditional_weight, anchor_weight=cfg.loss.anchor_weight,
                    rejected_anchor=cfg.loss.rejected_anchor, corrupted_anchor=cfg.loss.corrupted_anchor)


def collator_options(cfg: TrainConfig) -> dict:
    """The data keys that change a row's tokens or pixels, as PreferenceCollator arguments; give them to
    `load_records(..., collator_options=...)` too, so its length check measures what training sees."""
    return {"prompt_template": cfg.data.prompt_template, "system_prompt": cfg.data.system_prompt,
            "max_pixels": cfg.data.max_pixels, "min_pixels": cfg.data.min_pixels,
            "truncate_response": cfg.data.truncate_response}


def make_collator(cfg: TrainConfig, loaded, corruption, records):
    """The [chosen | rejected | corrupted] collator of a record set (random_image draws from `records`)."""
    from .data import PreferenceCollator

    collator = PreferenceCollator(loaded.processor, objective=cfg.objective, max_length=cfg.data.max_length,
                                  corruption=corruption, family=loaded.family, **collator_options(cfg))
    if cfg.data.corruption == "random_image" and hasattr(collator, "set_image_pool"):
        collator.set_image_pool(records)
    return collator


def make_corruption(cfg: TrainConfig):
    """The run's `CorruptionConfig` (strategy, crop range, seed, one image for all epochs or not)."""
    from .data import CorruptionConfig

    return CorruptionConfig(strategy=cfg.data.corruption, area=tuple(cfg.data.crop_area), seed=cfg.data.corruption_seed,
                            same_every_epoch=cfg.data.same_corruption_every_epoch)
