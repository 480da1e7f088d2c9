"""Training checkpoints: trained parameters, optimizer / scheduler state, the loop position and each
process's RNG state, and loading them back (`resume_from`, `mdpo-eval`).

A checkpoint `<output_dir>/checkpoints/step-NNNNNN/` holds
    state.pt       scheduler state, the loop position, the number of processes, the engine (and, for
                   ddp, the optimizer state)
    rng-K.pt       process K's RNG states (python, numpy, torch, cuda) as tensors and plain values
    config.json    the run's configuration
and the trained weights with their optimizer state in the engine's own format
(`mdpo.distributed`):
    trainable.pt   ddp: the trained parameters by name (LoRA A/B matrices, or the language model for
                   full fine-tuning): the one copy of the weights (the peft-format adapter is `final/`)
    dcp/           fsdp2: a torch distributed checkpoint (sharded; reshards when loaded by another
                   number of processes, or whole by one process)
    deepspeed/     zero2 / zero3: DeepSpeed's save_checkpoint (same number of processes to resume)
Every file is read with `torch.load(weights_only=True)` or a loader as strict (DCP's pickled
metadata through an unpickler that knows only DCP's own classes; DeepSpeed's files checked with
weights_only=True and DeepSpeed's own classes before DeepSpeed reads them), so a checkpoint someone
shares cannot run code; one holding anything else is refused, naming the file.

Writing is atomic: the files go to `checkpoints/.tmp-step-NNNNNN/` (every process its rng-K.pt), and
after all processes have written, the main process renames the folder to `step-NNNNNN`. A run killed
while saving leaves only a `.tmp-` folder, which `resume_from: latest` ignores. `save_total_limit`
keeps the newest N complete checkpoints.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, TrainConfig, to_dict

STEP_DIR = re.compile(r"step-(\d+)")
TMP_PREFIX = ".tmp-"
REQUIRED_FILES = ("state.pt", "config.json", "rng-0.pt")
WEIGHT_FILES = ("trainable.pt", "dcp/.metadata", "deepspeed")  # one of them, by engine (ddp, fsdp2, zero2/3)
POSITION_KEYS = ("epoch", "step_in_epoch", "global_step")  # state.pt's loop position: three ints


class CheckpointError(ConfigError):
    """A checkpoint folder that cannot be loaded (incomplete, unsafe or foreign files); names the file."""


# ------------------------------------------------------------------------------------------ files
def _save_file(obj, path: Path) -> None:
    """Every checkpoint file is written here (one place: tests interrupt a save between files)."""
    torch.save(obj, path)


def _publish(tmp: Path, final: Path) -> None:
    """Make a fully written temporary checkpoint folder the complete one (a rename)."""
    if final.exists():  # the same step saved again (a rerun into the same output_dir)
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def torch_load_problem(exc: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in one sentence: the pickled global it met
    ("GLOBAL io.open"), the unpickler's own complaint, or the first sentence of any other error
    (a truncated file's "PytorchStreamReader failed reading zip archive: ...")."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds a pickled Python object (GLOBAL {found.group(1)}) that could run code when loaded"
    if "WeightsUnpickler error:" in text:
        rest = [line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines() if line.strip()]
        return f"it holds something other than tensors and plain containers ({rest[0] if rest else 'unpickler error'})"
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = first.split(". ")[0].rstrip(".")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_file(path: Path, **kwargs):
    """torch.load with weights_only=True; anything that is not tensors and plain containers (a pickled
    object, a foreign or truncated file) is refused with a CheckpointError naming the file."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 — UnpicklingError for unsafe content, others for damage
        raise CheckpointError(f"{path}: cannot be loaded safely (weights_only=True): {torch_load_problem(exc)}; a checkpoint "
                              "file holds only tensors and plain containers") from None


# -------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """This process's RNG states as tensors and plain values (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def derived_rng_seed(seed: int, global_step: int, rank: int) -> int:
    """The seed of a process that has no saved RNG state (the run now has more processes than the
    checkpoint's): a function of the run's seed, the step and the process index only."""
    return (seed * 1_000_003 + global_step * 7_919 + rank * 104_729) % 2**32


# ----------------------------------------------------------------------------------- save / find
def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (by step): `step-N` folders holding every
    required file; `.tmp-` folders (interrupted saves) are not listed."""
    root = checkpoints_dir(output_dir)
    found = []
    for path in root.iterdir() if root.is_dir() else ():
        match = STEP_DIR.fullmatch(path.name)
        if (match and path.is_dir() and all((path / name).is_file() for name in REQUIRED_FILES)
                and any((path / name).exists() for name in WEIGHT_FILES)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume(resume_from: str | None, output_dir: str | Path) -> Path | None:
    """`resume_from` as a checkpoint folder: `latest` is the newest complete checkpoint in
    output_dir (None when there is none yet: the run starts from step 0)."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if path.name.startswith(TMP_PREFIX):
        raise CheckpointError(f"resume_from={path}: an interrupted, incomplete save (a {TMP_PREFIX} folder); "
                              f"use a step-N folder or resume_from=latest")
    return path


