"""Batched answer generation with any model mdpo trains: a model folder or preset, the same + a trained
LoRA adapter (`<output_dir>/final`, peft format), or a training checkpoint (`<output_dir>/checkpoints/step-N`).

    gm = load_generation_model("tiny-llava", adapter="outputs/tiny-cpu/final")
    questions = load_questions("sample_data/eval.json")
    rows = generate_answers(gm, questions, "out/answers.jsonl", GenerationOptions(max_new_tokens=32))

How a batch is built. Each question becomes a plain-shape `PreferenceRecord` and goes through
`PreferenceCollator.encode_prompt` (the one place prompts are rendered: the family's chat template
with its generation prompt, the image placeholder expanded into image tokens, the pixel inputs). The
per-token lists are LEFT-padded to the batch's longest prompt (pad id, mask 0, token types 0), so every
row's next token sits in the last column; pixel tensors are concatenated in row order.

Decoding is transformers' own `model.generate` (KV cache; the family's code builds Qwen's M-RoPE
positions from the attention mask, PaliGemma's prefix attention from `token_type_ids`, and feeds the
pixels on the first step only), checked against one-at-a-time generation for every family in
tests/test_generate.py. The model's `generation_config` is replaced by a clean one holding only its
token ids, so defaults shipped with a checkpoint (repetition penalty, sampling) never apply: only
`GenerationOptions` decide. Greedy is argmax. Sampling (temperature > 0, nucleus `top_p`) is done by a
logits processor of ours that draws each row's token from a CPU `torch.Generator` seeded by
(seed, question id), then leaves only that token for generate's argmax: a question's sample does not
depend on the batch it lands in, and is the same on CPU and GPU given the same probabilities (one
device→host copy of the (B, V) step logits per step when sampling; none when greedy).

Costs: one prefill over B × (longest prompt) tokens, then one decoder step of B tokens per new token,
until every row has emitted an end token or `max_new_tokens` is reached.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from ..errors import MdpoError

IMAGE_VARIANTS = ("image", "blank", "corrupted")  # the real image, a blank one, the training corruption
BLANK_COLOUR = (255, 255, 255)  # the blank image: white, the original's size
ANSWER_FIELDS = ("id", "image", "question", "answer", "tokens", "finished", "seconds")


class AdapterMismatchError(MdpoError, ValueError):
    """An adapter or checkpoint trained on another base model than the one it is applied to."""


class AnswersFileError(MdpoError, ValueError):
    """An answers.jsonl that cannot be resumed (written with other settings) or read."""


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 64  # new tokens per answer at most (the end token included)
    temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens whose probability reaches top_p
    seed: int = 0  # sampling: each question's generator is seeded by (seed, question id)
    batch_size: int = 8  # questions per generate call

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be a positive int")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be ≥ 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} must be a positive int")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ------------------------------------------------------------------------------------ questions
@dataclass
class Question:
    """One question about one image. `image` is the path as the data file writes it; `image_path` the
    file it names (joined to the image root). `meta` keeps every other key (objects, chosen, ...)."""

    index: int  # position in the data file
    sample_id: str
    image: str
    image_path: str
    question: str
    meta: dict[str, Any] = field(default_factory=dict)


def load_questions(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                   check_images: bool = True) -> list[Question]:
    """Questions from a JSON list or JSONL of `{id?, image | img_path | images, question, ...}`.

    Preference records of the plain and TRL shapes (`mdpo-data make-sample` output) are questions too;
    their other keys (objects, chosen, rejected, ...) land in `meta`. The id is `id`, else `image_id`,
    else a content hash (as for training records). Every image is checked up front (`check_images`;
    off when only answers written elsewhere are scored: no image is read then): a missing or
    unreadable file, a missing question or a duplicate id raises BadRecordError naming the record.
    """
    from ..data.records import BadRecordError, _message_text, _Reason, check_image_file, content_id, iter_raw_records

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"questions file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    questions, seen = [], {}
    for index, raw, parse_error in iter_raw_records(path):
        sample_id = None
        try:
            if parse_error is not None:
                raise _Reason(parse_error)
            if not isinstance(raw, dict):
                raise _Reason(f"not a JSON object but {type(raw).__name__}")
            key = raw.get("id", raw.get("image_id"))
            sample_id = str(key) if key is not None else content_id(raw)
            image = next((raw[k] for k in ("image", "img_path", "images") if raw.get(k) is not None), None)
            if isinstance(image, list) and len(image) == 1:
                image = image[0]
            if isinstance(image, dict):
                image = image.get("path")
            if not isinstance(image, str) or not image:
                raise _Reason("missing image ('image', 'img_path' or 'images': one path)")
            question = raw.get("question")
            if question is None and isinstance(raw.get("prompt"), list):  # TRL shape: the user turn's text
                question = _message_text(raw["prompt"], "user", "prompt")
            if question is None and isinstance(raw.get("prompt"), str):
                raise _Reason("a paper-shape 'prompt' is templated for one model; give the plain 'question' instead")
            if not isinstance(question, str) or not question.strip():
                raise _Reason("missing or empty 'question'")
            if sample_id in seen:
                raise _Reason(f"duplicate id (first used by record {seen[sample_id]})")
            image_path = image if os.path.isabs(image) else os.path.join(str(root), image)
            if check_images:
                check_image_file(image_path)
        except _Reason as reason:
            raise BadRecordError(index, sample_id, str(reason), str(path)) from None
        seen[sample_id] = index
        meta = {k: v for k, v in raw.items() if k not in ("id", "image", "img_path", "images", "question")}
        questions.append(Question(index, sample_id, image, image_path, question.strip(), meta))
    if not questions:
        raise BadRecordError(0, None, "the file holds no questions", str(path))
    return questions


def question_image(question: Question, variant: str = "image", corruption=None, pool=None):
    """The PIL image a question is asked with: its own (`image`), a blank of the same size (`blank`),
    or the training corruption of epoch 0 (`corrupted`, `mdpo.data.corrupt_image` with `corruption`,
    a CorruptionConfig; `pool` for random_image: the questions themselves)."""
    from PIL import Image

    from ..data import corrupt_image, load_image

    if variant not in IMAGE_VARIANTS:
        raise ValueError(f"image variant {variant!r} must be one of {IMAGE_VARIANTS}")
    image = load_image(_as_record(question))
    if variant == "blank":
        return Image.new("RGB", image.size, BLANK_COLOUR)
    if variant == "corrupted":
        from ..data import CorruptionConfig

        return corrupt_image(image, question.sample_id, 0, corruption or CorruptionConfig(), pool=pool,
                             own_path=question.image_path)
    return image


def _as_record(question: Question):
    """The plain-shape PreferenceRecord the collator renders a question's prompt from."""
    from ..data import PreferenceRecord

    return PreferenceRecord(index=question.index, sample_id=question.sample_id, image_path=question.image_path,
                            chosen="", rejected="", shape="plain", question=question.question)


