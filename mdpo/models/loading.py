"""Loading a vision-language model and its processor from a local folder (offline) or a tiny preset."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..errors import ModelLoadError, ModelNotFoundError
from .adapters import SUPPORTED_MODEL_TYPES, adapter_for_model_type, get_adapter
from .loaded import LoadedModel, choose_attn_implementation, resolve_dtype  # noqa: F401 — imported from here too

def inspect_model_folder(path: str | os.PathLike, family: str | None = None):
    """(transformers config, FamilyAdapter) of a local model folder, without reading any weights.

    Raises ModelNotFoundError for a missing folder or one without config.json, ModelLoadError for a
    model_type no family serves or a `family` that does not serve it. Costs one small JSON read.
    """
    from .presets import PRESETS

    name = os.fspath(path)
    folder = Path(name)
    if not folder.is_dir():
        hint = f"; or one of the presets: {', '.join(PRESETS)}" if name.startswith("tiny-") else ""
        raise ModelNotFoundError(
            f"model folder {name!r} does not exist (model.path must be a local folder written by "
            f"save_pretrained; models are never downloaded{hint})"
        )
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"model folder {name!r} has no config.json; is it a save_pretrained folder?")

    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:  # e.g. a model_type transformers does not know
        model_type = _raw_model_type(folder / "config.json")
        if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
            adapter_for_model_type(model_type, source=str(folder / "config.json"))  # raises, naming it
        raise ModelLoadError(f"model folder {name!r}: config.json cannot be read by transformers: {exc}") from exc
    detected = adapter_for_model_type(config.model_type, source=str(folder / "config.json"))
    adapter = detected if family is None else get_adapter(family)
    if config.model_type not in adapter.model_types:
        raise ModelLoadError(
            f"family {family!r} does not serve model_type {config.model_type!r} of {name!r} "
            f"(that model_type belongs to family {detected.family!r})"
        )
    return config, adapter


def _raw_model_type(config_json: Path) -> str | None:
    import json

    try:
        return json.loads(config_json.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def load_processor_only(path_or_preset: str | os.PathLike, family: str | None = None) -> LoadedModel:
    """The processor and family adapter of a folder or preset, with `model=None`: no weights are read.

    The cheap first half of `load_model`: records can be read and checked with this processor before
    minutes of weight loading; pass the result to `load_model(..., prepared=…)` to fill in the model.
    """
    from .presets import PRESETS

    name = os.fspath(path_or_preset)
    if name in PRESETS and not Path(name).exists():
        from mdpo.tiny_processors import build_tiny_processor

        preset_family = PRESETS[name][0]
        adapter = get_adapter(preset_family)
        if family is not None and get_adapter(family) is not adapter:
            raise ModelLoadError(f"family {family!r} does not match preset {name!r} (family {adapter.family!r})")
        return LoadedModel(model=None, processor=build_tiny_processor(preset_family), adapter=adapter,
                           family=adapter.family, source=name)
    _, adapter = inspect_model_folder(name, family)
    from mdpo.data import load_processor  # registers the image-only Qwen processors (no torchvision needed)

    try:
        processor = load_processor(Path(name))
    except (OSError, ValueError, ImportError, KeyError) as exc:  # no processor files, a missing package, …
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"model folder {name!r}: its processor cannot be loaded "
                             f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from exc
    return LoadedModel(model=None, processor=processor, adapter=adapter, family=adapter.family, source=name)


def load_model(
    path_or_preset: str | os.PathLike,
    family: str | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
    prepared: LoadedModel | None = None,
    quantization=None,
) -> LoadedModel:
    """Load model + processor from a local folder (no hub access), or build a tiny preset by name.

    path_or_preset: a folder written by `save_pretrained` (config.json, weights, processor files),
        or a preset name such as 'tiny-llava' (see mdpo.models.presets.PRESETS).
    family: the adapter to use; detected from config.model_type when None. A family that does not
        serve the folder's model_type is an error (ModelLoadError, a ValueError).
    dtype: 'bf16' / 'fp32' / torch dtype; None → bf16 on CUDA, fp32 elsewhere.
    attn_implementation: None → choose_attn_implementation(device).
    device: where to put the model (None: stay on CPU).
    prepared: the result of `load_processor_only` for the same folder: its processor is kept and its
        `model` filled in (the same object is returned), so the processor is not loaded twice.
    quantization: a `QuantizationSettings` (mdpo.models.quantization): the language model's linear
        layers load quantised through bitsandbytes, on `device` (default CPU); None: as saved.
    """
    from .quantization import check_quantization_available, load_quantized, prepare_quantized, quantize_in_memory
    from .presets import PRESETS, build_preset

    name = os.fspath(path_or_preset)
    torch_dtype = resolve_dtype(dtype, device)
    attn = attn_implementation or choose_attn_implementation(device)
    if attn_implementation is None and attn == "flash_attention_2" and torch_dtype == torch.float32:
        warnings.warn("flash-attn needs bf16/fp16 weights; dtype is float32, so attention falls back to SDPA")
        attn = "sdpa"
    if name in PRESETS and not Path(name).exists():
        loaded = build_preset(name, dtype=torch_dtype, attn_implementation=attn)
        if family is not None and get_adapter(family) is not loaded.adapter:
            raise ModelLoadError(f"family {family!r} does not match preset {name!r} (family {loaded.family!r})")
        if quantization is not None:
            check_quantization_available(quantization.method, device)
            loaded.model = quantize_in_memory(loaded.model, quantization, loaded.adapter, device)
        elif device is not None:
            loaded.model.to(device)
        return _fill(prepared, loaded)

    config, adapter = inspect_model_folder(name, family)
    folder = Path(name)
    import transformers

    model_cls = getattr(transformers, adapter.model_classes[config.model_type])
    if quantization is not None:
        check_quantization_available(quantization.method, device)
        model = load_quantized(model_cls, folder, quantization, adapter, dtype=torch_dtype, attn_implementation=attn,
                               device=device)
    else:
        model = model_cls.from_pretrained(
            folder, local_files_only=True, dtype=torch_dtype, attn_implementation=attn
        )
        if getattr(model, "is_quantized", False):  # a folder saved already quantised (its config.json says how)
            prepare_quantized(model, adapter)
    adapter.check_fused_head(model)
    if prepared is not None:
        processor = prepared.processor
    else:
        from mdpo.data import load_processor  # registers the image-only Qwen processors (no torchvision needed)

        processor = load_processor(folder)
    if device is not None:
        model.to(device)
    return _fill(prepared, LoadedModel(model=model, processor=processor, adapter=adapter, family=adapter.family,
                                       source=str(folder)))


def _fill(prepared: LoadedModel | None, loaded: LoadedModel) -> LoadedModel:
    """`loaded`, or `prepared` with loaded's model put in (prepared's processor kept)."""
    if prepared is None:
        return loaded
    if prepared.adapter is not loaded.adapter:
        raise ModelLoadError(f"{loaded.source}: prepared for family {prepared.family!r}, loaded as {loaded.family!r}")
    prepared.model = loaded.model
    return prepared
