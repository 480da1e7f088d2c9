"""Training checkpoints: trained parameters, optimizer / scheduler state, the loop position and each
process's RNG state, and loading them back (`resume_from`, `mdpo-eval`)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, TrainConfig, to_dict


def save_checkpoint(out: Path, accelerator, scorer, optimizer, scheduler, position: dict, cfg: TrainConfig) -> Path:
    ckpt = out / "checkpoints" / f"step-{position['global_step']:06d}"
    model = accelerator.unwrap_model(scorer).model
    if accelerator.is_main_process:
        ckpt.mkdir(parents=True, exist_ok=True)
        trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(trainable, ckpt / "trainable.pt")
        if hasattr(model, "peft_config"):
            model.save_pretrained(ckpt / "adapter")  # peft format, loadable with PeftModel.from_pretrained
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "position": position}, ckpt / "state.pt")
        (ckpt / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    accelerator.wait_for_everyone()
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, ckpt / f"rng-{accelerator.process_index}.pt")
    return ckpt


def load_trainable(model: torch.nn.Module, ckpt: Path, key: str) -> None:
    """Copy a checkpoint's trained parameters (trainable.pt, by name) into `model`; `key` names the
    setting that pointed at the checkpoint, for the error messages."""
    if not (ckpt / "state.pt").is_file() or not (ckpt / "trainable.pt").is_file():
        raise ConfigError(f"{key}={ckpt}: not a checkpoint folder (no state.pt / trainable.pt)")
    trainable = torch.load(ckpt / "trainable.pt", map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    missing = sorted(set(trainable) - set(params))
    if missing:
        raise ConfigError(f"{key}={ckpt}: checkpoint parameters not in this model, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value)


def load_checkpoint(ckpt: Path, accelerator, scorer, optimizer, scheduler) -> dict:
    load_trainable(accelerator.unwrap_model(scorer).model, ckpt, "resume_from")
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = torch.load(ckpt / f"rng-{accelerator.process_index}.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["position"]