# ---------------------------------------------------------------------------------------- models
@dataclass
class GenerationModel:
    """A model ready to answer: the HF (or peft) model in eval mode, its processor, the collator whose
    `encode_prompt` renders prompts, and where it came from."""

    model: torch.nn.Module
    processor: Any
    family: str
    adapter: Any  # the mdpo FamilyAdapter
    collator: Any  # PreferenceCollator: encode_prompt renders every prompt
    device: torch.device
    label: str  # short name for tables ("base", "final", "step-000100", ...)
    source: str  # model folder / preset, + adapter or checkpoint path
    kind: str = "base"  # base | adapter | checkpoint | full model
    run_config: Any = None  # the TrainConfig of the run the adapter / checkpoint comes from, if known
    preset_seed: int | None = None  # the seed of a preset's random weights (None: a model folder)
    eos_ids: tuple[int, ...] = ()

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    def identity(self) -> dict:
        """What the answers depend on besides the options (kept beside answers.jsonl for resuming); a
        quantised base adds its quantisation (absent otherwise, so older settings files still match)."""
        from ..models.quantization import quantization_of

        quantization = quantization_of(self.adapter.unwrap(self.model))
        return {"source": self.source, "kind": self.kind, "family": self.family, "preset_seed": self.preset_seed,
                "dtype": str(next(self.model.parameters()).dtype),
                "prompt": [getattr(self.collator, k, None) for k in ("system_prompt", "prompt_template")],
                **({"quantization": quantization} if quantization else {})}


def _default_device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_base(model: str, device: torch.device, dtype, preset_seed: int, quantization: str = "none"):
    """(LoadedModel, preset seed or None): a preset's random weights with `preset_seed`, or a folder;
    with `quantization` nf4 / int8 its language model loaded quantised (mdpo.models.quantization)."""
    from ..models import PRESETS, build_preset, choose_attn_implementation, load_model, resolve_dtype
    from ..models.quantization import check_quantization_available, default_settings, quantize_in_memory

    torch_dtype = resolve_dtype(dtype, device)
    settings = default_settings(quantization, torch_dtype)
    if settings is not None:
        check_quantization_available(settings.method, device)
    if model in PRESETS and not Path(model).exists():
        attn = choose_attn_implementation(device) if torch_dtype != torch.float32 else "sdpa"
        loaded = build_preset(model, seed=preset_seed, dtype=torch_dtype, attn_implementation=attn)
        if settings is not None:
            loaded.model = quantize_in_memory(loaded.model, settings, loaded.adapter, device)
        return loaded, preset_seed
    return load_model(model, dtype=dtype, device=device, quantization=settings), None


