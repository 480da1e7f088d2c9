"""Typed training configuration: a YAML file plus `key=value` overrides.

Every default is the paper's setting unless its comment says otherwise. Unknown keys and values of
the wrong type are rejected with a message naming the key.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError  # noqa: F401 — ConfigError is imported from here too


@dataclass
class DataConfig:
    path: str = "sample_data/data.json"  # JSON list or JSONL of preference records, or a Hugging Face datasets folder (save_to_disk) or .parquet file
    eval_path: str | None = None  # held-out records (same format, same image_root) scored during training
    image_root: str | None = None  # image paths are relative to this (default: the dataset's folder)
    on_bad_record: str = "error"  # error | skip (skipped records are counted and listed)
    max_length: int = 2048  # tokens per row, image tokens included; the prompt text is cut first
    truncate_response: bool = False  # true: a response that does not fit is cut at its end (no EOS then), like TRL; false: such a record is bad
    prompt_template: str = "model"  # model: paper-shape (LLaVA-templated) prompts re-rendered with the model's own chat template | verbatim: used as written
    system_prompt: str | None = None  # system message for records that have none (null: the chat template's own default, if any)
    max_pixels: int | None = None  # Qwen2-VL / Qwen2.5-VL: most pixels per image (fewer image tokens); null: the processor's setting
    min_pixels: int | None = None  # Qwen2-VL / Qwen2.5-VL: fewest pixels per image; null: the processor's setting
    corruption: str = "crop"  # crop | random_image | moco_v2 | none
    crop_area: tuple[float, float] = (0.01, 0.2)  # fraction of the image a crop keeps (paper: 1–20 %)
    same_corruption_every_epoch: bool = False  # True: one corrupted image per record for the whole run
    corruption_seed: int = 0  # the corrupted image is a function of (this seed, sample id, epoch)
    num_workers: int = 0  # processes that collate training micro-batches ahead of the step (0: in the loop); also the processes a dataset's first validation is shared over in each training process
    cache_dir: str | None = None  # where digests of the data and image files are kept, so later starts do not reread them (null: $MDPO_DATA_CACHE, else ~/.cache/mdpo/data; off: keep nothing)


@dataclass
class ModelConfig:
    preset: str | None = None  # tiny-llava | tiny-qwen2-vl | ... (random weights, for demos and tests)
    path: str | None = None  # local folder with a Hugging Face model and processor (offline)
    family: str | None = None  # llava | qwen2-vl | qwen2.5-vl | idefics3 | paligemma (default: detected)
    finetune: str = "lora"  # lora | full (full fine-tuning of the language model) | all (every weight, vision tower and projector too: training from scratch)
    lora_r: int = 64  # LoRA rank r of every adapted layer
    lora_alpha: int = 128  # LoRA scale α (the update is α/r · B·A)
    lora_dropout: float = 0.05  # dropout on the LoRA input during training
    lora_target_modules: list[str] | None = None  # null: every linear layer of the language model; else module-name suffixes, e.g. [q_proj, v_proj]
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    gradient_checkpointing: bool = False  # recompute each decoder layer's activations in the backward: less activation memory, one more forward per step
    attn_implementation: str = "auto"  # auto: flash_attention_2 when flash-attn imports on CUDA, else sdpa
    shared_prefix: str | bool = "auto"  # auto | on | off: chosen and rejected rows share one forward of their image + prompt (auto: where the family and attention support it; results do not depend on it)
    quantization: str = "none"  # none | nf4 | int8: load the language model's linear layers quantised through bitsandbytes (QLoRA: LoRA on a frozen 4-bit base, ~0.52 byte per weight instead of 2); vision tower, projector and LM head stay unquantised; needs finetune: lora
    quantization_double_quant: bool = True  # nf4: quantise the per-block scales too (0.016 instead of 0.0625 byte per weight; QLoRA's setting)
    quantization_compute_dtype: str = "auto"  # nf4: dtype the 4-bit weights are dequantised to for each matmul: auto (model.dtype: bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    quantization_storage: str = "uint8"  # nf4: container dtype of the packed 4-bit weights: uint8 | bfloat16 | float16 | float32 (FSDP / ZeRO-3 sharding needs the other parameters' dtype, e.g. bfloat16)


@dataclass
class LossConfig:
    beta: float = 0.1  # β: scale of the log-ratio rewards in every preference term
    delta: float = 0.0  # anchor value δ
    dpo_weight: float | None = None  # None: the objective's own weight (mdpo: 1, 1, 1)
    conditional_weight: float | None = None  # weight of the image-conditional term (None: the objective's own)
    anchor_weight: float | None = None  # weight of the anchor term (None: the objective's own)
    rejected_anchor: float | None = None  # δ_r of the extra anchor on the rejected response (Table 4)
    corrupted_anchor: float | None = None  # δ_k of the extra anchor on the corrupted image (Table 4)
    average_logprobs: bool = False  # length-normalised log-probs (not the paper's choice)


@dataclass
class ReferenceConfig:
    mode: str = "cached"  # cached: one forward-only pass before training | live: every step
    cache_path: str | None = None  # default: <output_dir>/reference_logps.pt


@dataclass
class DistributedConfig:
    engine: str = "ddp"  # ddp (every process holds the whole model) | fsdp2 (torch fully_shard: weights, gradients and optimizer state sharded) | zero2 (DeepSpeed ZeRO-2: gradients and optimizer state sharded) | zero3 (DeepSpeed ZeRO-3: weights too); launch with torchrun --nproc_per_node N -m mdpo.train CONFIG
    reshard_after_forward: bool = True  # fsdp2: free each layer's gathered weights after its forward and gather again in the backward (least memory); false keeps them until the backward (less communication)
    offload: str = "none"  # none | optimizer (zero2 / zero3: optimizer state in CPU memory) | all (zero3: weights too; fsdp2: weights, gradients and optimizer state in CPU memory)
    deepspeed_config: str | None = None  # zero2 / zero3: a DeepSpeed JSON file merged under mdpo's own settings (e.g. communication bucket sizes); keys mdpo sets itself must agree with the run (batch sizes, accumulation, clipping, precision)


@dataclass
class TrainConfig:
    objective: str = "mdpo"  # mdpo | dpo | dpo_no_image | mdpo_no_conditional | mdpo_no_anchor | sft (chosen answers only, no reference)
    output_dir: str = "outputs/mdpo"  # metrics, checkpoints, plots and final weights are written here
    overwrite_output_dir: bool = False  # a fresh run into an output_dir holding another run: false refuses it; true deletes that run's files first (a reference cache there is kept: reused if its fingerprint matches, else recomputed)
    seed: int = 42  # model initialisation (presets), record order and LoRA dropout
    epochs: int = 3  # passes over the training records
    max_steps: int = -1  # optimizer steps; -1: run all epochs
    micro_batch_size: int = 1  # pairs per forward (each pair is 3 rows)
    effective_batch_size: int = 32  # pairs per optimizer step, over gradient accumulation and processes
    lr: float = 1e-5  # peak learning rate of AdamW
    warmup_ratio: float = 0.1  # cosine schedule with linear warm-up
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    max_grad_norm: float = 1.0  # gradients are clipped to this global norm before each step
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at each epoch's end)
    save_total_limit: int = 0  # keep only the newest N complete checkpoints (0: keep all; the one resumed from is never deleted)
    eval_every: int = 0  # with data.eval_path: evaluate every N optimizer steps (always before step 1 and after the last)
    eval_generate_every: int = 0  # with data.eval_path: at evaluations whose step is a multiple of N (and the first and last), also generate answers for 16 held-out questions and log CHAIR_i, CHAIR_s, recall and length (0: never; shared over the processes)
    save_merged: bool = False  # also save LoRA-merged full weights at the end
    resume_from: str | None = None  # a checkpoint folder written by a previous run, or latest: the newest complete one in output_dir (none yet: start at step 0)
    kernel_impl: str | None = None  # force triton | native | torch | reference for the log-prob ops
    report_to: str = "tensorboard"  # tensorboard | wandb | none: where metric rows go besides metrics.jsonl (wandb only when installed)
    tensorboard: bool | None = None  # deprecated, use report_to (true: tensorboard, false: none)
    plots: bool = True  # PNG curves of losses, rewards, margins and accuracies under output_dir/plots
    progress_bar: bool = True  # a tqdm bar with the loss and accuracy of each step
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is not None:  # list[str], tuple[float, float]
        return str(tp).replace("typing.", "")
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
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
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
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {yaml_error_line(exc)}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(tree).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. max_steps=10)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {yaml_error_line(exc)}") from None
        _set_dotted(tree, key.strip(), value)
    config = _build(TrainConfig, tree)
    validate(config)
    return config


def yaml_error_line(exc: yaml.YAMLError) -> str:
    """A YAML syntax error in one line: what is wrong and where (PyYAML's own text runs over several
    lines, quoting the source with a caret under the position)."""
    problem = getattr(exc, "problem", None)
    if problem is None:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    mark, context, context_mark = exc.problem_mark, exc.context, exc.context_mark
    line = problem + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "")
    if context:
        line += f" ({context}" + (f" from line {context_mark.line + 1}, column {context_mark.column + 1}" if context_mark else "") + ")"
    return line


def _float_keys(node, prefix: str = ""):
    """(dotted key, value) of every float value in a config (sections walked)."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _float_keys(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            yield prefix + f.name, value
        elif isinstance(value, tuple):
            yield from ((f"{prefix}{f.name}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float))


def validate(config: TrainConfig) -> None:
    """Checks across keys, with messages naming them."""
    from .loss import OBJECTIVES

    choices = {
        "objective": (config.objective, sorted(OBJECTIVES)),
        "data.on_bad_record": (config.data.on_bad_record, ["error", "skip"]),
        "data.corruption": (config.data.corruption, ["crop", "random_image", "moco_v2", "none"]),
        "data.prompt_template": (config.data.prompt_template, ["model", "verbatim"]),
        "model.finetune": (config.model.finetune, ["lora", "full", "all"]),
        "model.dtype": (config.model.dtype, ["auto", "float32", "bfloat16", "float16"]),
        "model.quantization": (config.model.quantization, ["none", "nf4", "int8"]),
        "model.quantization_compute_dtype": (config.model.quantization_compute_dtype, ["auto", "float32", "bfloat16", "float16"]),
        "model.quantization_storage": (config.model.quantization_storage, ["uint8", "bfloat16", "float16", "float32"]),
        "reference.mode": (config.reference.mode, ["cached", "live"]),
        "report_to": (config.report_to, ["tensorboard", "wandb", "none"]),
        "distributed.engine": (config.distributed.engine, ["ddp", "fsdp2", "zero2", "zero3"]),
        "distributed.offload": (config.distributed.offload, ["none", "optimizer", "all"]),
    }
    if isinstance(config.model.shared_prefix, bool):  # YAML 1.1 reads a bare on / off as true / false
        config.model.shared_prefix = "on" if config.model.shared_prefix else "off"
    choices["model.shared_prefix"] = (config.model.shared_prefix, ["auto", "on", "off"])
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {allowed}")
    if (config.model.preset is None) == (config.model.path is None):
        raise ConfigError("set exactly one of model.preset and model.path")
    if config.model.preset is not None:
        from .models.presets import PRESETS

        if config.model.preset not in PRESETS:
            raise ConfigError(f"model.preset={config.model.preset!r} is not one of {list(PRESETS)} "
                              "(a real model is model.path: a local save_pretrained folder)")
    if config.tensorboard is not None:  # the old key: kept working, mapped onto report_to
        if config.tensorboard and config.report_to != "tensorboard":
            raise ConfigError(f"tensorboard=true contradicts report_to={config.report_to!r}; tensorboard is a deprecated "
                              "alias: set only report_to (tensorboard | wandb | none)")
        if not config.tensorboard and config.report_to == "tensorboard":
            config.report_to = "none"
        config.tensorboard = None
    for key, value in _float_keys(config):  # YAML reads .nan: no setting means "not a number"
        if math.isnan(value):
            raise ConfigError(f"{key} is nan; give a number")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ConfigError(f"lr must be a finite number > 0 (the peak learning rate), got {config.lr}")
    if not (math.isfinite(config.loss.beta) and config.loss.beta > 0):
        raise ConfigError(f"loss.beta must be a finite number > 0, got {config.loss.beta} (β ≤ 0 zeroes or reverses every "
                          "preference: the rewards are β·(log π − log ρ))")
    if not 0 <= config.warmup_ratio <= 1:
        raise ConfigError(f"warmup_ratio must be in [0, 1] (the fraction of the steps that warm up), got {config.warmup_ratio}")
    if config.data.max_length < 1:
        raise ConfigError(f"data.max_length must be ≥ 1 (tokens per row, image tokens included), got {config.data.max_length}")
    for key in ("micro_batch_size", "effective_batch_size", "epochs"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key} must be ≥ 1, got {getattr(config, key)}")
    if config.overwrite_output_dir and config.resume_from == "latest":
        raise ConfigError("overwrite_output_dir=true and resume_from=latest contradict each other: a resumed run continues "
                          "the run in output_dir, an overwrite deletes it; set one of them")
    if config.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be ≥ 0, got {config.data.num_workers}")
    for key in ("max_pixels", "min_pixels"):
        value = getattr(config.data, key)
        if value is not None and value < 1:
            raise ConfigError(f"data.{key} must be ≥ 1 (pixels per image) or null, got {value}")
    if None not in (config.data.max_pixels, config.data.min_pixels) and config.data.min_pixels > config.data.max_pixels:
        raise ConfigError(f"data.min_pixels={config.data.min_pixels} is larger than data.max_pixels={config.data.max_pixels}")
    if config.save_total_limit < 0:
        raise ConfigError(f"save_total_limit must be ≥ 0 (0: keep every checkpoint), got {config.save_total_limit}")
    if config.eval_every < 0:
        raise ConfigError(f"eval_every must be ≥ 0, got {config.eval_every}")
    if config.eval_every and config.data.eval_path is None:
        raise ConfigError(f"eval_every={config.eval_every} needs data.eval_path (a file of held-out records)")
    if config.eval_generate_every < 0:
        raise ConfigError(f"eval_generate_every must be ≥ 0, got {config.eval_generate_every}")
    if config.eval_generate_every and config.data.eval_path is None:
        raise ConfigError(f"eval_generate_every={config.eval_generate_every} needs data.eval_path (held-out records with objects)")
    if config.effective_batch_size % config.micro_batch_size:
        raise ConfigError(
            f"effective_batch_size={config.effective_batch_size} must be a multiple of micro_batch_size={config.micro_batch_size}"
        )
    engine, offload = config.distributed.engine, config.distributed.offload
    if offload == "optimizer" and engine not in ("zero2", "zero3"):
        raise ConfigError(f"distributed.offload=optimizer needs distributed.engine zero2 or zero3 (now {engine}); "
                          "fsdp2 offloads weights, gradients and optimizer state together (offload: all)")
    if offload == "all" and engine not in ("fsdp2", "zero3"):
        raise ConfigError(f"distributed.offload=all needs distributed.engine fsdp2 or zero3 (now {engine}): "
                          "only they shard the weights")
    if config.save_merged and engine in ("fsdp2", "zero3"):
        raise ConfigError(f"save_merged=true needs the whole model in one process, which distributed.engine={engine} never "
                          "holds: merge the final/ adapter afterwards (README: Scale) or train with ddp / zero2")
    if config.distributed.deepspeed_config is not None and engine not in ("zero2", "zero3"):
        raise ConfigError(f"distributed.deepspeed_config is read by the DeepSpeed engines only (zero2, zero3); now engine={engine}")
    if config.model.quantization != "none" and config.model.finetune != "lora":
        raise ConfigError(f"model.quantization={config.model.quantization} needs model.finetune: lora (got {config.model.finetune}): "
                          "quantised weights cannot be trained; use LoRA on the quantised base, or model.quantization: none")
    if config.model.quantization != "none" and config.save_merged:
        raise ConfigError(f"save_merged=true with model.quantization={config.model.quantization}: merging LoRA into quantised "
                          "weights rounds the update away; final/ is an adapter for the unquantised base (merge it onto that base)")
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


# ------------------------------------------------------------------------------------------- help
def _comments_by_line(source: str) -> dict[int, str]:
    import io
    import tokenize

    return {tok.start[0]: tok.string.lstrip("#").strip()
            for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}


def config_keys(cls=None, prefix: str = "") -> list[dict]:
    """Every config key in declaration order: {'key', 'type', 'default', 'help'}, read from this file.

    'type' is the annotation as written, 'help' the comment at the end of the field's line (the
    dataclass comments are the documentation; a key without one has help ''), 'default' the value.
    """
    import ast
    import inspect
    import sys

    cls = TrainConfig if cls is None else cls
    source = inspect.getsource(sys.modules[__name__])
    comments = _comments_by_line(source)
    classes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
    lines = {node.target.id: (node.lineno, ast.get_source_segment(source, node.annotation))
             for node in classes[cls.__name__].body if isinstance(node, ast.AnnAssign)}
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(config_keys(hints[f.name], prefix=f"{prefix}{f.name}."))
            continue
        lineno, annotation = lines[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        keys.append({"key": prefix + f.name, "type": annotation, "default": default, "help": comments.get(lineno, "")})
    return keys


def _show(value) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def config_help(config: TrainConfig | None = None) -> str:
    """The text of `mdpo-train --help`'s key list: key, type, default and meaning of every key, by section.

    With `config` (`mdpo-train CONFIG --help`), a key whose value there differs from the default also
    shows that value.
    """
    current = to_dict(config) if config is not None else None
    out, section = [], None
    for entry in config_keys():
        key = entry["key"]
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            out.append(f"\n{head}:" if head else "\ntop-level keys:")
        line = f"  {key}  ({entry['type']}, default {_show(entry['default'])})"
        if current is not None:
            value = current
            for part in key.split("."):
                value = value[part]
            if _show(value) != _show(entry["default"]):
                line += f"  [this config: {_show(value)}]"
        out.append(line)
        out.append(f"      {entry['help'] or '(no description)'}")
    return "\n".join(out).lstrip("\n")