def save_checkpoint(out: Path, engine, module, optimizer, scheduler, position: dict, cfg: TrainConfig,
                    keep: Path | None = None) -> Path:
    """Write `checkpoints/step-N/` atomically (see the module docstring); every process calls it.

    engine: the run's `mdpo.distributed.Engine` (it writes the weights and optimizer state in its own
    format); keep: a checkpoint `save_total_limit` must not delete (the one this run resumed from).
    """
    root = checkpoints_dir(out)
    name = f"step-{position['global_step']:06d}"
    final, tmp = root / name, root / f"{TMP_PREFIX}{name}"
    if engine.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier interrupted save of this step
        tmp.mkdir(parents=True)
    engine.barrier()
    extra = engine.save(tmp, module, optimizer)
    if engine.is_main:
        _save_file({**extra, "scheduler": scheduler.state_dict(), "position": dict(position), "processes": engine.world,
                    "engine": engine.name}, tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    engine.barrier()
    _save_file(rng_state(), tmp / f"rng-{engine.rank}.pt")
    engine.barrier()
    if engine.is_main:
        _publish(tmp, final)
        limit = getattr(cfg, "save_total_limit", 0) or 0
        if limit > 0:
            prune_checkpoints(out, limit, keep=[final] + ([keep] if keep is not None else []))
    engine.barrier()
    return final


def prune_checkpoints(out: Path, limit: int, keep: list[Path]) -> list[Path]:
    """Delete complete checkpoints older than the newest `limit`, never one in `keep`; -> deleted."""
    keep_resolved = {Path(k).resolve() for k in keep}
    found = complete_checkpoints(out)
    deleted = []
    for path in found[: max(0, len(found) - limit)]:
        if path.resolve() not in keep_resolved:
            shutil.rmtree(path)
            deleted.append(path)
    return deleted


# ------------------------------------------------------------------------------------------- load
def _listed(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def trainable_problems(trainable, model: torch.nn.Module, cast: bool = False) -> list[str]:
    """What keeps a trainable.pt from being exactly the trained parameters of `model`, one phrase each
    (empty: it fits). The model's trained parameters are those with requires_grad: every one must be in
    the file, as a tensor of its shape and dtype, and the file must hold nothing else. cast=True lets a
    floating-point tensor fill a parameter of another floating dtype (evaluation on another device:
    fp32 saved on the CPU, bf16 on the GPU); a resumed run needs the exact dtype its optimizer state has."""
    if not isinstance(trainable, dict):
        return [f"it holds a {type(trainable).__name__}, not a mapping of parameter names to tensors"]
    params = dict(model.named_parameters())
    trained = sorted(n for n, p in params.items() if p.requires_grad)
    problems = []
    unknown = sorted(set(trainable) - set(params))
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) this model does not have ({_listed(unknown)})")
    missing = [n for n in trained if n not in trainable]
    if missing:
        problems.append(f"{len(missing)} of the {len(trained)} trained tensors are missing ({_listed(missing)})")
    wrong = []
    for name in sorted(set(trainable) & set(params)):
        value, param = trainable[name], params[name]
        if not isinstance(value, torch.Tensor):
            wrong.append(f"{name} is a {type(value).__name__}, not a tensor")
        elif value.shape != param.shape:
            wrong.append(f"{name} has shape {tuple(value.shape)}, the model's {tuple(param.shape)}")
        elif value.dtype != param.dtype and not (cast and value.dtype.is_floating_point and param.dtype.is_floating_point):
            wrong.append(f"{name} is {str(value.dtype).removeprefix('torch.')}, the model's {str(param.dtype).removeprefix('torch.')}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) do not fit: {_listed(wrong, 2)}")
    return problems


def apply_trainable(model: torch.nn.Module, trainable, key: str, ckpt: Path, what: str, cast: bool = False) -> None:
    """Copy trained parameters {name: tensor} read from a checkpoint into `model`, after checking they are
    exactly its trained parameters (`trainable_problems`); `what` names where they were read from."""
    problems = trainable_problems(trainable, model, cast=cast)
    if problems:
        raise CheckpointError(f"{key}={ckpt}: {what} does not hold this run's trained parameters: " + "; ".join(problems)
                              + " (a damaged checkpoint, or one of another model, LoRA or model.dtype setting: dtype auto is "
                              "bf16 on a GPU, fp32 on the CPU)")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value)


def load_trainable(model: torch.nn.Module, ckpt: Path, key: str, cast: bool = False) -> None:
    """Copy a ddp checkpoint's trained parameters (trainable.pt, by name) into `model`; `key` names the
    setting that pointed at the checkpoint, for the error messages. (Any engine's checkpoint:
    `mdpo.distributed.load_trained_weights`.)

    The file must hold every parameter of `model` that trains (requires_grad), with its shape and dtype,
    and no other (`trainable_problems`; cast: see there): a missing tensor would otherwise stay at its
    initial value without a word (LoRA B at zero), and another LoRA rank would end in a traceback.
    """
    if not (ckpt / "state.pt").is_file() or not (ckpt / "trainable.pt").is_file():
        raise CheckpointError(f"{key}={ckpt}: not a checkpoint folder (no state.pt / trainable.pt)")
    apply_trainable(model, load_file(ckpt / "trainable.pt"), key, ckpt, "trainable.pt", cast=cast)