def wrap_model(model, processor, family: str, adapter, device, *, label: str = "model", source: str = "",
               kind: str = "base", run_config=None, preset_seed: int | None = None, prompt_config=None) -> GenerationModel:
    """A GenerationModel around a model already in memory (e.g. the policy during training): its
    collator and end tokens; the model's train/eval mode, device and generation_config are left alone."""
    from ..data import PreferenceCollator

    prompt_config = prompt_config or run_config
    if prompt_config is not None:  # the run's own collator settings (make_collator), without its corruption
        import copy
        import types

        from ..components import make_collator
        from ..data import CorruptionConfig

        prompt_config = copy.deepcopy(prompt_config)
        prompt_config.data.corruption = "none"
        loaded = types.SimpleNamespace(processor=processor, family=family, adapter=adapter)
        collator = make_collator(prompt_config, loaded, CorruptionConfig(strategy="none"), [])
    else:
        collator = PreferenceCollator(processor, objective="dpo", max_length=1 << 30, family=family)
    eos = {collator.eos_id}
    shipped = getattr(getattr(adapter.unwrap(model), "generation_config", None), "eos_token_id", None)
    eos.update([shipped] if isinstance(shipped, int) else list(shipped or []))
    return GenerationModel(model=model, processor=processor, family=family, adapter=adapter, collator=collator,
                           device=torch.device(device), label=label, source=source, kind=kind, run_config=run_config,
                           preset_seed=preset_seed, eos_ids=tuple(sorted(eos)))


def clean_generation_config(gm: GenerationModel):
    """A generation config holding only the token ids, so that defaults shipped with a checkpoint
    (repetition penalty, sampling, ...) never apply: only `GenerationOptions` decide."""
    from transformers import GenerationConfig

    return GenerationConfig(eos_token_id=list(gm.eos_ids), pad_token_id=gm.collator.pad_id,
                            bos_token_id=gm.collator.tokenizer.bos_token_id)


def _finish(loaded, device, label, source, kind, run_config=None, preset_seed=None, prompt_config=None) -> GenerationModel:
    model = loaded.model.to(device).eval()
    gm = wrap_model(model, loaded.processor, loaded.family, loaded.adapter, device, label=label, source=source,
                    kind=kind, run_config=run_config, preset_seed=preset_seed, prompt_config=prompt_config)
    loaded.adapter.unwrap(model).generation_config = clean_generation_config(gm)  # we own this model
    return gm


def load_generation_model(
    model: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    preset_seed: int = 0,
    label: str | None = None,
    prompt_config=None,
    quantization: str = "none",
) -> GenerationModel:
    """A model to generate with.

    model: a local model folder (save_pretrained) or a preset name (tiny-llava, ...; random weights
        drawn with `preset_seed`, as `mdpo-train` draws them with the run's `seed`).
    adapter: None; a peft adapter folder (`<output_dir>/final` of a LoRA run); a full model folder of the
        same architecture (`<output_dir>/final` of a full fine-tuning run); or a training checkpoint
        (`<output_dir>/checkpoints/step-N`: its run's config.json builds the model, `load_trained_weights`
        copies the trained parameters in). An adapter or checkpoint of another base model (other
        preset, seed or family; other layer names or sizes) raises AdapterMismatchError naming both.
    device: default CUDA when available. dtype: None → bf16 on CUDA, fp32 on the CPU (as training);
        attention SDPA (flash-attn on CUDA when importable and the dtype allows it).
    prompt_config: a TrainConfig whose collator settings (`mdpo.components.make_collator`) render the
        prompts; default: the run's own for an adapter / checkpoint, the collator's defaults for a base.
    quantization: none | nf4 | int8: how the base model's language model loads (mdpo.models.quantization),
        for every kind alike, a checkpoint included whatever its run used: a LoRA adapter of a quantised
        run is an adapter for the unquantised base and loads on either. Default none (full precision).
    """
    device = _default_device(device)
    model = os.fspath(model)
    if adapter is None:
        loaded, seed = _load_base(model, device, dtype, preset_seed, quantization)
        return _finish(loaded, device, label or "base", model, "base", preset_seed=seed, prompt_config=prompt_config)
    adapter = Path(adapter)
    if (adapter / "adapter_config.json").is_file():
        return _load_peft(model, adapter, device, dtype, preset_seed, label, prompt_config, quantization)
    if (adapter / "config.json").is_file() and not (adapter / "model.safetensors").exists():
        return _load_checkpoint(model, adapter, device, preset_seed, label, prompt_config, quantization)
    if (adapter / "config.json").is_file():  # a full model folder: full fine-tuning's final/
        return _load_full_model(model, adapter, device, dtype, preset_seed, label, prompt_config, quantization)
    raise AdapterMismatchError(
        f"--adapter {adapter}: neither a peft adapter folder (no adapter_config.json) nor a training checkpoint "
        "(no config.json); give <output_dir>/final of a LoRA run or <output_dir>/checkpoints/step-N"
    )


