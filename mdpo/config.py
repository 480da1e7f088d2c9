"""Typed training configuration: a YAML file plus `key=value` overrides.

Every default is the paper's setting unless its comment says otherwise. Unknown keys and values of
the wrong type are rejected with a message naming the key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import MdpoError


class ConfigError(MdpoError, ValueError):
    """A config file or override that cannot be used as it is; the message names the key."""


@dataclass
class DataConfig:
    path: str = "sample_data/data.json"  # JSON list or JSONL of preference records
    eval_path: str | None = None  # held-out records (same format, same image_root) scored during training
    image_root: str | None = None  # image paths are relative to this (default: the dataset's folder)
    on_bad_record: str = "error"  # error | skip (skipped records are counted and listed)
    max_length: int = 2048  # tokens per row, image tokens included; the prompt text is cut first
    corruption: str = "crop"  # crop | random_image | moco_v2 | none
    crop_area: tuple[float, float] = (0.01, 0.2)  # fraction of the image a crop keeps (paper: 1–20 %)
    same_corruption_every_epoch: bool = False  # True: one corrupted image per record for the whole run
    corruption_seed: int = 0  # the corrupted image is a function of (this seed, sample id, epoch)
    num_workers: int = 0  # processes that collate training micro-batches ahead of the step (0: in the loop)


@dataclass
class ModelConfig:
    preset: str | None = None  # tiny-llava | tiny-qwen2-vl | ... (random weights, for demos and tests)
    path: str | None = None  # local folder with a Hugging Face model and processor (offline)
    family: str | None = None  # llava | qwen2-vl | qwen2.5-vl | idefics3 | paligemma (default: detected)
    finetune: str = "lora"  # lora | full (full fine-tuning of the language model)
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    gradient_checkpointing: bool = False
    attn_implementation: str = "auto"  # auto: flash_attention_2 when flash-attn imports on CUDA, else sdpa


@dataclass
class LossConfig:
    beta: float = 0.1
    delta: float = 0.0  # anchor value δ
    dpo_weight: float | None = None  # None: the objective's own weight (mdpo: 1, 1, 1)
    conditional_weight: float | None = None
    anchor_weight: float | None = None
    rejected_anchor: float | None = None  # δ_r of the extra anchor on the rejected response (Table 4)
    corrupted_anchor: float | None = None  # δ_k of the extra anchor on the corrupted image (Table 4)
    average_logprobs: bool = False  # length-normalised log-probs (not the paper's choice)


@dataclass
class ReferenceConfig:
    mode: str = "cached"  # cached: one forward-only pass before training | live: every step
    cache_path: str | None = None  # default: <output_dir>/reference_logps.pt


@dataclass
class TrainConfig:
    objective: str = "mdpo"  # mdpo | dpo | dpo_no_image | mdpo_no_conditional | mdpo_no_anchor
    output_dir: str = "outputs/mdpo"
    seed: int = 42
    epochs: int = 3
    max_steps: int = -1  # optimizer steps; -1: run all epochs
    micro_batch_size: int = 1  # pairs per forward (each pair is 3 rows)
    effective_batch_size: int = 32  # pairs per optimizer step, over gradient accumulation and processes
    lr: float = 1e-5
    warmup_ratio: float = 0.1  # cosine schedule with linear warm-up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at each epoch's end)
    eval_every: int = 0  # with data.eval_path: evaluate every N optimizer steps (always before step 1 and after the last)
    save_merged: bool = False  # also save LoRA-merged full weights at the end
    resume_from: str | None = None  # a checkpoint folder written by a previous run
    kernel_impl: str | None = None  # force triton | native | torch | reference for the log-prob ops
    tensorboard: bool = True
    plots: bool = True
    progress_bar: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp` (after YAML parsing); ints are accepted as floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; valid keys here: {', '.join(prefix + k for k in fields)}")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config and apply `key=value` overrides (values parsed as YAML: 1e-5, true, [0.2, 0.5])."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(tree).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. max_steps=10)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from exc
        _set_dotted(tree, key.strip(), value)
    config = _build(TrainConfig, tree)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Checks across keys, with messages naming them."""
    from .loss import OBJECTIVES

    choices = {
        "objective": (config.objective, sorted(OBJECTIVES)),
        "data.on_bad_record": (config.data.on_bad_record, ["error", "skip"]),
        "data.corruption": (config.data.corruption, ["crop", "random_image", "moco_v2", "none"]),
        "model.finetune": (config.model.finetune, ["lora", "full"]),
        "model.dtype": (config.model.dtype, ["auto", "float32", "bfloat16", "float16"]),
        "reference.mode": (config.reference.mode, ["cached", "live"]),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {allowed}")
    if (config.model.preset is None) == (config.model.path is None):
        raise ConfigError("set exactly one of model.preset and model.path")
    for key in ("micro_batch_size", "effective_batch_size", "epochs"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key} must be ≥ 1, got {getattr(config, key)}")
    if config.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be ≥ 0, got {config.data.num_workers}")
    if config.eval_every < 0:
        raise ConfigError(f"eval_every must be ≥ 0, got {config.eval_every}")
    if config.eval_every and config.data.eval_path is None:
        raise ConfigError(f"eval_every={config.eval_every} needs data.eval_path (a file of held-out records)")
    if config.effective_batch_size % config.micro_batch_size:
        raise ConfigError(
            f"effective_batch_size={config.effective_batch_size} must be a multiple of micro_batch_size={config.micro_batch_size}"
        )
    low, high = config.data.crop_area
    if not 0 < low <= high <= 1:
        raise ConfigError(f"data.crop_area={config.data.crop_area} must satisfy 0 < low ≤ high ≤ 1")


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def config_to_yaml(config: TrainConfig) -> str:
    """Every key in declaration order, as YAML that `load_config` reads back to an equal config."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return list(value) if isinstance(value, tuple) else value

    return yaml.safe_dump(plain(to_dict(config)), sort_keys=False)
