"""One run per `output_dir`: a fresh run does not write into another run's folder, and a resumed run
continues only a checkpoint of the same training settings.

`claim_output_dir` is called once at the start of `mdpo-train`, before anything is written:

- an `output_dir` that is a file is refused;
- a fresh run (no `resume_from`) into a folder holding another run (any of `RUN_FILES` besides
  config.json: a run that stopped before its first step, e.g. on a bad record, leaves only its
  config.json and is simply replaced) is refused, naming what is there, unless
  `overwrite_output_dir: true`: then that run's files (`RUN_FILES`) are deleted first, by the main process. Deleted, not moved aside: a kept copy would be a second run in
  the folder that `resume_from: latest` or a reader of metrics.jsonl could still mix with. Files that
  mdpo-train does not write are left alone. A reference cache there (`reference_logps*.pt`) is kept:
  its fingerprint (model weights, data, settings) and the checksum of its values decide on loading —
  reused when this run's match, recomputed in place when they do not (`reference_pass`);
- a resume reads the checkpoint's `config.json` and `state.pt` position first (before any weight
  loads) and refuses a checkpoint whose run had other training settings (`training_differences`:
  every key except `NOT_TRAINING_KEYS`), naming each differing key with both values. The run's
  length (`max_steps`, `epochs`) may change: a note says so (the cosine schedule then ends elsewhere).
  A folder holding a run that never saved a checkpoint is continued by `resume_from: latest` (from
  step 0) only when its `config.json` has the same training settings.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .checkpoints import CheckpointError, read_position, resolve_resume
from .config import ConfigError, TrainConfig, load_config, to_dict

# What mdpo-train writes into output_dir (`mdpo.train`): the files of one run.
RUN_FILES = ("config.json", "metrics.jsonl", "eval_metrics.jsonl", "summary.json", "checkpoints", "final", "merged",
             "plots", "tensorboard", "wandb")

# Keys that do not change what a run trains, so a resume may change them. Every other key does: a new key
# counts as training-relevant until it is listed here.
NOT_TRAINING_KEYS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from",  # where the run is, not what it trains
    "max_steps", "epochs",  # the run's length: a resume may extend it (noted, the schedule's end moves)
    "save_every", "save_total_limit", "save_merged",  # what is saved
    "eval_every", "eval_generate_every", "data.eval_path",  # held-out evaluation only
    "report_to", "tensorboard", "plots", "progress_bar",  # where metrics go
    "kernel_impl", "model.attn_implementation", "model.shared_prefix",  # the same maths, to rounding
    "micro_batch_size",  # memory only: the effective batch and the record order stay
    "data.num_workers", "data.cache_dir", "model.gradient_checkpointing",  # where and how often activations are computed
    "reference.mode", "reference.cache_path",  # cached and live give the same reference log-probs
    "distributed.reshard_after_forward", "distributed.offload", "distributed.deepspeed_config",  # memory and speed only
})
LENGTH_KEYS = ("max_steps", "epochs")
PATH_KEYS = ("data.path", "data.image_root", "model.path")  # equal when they name the same file or folder


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple) else value
    return out


def _same(key: str, a, b) -> bool:
    if a == b:
        return True
    if key in PATH_KEYS and isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)  # the same file, written relative in one config and absolute in the other
    return False


def training_differences(saved: TrainConfig, current: TrainConfig) -> list[str]:
    """'key: saved → current' for every training-relevant key whose value differs (see NOT_TRAINING_KEYS)."""
    a, b = _flat(to_dict(saved)), _flat(to_dict(current))
    return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in NOT_TRAINING_KEYS and not _same(k, a.get(k), b.get(k))]


def _saved_config(path: Path, what: str) -> TrainConfig:
    try:
        return load_config(path)  # JSON is YAML; the keys and values are checked like any config
    except ConfigError as err:
        raise CheckpointError(f"{what}: {path} is not a run config this mdpo can read ({err})") from None


def held_run_files(out: Path) -> list[str]:
    """The run files (RUN_FILES) an output_dir holds, folders with a trailing slash; [] when it holds no
    run, or only the config.json of one that stopped before training (nothing of it to mix with)."""
    if not out.is_dir():
        return []
    held = [name + ("/" if (out / name).is_dir() else "") for name in RUN_FILES if (out / name).exists()]
    return [] if held in ([], ["config.json"]) else held


def _check_same_training(saved_path: Path, cfg: TrainConfig, what: str, fix: str) -> TrainConfig:
    saved = _saved_config(saved_path, what)
    diff = training_differences(saved, cfg)
    if diff:
        raise CheckpointError(f"{what}: {saved_path} was written by a run with other training settings ({'; '.join(diff)}); {fix}")
    return saved


def claim_output_dir(cfg: TrainConfig, engine) -> Path | None:
    """Check cfg.output_dir for this run (module docstring), deleting an earlier run's files first with
    overwrite_output_dir; -> the checkpoint to resume from, None for a start at step 0.

    engine: the run's `mdpo.distributed.Engine`. Every process checks (read-only); the main process
    deletes; all wait for each other before the caller writes anything, so no process sees a file
    another one has just written.
    """
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={out} is a file, not a folder; give a folder for the run's outputs")
    resume = resolve_resume(cfg.resume_from, out)
    held = held_run_files(out)
    fresh_fix = ("choose another output_dir, resume that run (resume_from: latest), or set overwrite_output_dir: true "
                 "to delete it first")
    if resume is not None:
        if not resume.is_dir() or not (resume / "config.json").is_file():
            raise CheckpointError(f"resume_from={resume}: not a checkpoint folder (no config.json); give "
                                  "<output_dir>/checkpoints/step-N or resume_from: latest")
        read_position(resume)  # a damaged state.pt is named now, not after the model has loaded
        saved = _check_same_training(resume / "config.json", cfg, f"resume_from={resume}",
                                     "resume with those settings, or start a new run (another output_dir)")
        if cfg.overwrite_output_dir and out.resolve() in resume.resolve().parents:
            raise ConfigError(f"overwrite_output_dir=true would delete resume_from={resume}, which is in output_dir={out}")
        if held and not cfg.overwrite_output_dir and (out / "config.json").is_file():
            _check_same_training(out / "config.json", cfg, f"output_dir={out}", fresh_fix)
        changed = [f"{k} {getattr(saved, k)} → {getattr(cfg, k)}" for k in LENGTH_KEYS if getattr(saved, k) != getattr(cfg, k)]
        if changed:
            engine.print(f"note: resuming {resume} with another run length ({', '.join(changed)}): the learning-rate "
                              "schedule now ends at this run's last step")
    elif held and not cfg.overwrite_output_dir:
        if cfg.resume_from == "latest" and (out / "config.json").is_file():  # a run that never saved a checkpoint
            _check_same_training(out / "config.json", cfg, f"output_dir={out} (resume_from: latest, no checkpoint yet)",
                                 fresh_fix)
        else:
            raise ConfigError(f"output_dir={out} holds another run ({', '.join(held)}); a new run there would overwrite "
                              f"and mix with it: {fresh_fix}")
    if held and cfg.overwrite_output_dir and engine.is_main:
        for name in held:
            path = out / name.rstrip("/")
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        kept = [p.name for p in sorted(out.glob("reference_logps*.pt"))]
        engine.print(f"overwrite_output_dir: deleted the earlier run's {', '.join(held)} in {out}"
                          + (f"; kept {', '.join(kept)} (reused only if its fingerprint matches this run)" if kept else ""))
    engine.barrier()
    return resume