def _run_config(path: Path):
    """The TrainConfig in `path` (a run's config.json), or None when there is none or it does not load."""
    from ..config import ConfigError, load_config

    if not path.is_file():
        return None
    try:
        return load_config(path)
    except ConfigError:
        return None


def _check_run_base(run_cfg, run_cfg_path: Path, model: str, preset_seed: int | None, what: str) -> None:
    """Refuse an adapter / checkpoint whose run trained another preset (or the same preset with other
    random weights) than `model`; a model folder is compared by its resolved path."""
    if run_cfg is None:
        return
    if run_cfg.model.preset is not None:
        if model != run_cfg.model.preset:
            raise AdapterMismatchError(f"{what} was trained on model.preset={run_cfg.model.preset} ({run_cfg_path}), "
                                       f"not on {model}; pass --model {run_cfg.model.preset}")
        if preset_seed is not None and preset_seed != run_cfg.seed:
            raise AdapterMismatchError(
                f"{what} was trained on {model} with random weights of seed {run_cfg.seed} ({run_cfg_path}), not on "
                f"those of seed {preset_seed}; pass --preset-seed {run_cfg.seed}")
        return
    trained = run_cfg.model.path
    if model in _presets() and not Path(model).exists():
        raise AdapterMismatchError(f"{what} was trained on model.path={trained} ({run_cfg_path}), not on the preset {model}")
    if Path(model).resolve() != Path(trained).resolve():  # the folder may have moved: the weight check decides
        import warnings

        warnings.warn(f"{what} was trained on model.path={trained}; evaluated on the base {model}, another folder")


def _load_full_model(model: str, folder: Path, device, dtype, preset_seed: int, label, prompt_config,
                     quantization: str = "none") -> GenerationModel:
    """A whole model folder written by a full fine-tuning run (`<output_dir>/final`), compared side by side
    with the base: it must be the base's architecture (same model_type and layer shapes), and its prompts
    are rendered with that run's settings (`<output_dir>/config.json`) when the folder sits in a run."""
    import transformers

    from ..config import load_config

    mine = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    if model in _presets() and not Path(model).exists():
        from ..models import build_preset

        base = build_preset(model, seed=preset_seed).model.config
    else:
        base = transformers.AutoConfig.from_pretrained(model, local_files_only=True)
    shape = lambda c: (c.model_type, c.get_text_config().hidden_size, c.get_text_config().num_hidden_layers,  # noqa: E731
                       c.get_text_config().vocab_size)
    if shape(mine) != shape(base):
        raise AdapterMismatchError(f"--adapter {folder}: a full model of another architecture than --model {model} "
                                   f"(model_type, hidden size, layers, vocabulary {shape(mine)} vs {shape(base)})")
    run_cfg = load_config(folder.parent / "config.json") if (folder.parent / "config.json").is_file() else None
    loaded, _ = _load_base(str(folder), device, dtype, preset_seed, quantization)
    return _finish(loaded, device, label or _default_label(folder), str(folder), "full model", run_config=run_cfg,
                   prompt_config=prompt_config)


def _presets():
    from ..models import PRESETS

    return PRESETS


def adapter_weight_shapes(adapter_dir: Path) -> dict[str, list[int]]:
    """{tensor name: shape} of a peft adapter folder's weights, the file peft will load:
    adapter_model.safetensors (its header only, no weights read) when there is one, else
    adapter_model.bin read with torch.load(weights_only=True), so a .bin holding a pickled object is
    refused naming the file (CheckpointError) before peft would end in a traceback. {} without either."""
    from ..checkpoints import CheckpointError, load_file

    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as handle:
                return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except Exception as exc:  # noqa: BLE001 — a cut-off or foreign file: safetensors' own error, in one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CheckpointError(f"{weights}: not a readable safetensors file ({type(exc).__name__}: {first})") from None
    legacy = adapter_dir / "adapter_model.bin"
    if not legacy.is_file():
        return {}
    try:
        tensors = load_file(legacy)
    except CheckpointError as err:
        raise CheckpointError(f"{err} (a peft adapter saved by save_pretrained is adapter_model.safetensors, which holds "
                              "no code and is read first when present)") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointError(f"{legacy}: not a mapping of tensor names to tensors (a peft adapter's weights)")
    return {key: list(value.shape) for key, value in tensors.items()}