def checkpoint_engine(ckpt: Path) -> str:
    """The engine that wrote a checkpoint (state.pt's "engine"; checkpoints from before engines: ddp)."""
    return str(read_state(ckpt, mmap=True).get("engine", "ddp"))


def read_state(ckpt: Path, **kwargs) -> dict:
    """state.pt, checked: a mapping with the loop position (three ints: `POSITION_KEYS`), the scheduler
    state and, for ddp, the optimizer state (other engines keep it in their own files); CheckpointError
    naming the file otherwise."""
    path = Path(ckpt) / "state.pt"
    state = load_file(path, **kwargs)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not the mapping a checkpoint's state.pt holds")
    position = state.get("position")
    if not isinstance(position, dict) or not all(isinstance(position.get(k), int) and position[k] >= 0 for k in POSITION_KEYS):
        raise CheckpointError(f"{path}: no loop position ('position' with {', '.join(POSITION_KEYS)} as ints ≥ 0; "
                              f"found {position!r:.80}): a damaged or foreign checkpoint")
    needed = ("optimizer", "scheduler") if state.get("engine", "ddp") == "ddp" else ("scheduler",)
    missing = [k for k in needed if not isinstance(state.get(k), dict)]
    if missing:
        raise CheckpointError(f"{path}: no {' / '.join(missing)} state: a damaged or foreign checkpoint")
    return state


def read_position(ckpt: Path) -> dict:
    """The loop position of a checkpoint (mmap: the optimizer state is not read into memory)."""
    return read_state(ckpt, mmap=True)["position"]


def check_same_data(ckpt: Path, identity: dict) -> str | None:
    """Refuse to resume a checkpoint written while training on other data (CheckpointError naming what
    differs: the data's digest, its image files' digest, the number of records); -> a note for a
    checkpoint from before checkpoints recorded their data (nothing to compare), else None.

    identity: `mdpo.data.digests.dataset_identity` of this run's records; the checkpoint's is in state.pt
    ("position" → "data"). Records read in another order would continue another run's epoch silently.
    """
    saved = read_state(ckpt, mmap=True)["position"].get("data")
    if not isinstance(saved, dict):
        return f"note: resume_from={ckpt} does not record which data it trained on; the data is assumed unchanged"
    differs = [f"{key} {saved.get(key)!r} then, {identity.get(key)!r} now" for key in sorted(set(saved) | set(identity))
               if saved.get(key) != identity.get(key)]
    if differs:
        raise CheckpointError(f"resume_from={ckpt}: the training data changed since this checkpoint was written "
                              f"({'; '.join(differs)}); resume with the data it trained on, or start a new run "
                              "(another output_dir, or overwrite_output_dir: true)")
    return None


def load_checkpoint(ckpt: Path, engine, module, optimizer, scheduler, seed: int = 0) -> dict:
    """Restore parameters, optimizer, scheduler and this process's RNG; -> the loop position.

    engine: the run's `mdpo.distributed.Engine`; a checkpoint another engine wrote is refused (their
    formats differ). With more processes than the checkpoint was saved from, a process without an
    rng-K.pt gets RNG states seeded from (seed, step, K) — deterministic, but not what an unchanged run
    would draw — and a note is printed; with fewer, the extra rng files are unused.
    """
    state = read_state(ckpt)
    saved_engine = str(state.get("engine", "ddp"))
    if saved_engine != engine.name:
        raise CheckpointError(f"resume_from={ckpt}: written with distributed.engine={saved_engine}, this run uses "
                              f"{engine.name}; resume with distributed.engine={saved_engine} (start a new run from its "
                              "final/ weights to change engines)")
    engine.load(ckpt, module, optimizer, state)
    try:
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as exc:
        raise CheckpointError(f"resume_from={ckpt}: state.pt's scheduler state does not fit this run "
                              f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    position = state["position"]
    saved = int(state.get("processes", 1))
    rank, world = engine.rank, engine.world
    if saved != world:
        engine.print(f"note: resume_from={ckpt} was saved by {saved} process(es), this run has {world}; "
                     + (f"processes {saved}..{world - 1} start from RNG states derived from (seed, step, process)"
                        if world > saved else "the RNG states of the others are unused"))
    rng_path = ckpt / f"rng-{rank}.pt"
    if rank < saved or rng_path.is_file():
        set_rng_state(load_file(rng_path))
    else:
        derived = derived_rng_seed(seed, int(position["global_step"]), rank)
        random.seed(derived)
        np.random.seed(derived)
        torch.manual_seed(derived)
    return position