def check_adapter_complete(model: torch.nn.Module, adapter_dir: Path, shapes: dict[str, list[int]]) -> None:
    """AdapterMismatchError unless the adapter file held every LoRA tensor of the peft model built from
    its adapter_config.json (peft only warns, and a missing B matrix stays at zero: the adapter is
    silently partly off). peft names a parameter `...lora_A.default.weight` and saves it as `...lora_A.weight`."""
    expected = sorted(name.replace(".default.", ".") for name, _ in model.named_parameters() if ".lora_" in name)
    missing = [name for name in expected if name not in shapes]
    if missing:
        shown = ", ".join(missing[:2]) + (f" and {len(missing) - 2} more" if len(missing) > 2 else "")
        raise AdapterMismatchError(f"adapter {adapter_dir}: {len(missing)} of the {len(expected)} LoRA tensors its "
                                   f"adapter_config.json makes are missing from its weights file ({shown}); a damaged adapter")


def check_adapter_fits(adapter_dir: Path, base_model: torch.nn.Module, base_family: str, base_name: str) -> None:
    """AdapterMismatchError unless the peft adapter in `adapter_dir` fits `base_model`: the family of
    the processor saved beside it (mdpo-train saves one in final/) and every LoRA matrix's module name
    and size (`adapter_weight_shapes`: the safetensors header, no weights loaded; or a .bin read safely)."""
    from ..data import detect_family, load_processor

    if (adapter_dir / "tokenizer_config.json").is_file() or (adapter_dir / "processor_config.json").is_file():
        try:
            family = detect_family(load_processor(adapter_dir))
        except Exception:  # noqa: BLE001 — an unreadable processor leaves the weight check below
            family = None
        if family not in (None, "generic") and family != base_family and {family, base_family} != {"idefics3", "smolvlm"}:
            raise AdapterMismatchError(f"adapter {adapter_dir} was trained on a {family} model (its saved processor), "
                                       f"not on the {base_family} model {base_name}")
    modules = dict(base_model.named_modules())
    problems = []
    for key, shape in adapter_weight_shapes(adapter_dir).items():
        if ".lora_A" not in key and ".lora_B" not in key:
            continue
        name = key.removeprefix("base_model.model.").split(".lora_")[0]
        module = modules.get(name)
        if module is None or not hasattr(module, "in_features"):
            problems.append(f"{name} is not a linear layer of the base")
        elif ".lora_A" in key and shape[1] != module.in_features:
            problems.append(f"{name}: LoRA A takes {shape[1]} inputs, the base layer {module.in_features}")
        elif ".lora_B" in key and shape[0] != module.out_features:
            problems.append(f"{name}: LoRA B gives {shape[0]} outputs, the base layer {module.out_features}")
        if len(problems) >= 3:
            break
    if problems:
        raise AdapterMismatchError(f"adapter {adapter_dir} does not fit the base model {base_name}: " + "; ".join(problems))


def _load_peft(model: str, adapter: Path, device, dtype, preset_seed, label, prompt_config=None,
               quantization: str = "none") -> GenerationModel:
    from peft import PeftModel

    run_cfg_path = adapter.parent / "config.json"  # <output_dir>/config.json beside <output_dir>/final
    run_cfg = _run_config(run_cfg_path)
    seed = preset_seed if model in _presets() and not Path(model).exists() else None
    _check_run_base(run_cfg, run_cfg_path, model, seed, f"adapter {adapter}")  # before loading anything
    shapes = adapter_weight_shapes(adapter)  # before any weight loads: a pickled .bin is refused here, naming it
    loaded, seed = _load_base(model, device, dtype, preset_seed, quantization)
    check_adapter_fits(adapter, loaded.model, loaded.family, model)
    import warnings

    with warnings.catch_warnings():  # peft reads the deprecated `is_gradient_checkpointing` property
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Found missing adapter keys", category=UserWarning)  # refused below
        loaded.model = PeftModel.from_pretrained(loaded.model, str(adapter), is_trainable=False)
    check_adapter_complete(loaded.model, adapter, shapes)
    return _finish(loaded, device, label or _default_label(adapter), f"{model}+{adapter}", "adapter", run_cfg, seed,
                   prompt_config)


def _load_checkpoint(model: str, ckpt: Path, device, preset_seed: int, label, prompt_config=None,
                     quantization: str = "none") -> GenerationModel:
    """A training checkpoint: the run's model rebuilt from its config.json (LoRA or full fine-tuning),
    its base loaded with `quantization` (not the run's own setting), its trained parameters copied in
    by `mdpo.distributed.load_trained_weights` (any engine's checkpoint)."""
    from ..distributed import load_trained_weights
    from ..components import build_model
    from ..config import ConfigError, load_config, validate

    try:
        cfg = load_config(ckpt / "config.json")
    except ConfigError as err:
        raise AdapterMismatchError(f"--adapter {ckpt}: config.json is not an mdpo-train run config ({err})") from None
    _check_run_base(cfg, ckpt / "config.json", model, preset_seed if model in _presets() else None, f"checkpoint {ckpt}")
    if cfg.reference.mode == "live" and cfg.model.finetune in ("full", "all"):
        cfg.reference.mode = "cached"  # build_model would copy the whole model for a live reference
    cfg.model.quantization, cfg.save_merged = quantization, False
    validate(cfg)  # e.g. a quantised base for a full fine-tuning checkpoint: one line naming model.quantization
    loaded, _ = build_model(cfg, device)
    load_trained_weights(loaded.model, ckpt, "--adapter", cast=True)
    seed = cfg.seed if cfg.model.preset is not None else None
    return _finish(loaded, device, label or _default_label(ckpt), f"{model}+{ckpt}", "checkpoint", cfg, seed,
                   prompt_config)


def _default_label(path: Path) -> str:
    """`<run>/final` → the run folder's name; `<run>/checkpoints/step-N` → `<run>/step-N`."""
    path = Path(path)
    if path.name == "final":
        return path.parent.name or "final"
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}/{path.name}"
    return path.name


# ------------------------------------------------------------------------------------ generation
def item_seed(seed: int, sample_id: str) -> int:
    """The sampling seed of one question: BLAKE2b of (seed, id), so it never depends on the batch."""
    key = f"mdpo-generate|{seed}|{sample_id}".encode("utf-8")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


class _RowSampler:
    """A logits processor: each row's next token drawn from its own generator (temperature, top-p);
    returns scores that are 0 at that token and -inf elsewhere, so generate's argmax picks it."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators, self.temperature, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float().cpu() / self.temperature, dim=-1)  # (B, V); a device→host sync
        chosen = []
        for row, gen in zip(probs, self.generators):
            if self.top_p < 1:
                sorted_p, order = torch.sort(row, descending=True)
                before = torch.cumsum(sorted_p, 0) - sorted_p  # mass of the tokens ranked above each one
                sorted_p = torch.where(before < self.top_p, sorted_p, torch.zeros_like(sorted_p))
                row = torch.zeros_like(row).scatter_(0, order, sorted_p)
            chosen.append(int(torch.multinomial(row, 1, generator=gen)))
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(chosen), device=scores.device), torch.tensor(chosen, device=scores.device)] = 0.0
        return out


@dataclass
class Generated:
    ids: list[int]  # new tokens before the first end token
    text: str
    finished: bool  # an end token came before max_new_tokens
    logprobs: list[float] | None = None  # log p of each new token under the model (return_logprobs=True)


def left_pad(prompts: Sequence[dict[str, Any]], pad_id: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`encode_prompt` outputs → one batch: per-token lists LEFT-padded (input_ids with `pad_id`, every
    other key with 0), pixel tensors concatenated in row order (zero-padded where their shapes differ;
    floating ones cast to `dtype`). (B, T) int64 token tensors."""
    from ..data.collate import _concat_padded

    length = max(len(p["tokens"]["input_ids"]) for p in prompts)
    batch = {}
    for key in prompts[0]["tokens"]:
        fill = pad_id if key == "input_ids" else 0
        batch[key] = torch.tensor([[fill] * (length - len(p["tokens"][key])) + list(p["tokens"][key]) for p in prompts],
                                  dtype=torch.long)
    for key in prompts[0]["pixels"]:
        value = _concat_padded([p["pixels"][key] for p in prompts])
        batch[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    return batch


@torch.no_grad()
def generate_batch(gm: GenerationModel, questions: Sequence[Question], options: GenerationOptions = GenerationOptions(),
                   images: Sequence | None = None, return_logprobs: bool = False,
                   synced_gpus: bool | None = None) -> list[Generated]:
    """Answers to `questions` in one left-padded `model.generate` call (see the module docstring).

    images: the PIL images to ask with (default: each question's own image).
    synced_gpus: passed to transformers' `generate` (None: its own choice). True under DeepSpeed ZeRO-3 or
        FSDP with several processes: every decoder step is then a collective, and a process whose rows
        have all ended keeps stepping until every process has ended.
    """
    from transformers import LogitsProcessorList

    images = list(images) if images is not None else [question_image(q) for q in questions]
    prompts = [gm.collator.encode_prompt(_as_record(q), image) for q, image in zip(questions, images)]
    dtype = next(gm.model.parameters()).dtype
    batch = {k: v.to(gm.device) for k, v in left_pad(prompts, gm.collator.pad_id, dtype).items()}
    width = batch["input_ids"].shape[1]
    processors = LogitsProcessorList()
    if not options.greedy:
        generators = [torch.Generator().manual_seed(item_seed(options.seed, q.sample_id)) for q in questions]
        processors.append(_RowSampler(generators, options.temperature, options.top_p))
    extra = {} if synced_gpus is None else {"synced_gpus": synced_gpus}
    out = gm.model.generate(**batch, max_new_tokens=options.max_new_tokens, do_sample=False, num_beams=1,
                            logits_processor=processors, return_dict_in_generate=True, output_logits=return_logprobs,
                            **extra)
    new = out.sequences[:, width:].cpu()
    steps = torch.stack(out.logits, dim=1).float().log_softmax(-1).cpu() if return_logprobs else None  # (B, N, V)
    results, ends = [], set(gm.eos_ids)
    for row, ids in enumerate(new.tolist()):
        cut = next((i for i, t in enumerate(ids) if t in ends), None)
        kept = ids if cut is None else ids[:cut]
        logprobs = None
        if steps is not None:
            upto = len(kept) + (cut is not None)
            logprobs = [float(steps[row, i, ids[i]]) for i in range(upto)]
        text = gm.collator.tokenizer.decode(kept, skip_special_tokens=True).strip()
        results.append(Generated(ids=kept, text=text, finished=cut is not None, logprobs=logprobs))
    return results


def _settings_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.stem + ".settings.json")


def read_answers(path: str | os.PathLike) -> list[dict]:
    """The rows of an answers.jsonl; a last line cut short by an interrupted write is dropped."""
    path = Path(path)
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # interrupted mid-write
            raise AnswersFileError(f"{path}: line {number} is not valid JSON") from None
    return rows


# --------------------------------------------------------------------------- several processes
AllGather = Callable[[Any], list]  # obj -> [the obj of rank 0, of rank 1, ...], on every rank


def resolve_processes(rank: int | None = None, world: int | None = None,
                      all_gather: AllGather | None = None) -> tuple[int, int, AllGather | None]:
    """(rank, world, all_gather): the given ones, else torch.distributed's when a process group is
    initialised (`all_gather_object`), else one process (0, 1, None)."""
    from ..data.processes import Processes

    group = Processes.current()
    rank = group.rank if rank is None else rank
    world = group.world if world is None else world
    if all_gather is None and world > 1:
        if group.world != world:
            raise ValueError(f"world={world} needs an all_gather callable, or an initialised torch.distributed group "
                             f"of that size (here: {group.world} process(es))")
        all_gather = group.all_gather  # pickles obj; a few KB per round here
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} must be in [0, world={world})")
    return rank, world, all_gather


def shard_rounds(n_questions: int, world: int, batch_size: int) -> int:
    """The number of generate calls EVERY process makes for `n_questions` shared round-robin over
    `world` processes in batches of `batch_size`: the largest share's batches (0 for no question)."""
    return math.ceil(math.ceil(n_questions / world) / batch_size) if n_questions else 0


def sharded_generate(
    gm: GenerationModel,
    questions: Sequence[Question],
    options: GenerationOptions = GenerationOptions(),
    *,
    rank: int | None = None,
    world: int | None = None,
    all_gather: AllGather | None = None,
    synced_gpus: bool | None = None,
    image_of: Callable[[Question], Any] | None = None,
    on_round: Callable[[list[tuple[int, Generated, float]]], None] | None = None,
) -> list[tuple[Generated, float]]:
    """Answers to `questions` shared over processes. -> [(Generated, seconds)] in question order, the
    same list on every process (seconds: the row's share of its batch's wall time).

    Process `rank` answers questions[rank::world] in batches of `options.batch_size`. Every process
    makes the same number of generate calls (`shard_rounds`): one whose share is short runs a padding
    batch of one repeated question and drops its answer. Under FSDP2 or DeepSpeed ZeRO-3 every forward
    is a collective, so an unequal number of calls would hang; pass `synced_gpus=True` there (ZeRO-3
    needs it, see `generate_batch`). After every round the new answers are gathered with `all_gather`
    (default: torch.distributed's all_gather_object when a group is initialised) and handed to
    `on_round` in question order as [(question index, Generated, seconds)] (e.g. to append them to a
    file on rank 0). With greedy decoding, or sampling (each question draws from its own generator),
    the answers are those of one process: a row's answer does not depend on the batch it lands in.
    image_of: question -> the PIL image to ask with (default: its own image).
    Costs: one all_gather of the round's answers (a few KB) per round.
    """
    rank, world, all_gather = resolve_processes(rank, world, all_gather)
    mine = list(range(rank, len(questions), world))
    size = options.batch_size
    results: list[tuple[Generated, float] | None] = [None] * len(questions)
    for round_ in range(shard_rounds(len(questions), world, size)):
        indices = mine[round_ * size : (round_ + 1) * size]
        chunk = [questions[i] for i in indices] or [questions[mine[0] if mine else 0]]  # padding: answer dropped
        images = [image_of(q) for q in chunk] if image_of is not None else None
        began = time.perf_counter()
        answers = generate_batch(gm, chunk, options, images, synced_gpus=synced_gpus)
        share = (time.perf_counter() - began) / len(chunk)
        local = [(i, a, share) for i, a in zip(indices, answers)]
        parts = all_gather(local) if world > 1 else [local]
        gathered = sorted((item for part in parts for item in part), key=lambda item: item[0])
        for i, answer, seconds in gathered:
            results[i] = (answer, seconds)
        if on_round is not None:
            on_round(gathered)
    return results  # type: ignore[return-value]


def generate_answers(
    gm: GenerationModel,
    questions: Sequence[Question],
    out_path: str | os.PathLike,
    options: GenerationOptions = GenerationOptions(),
    *,
    variant: str = "image",
    corruption=None,
    progress: bool = True,
    desc: str | None = None,
    rank: int | None = None,
    world: int | None = None,
    all_gather: AllGather | None = None,
    synced_gpus: bool | None = None,
) -> list[dict]:
    """Answer every question and write `out_path` (JSONL, one row per question in question order:
    id, image, question, answer, tokens (new tokens before the end token), finished, seconds (the
    row's share of its batch's wall time)). -> the rows (on every process).

    Resuming: rows already in `out_path` for these questions are kept and not generated again; the
    settings they were made with (model, options, image variant, corruption) are kept beside it in
    `<stem>.settings.json`, and other settings raise AnswersFileError. Rows are appended batch by batch
    (an interruption loses at most one batch), and the file is rewritten in question order at the end.
    variant: image | blank | corrupted (`question_image`); corruption: the CorruptionConfig of `corrupted`.
    Several processes (`torchrun` / `accelerate launch`; rank, world, all_gather as in `sharded_generate`,
    default torch.distributed's): each answers its share, every process reads the file first, and only
    rank 0 writes it; the rows gathered after each round are appended in question order, so the file
    is the one a single process writes (bar the `seconds`).
    """
    from tqdm.auto import tqdm

    rank, world, all_gather = resolve_processes(rank, world, all_gather)
    main = rank == 0
    out_path = Path(out_path)
    decisive = {k: v for k, v in asdict(options).items() if k != "batch_size"}  # answers do not depend on the batch
    settings = {"model": gm.identity(), "options": decisive, "variant": variant,
                "corruption": corruption.fingerprint() if (corruption is not None and variant == "corrupted") else None}
    settings = json.loads(json.dumps(settings, default=str))
    settings_path = _settings_path(out_path)
    wanted = {q.sample_id for q in questions}
    done: dict[str, dict] = {}
    if out_path.is_file():  # every process reads before rank 0 writes (the barrier below)
        previous = json.loads(settings_path.read_text()) if settings_path.is_file() else None
        if previous != settings:
            changed = sorted(k for k in settings if previous is None or previous.get(k) != settings[k])
            raise AnswersFileError(f"{out_path} was written with other settings ({', '.join(changed)} differ; see "
                                   f"{settings_path}); give another output folder or delete it to start again")
        for row in read_answers(out_path):
            if row.get("id") in wanted:
                done.setdefault(row["id"], row)
    if world > 1:
        all_gather(None)  # barrier: nobody reads the file once rank 0 starts rewriting it
    todo = [q for q in questions if q.sample_id not in done]
    pool = questions if (corruption is not None and corruption.strategy == "random_image") else None
    handle = None
    if main:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        settings_path.write_text(json.dumps(settings, indent=2) + "\n")
        handle = open(out_path, "w", encoding="utf-8")
        for row in done.values():  # what an earlier run left, without a cut-short last line
            handle.write(json.dumps(row) + "\n")
        handle.flush()
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc=desc or f"answers ({gm.label})",
               disable=not (progress and main), unit="answer")

    def keep(gathered):
        for i, answer, share in gathered:
            q = todo[i]
            row = {"id": q.sample_id, "image": q.image, "question": q.question, "answer": answer.text,
                   "tokens": len(answer.ids), "finished": answer.finished, "seconds": round(share, 4)}
            done[q.sample_id] = row
            if handle is not None:
                handle.write(json.dumps(row) + "\n")
        if handle is not None:
            handle.flush()
        bar.update(len(gathered))

    try:
        sharded_generate(gm, todo, options, rank=rank, world=world, all_gather=all_gather, synced_gpus=synced_gpus,
                         image_of=lambda q: question_image(q, variant, corruption, pool), on_round=keep)
    finally:
        bar.close()
        if handle is not None:
            handle.close()
    rows = [done[q.sample_id] for q in questions]
    if main:
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        os.replace(tmp, out_path)
    if world > 1:
        all_gather(None)  # the file is complete before any process goes on
    return rows


def throughput(rows: Iterable[dict]) -> dict[str, float]:
    """{answers, tokens, seconds, answers_per_s, tokens_per_s} of generated rows (from their `seconds`)."""
    rows = list(rows)
    seconds = sum(r["seconds"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    return {"answers": len(rows), "tokens": tokens, "seconds": round(seconds, 3),
            "answers_per_s": round(len(rows) / seconds, 3) if seconds else float("nan"),
            "tokens_per_s": round(tokens / seconds, 3) if seconds else float("nan")}
