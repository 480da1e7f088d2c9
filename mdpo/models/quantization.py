"""QLoRA: the frozen base's language model loaded 4-bit (NF4) or 8-bit (LLM.int8) through bitsandbytes,
LoRA on top (Dettmers et al. 2023, "QLoRA"). `model.quantization: nf4 | int8` in the run's config.

What is quantised. Only the nn.Linear layers of the language model (attention and MLP projections: 92 %
of LLaVA-1.5-7B's weights). The vision tower, the projector and the LM head keep the model's dtype
(`BitsAndBytesConfig.llm_int8_skip_modules`), and so do the embeddings and norms (never nn.Linear). The
LM head must stay a plain weight: the fused loss reads `lm_head.weight` (V, H) directly
(`linear_sequence_logprobs`). `check_quantized_placement` checks this after every load.

How. transformers' own loader quantises while it loads: `from_pretrained(folder, quantization_config=…)`
for a model folder; a tiny preset, built in memory from a config object, goes through the same loader
with its state dict (`from_pretrained(None, config=…, state_dict=…)`; no temporary folder). Weights are
quantised on the device they load to (`device_map={"": device}`), so a GPU never holds the bf16 copy.

peft's `prepare_model_for_kbit_training` is not called; of what it does: (1) freezing every base
weight is done by `get_peft_model` (`apply_lora`); (2) casting every fp16/bf16 weight that is not
4-bit to fp32 (norms, embeddings, vision tower, projector, LM head) is not wanted: the frozen vision
tower and LM head would sit in fp32 (LLaVA-1.5-7B: ~0.6 B weights, +1.2 GB) while the norms already
compute in fp32 inside and the fused LM-head loss accumulates in fp32; (3) gradient checkpointing
with an input-gradient hook on every sub-model's embeddings is `enable_gradient_checkpointing`'s job,
which hooks the language model's embeddings only (`model.gradient_checkpointing: true`).

Two CPU-only pitfalls of bitsandbytes 0.50 are handled by `pin_cpu_kernels` (neither exists on a GPU):
- `Linear4bit`, the first time it runs in eval mode on an input that needs no gradient (the cached
  reference pass does exactly that), repacks its weight in place for an AVX512-BF16 inference kernel,
  and uses that kernel from then on, also in training, where it has no backward: every later LoRA
  gradient is silently wrong (measured on tiny-llava: 109 % relative error against the same model
  with the dequantised weights). The repacking is turned off.
- `Linear8bitLt` on the CPU multiplies by the dequantised weight in train mode but runs the int8
  kernel (inputs rounded to int8 too) in eval mode, so the reference pass and the policy at step 0
  differ (0.75 % of the hidden state on tiny-llava) and the first loss is not 3·ln 2. Each layer is
  kept on its train-mode path in both modes.

Sharding engines (what `mdpo/distributed.py` needs for a 4-bit base; not wired here):
- DDP: works as it is (tested: 2 CPU processes train like one). Each process holds the whole quantised
  model; DDP broadcasts the packed weights from process 0 at wrapping, and every process quantises the
  same weights the same way.
- DeepSpeed ZeRO-1/2 (not run): should work as DDP does (only LoRA trains, so only its gradients and
  optimizer state are partitioned). ZeRO-3 (not run): partitions parameters by flattening them, which
  needs the packed 4-bit weights stored in the same floating dtype as the others
  (`model.quantization_storage: bfloat16` with `model.dtype: bfloat16`). transformers does not use
  `zero.Init` for a quantised model: each process loads the whole quantised model, and ZeRO-3
  partitions it at `deepspeed.initialize`.
- FSDP2 (`fully_shard`, not run): a default uint8-stored `Params4bit` cannot be sharded (a DTensor of a
  non-float dtype cannot require grad, and the all-gather returns a plain Parameter without the quant
  state): pass them as `ignored_params` (torch ≥ 2.7; they stay whole on every process, 0.5 byte per
  weight), as accelerate's own FSDP2 wrapper does. To shard them too: `model.quantization_storage`
  equal to the other parameters' dtype (bf16), no FSDP mixed-precision cast of those parameters
  (param_dtype None or the same dtype: a cast would change the packed bytes), and never move them to
  the meta device (the Params4bit class and its quant state would be lost); bitsandbytes re-attaches
  the quant state kept on the module after each all-gather.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelLoadError, UnsupportedModelError
from .adapters import FamilyAdapter

QUANTIZATION_METHODS = ("none", "nf4", "int8")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
STORAGE_DTYPES = ("uint8", "bfloat16", "float16", "float32")


class QuantizationError(ModelLoadError):
    """A quantisation request this machine, model or setting cannot take; the message names model.quantization."""


@dataclass(frozen=True)
class QuantizationSettings:
    """How the language model's linear layers are quantised (see the module docstring)."""

    method: str  # nf4 | int8
    double_quant: bool = True  # nf4: the per-block scales quantised too (8-bit, blocks of 256)
    compute_dtype: torch.dtype = torch.float32  # nf4: the dtype weights are dequantised to for each matmul
    storage: torch.dtype = torch.uint8  # nf4: container dtype of the packed 4-bit weights (bf16 for FSDP / ZeRO-3)

    def bnb_config(self, adapter: FamilyAdapter):
        """transformers' `BitsAndBytesConfig`, skipping everything but the language model's linear layers."""
        from transformers import BitsAndBytesConfig

        skip = [*adapter.frozen_prefixes, "lm_head"]  # matched from the start of a module's name, up to a dot
        if self.method == "int8":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.method,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=self.compute_dtype, bnb_4bit_quant_storage=self.storage,
                                  llm_int8_skip_modules=skip)


def quantization_settings(model_cfg, device: str | torch.device | None = None) -> QuantizationSettings | None:
    """The run's `QuantizationSettings` from its `ModelConfig`, or None for `quantization: none`.

    compute dtype `auto` is the model's own dtype (`model.dtype`: bf16 on a GPU, fp32 on the CPU).
    A quantised base with a trained base (finetune full / all) is a ConfigError: bitsandbytes weights
    cannot be trained, only LoRA on top of them.
    """
    from ..config import ConfigError
    from .loaded import resolve_dtype

    method = getattr(model_cfg, "quantization", "none")
    if method == "none":
        return None
    if method not in QUANTIZATION_METHODS:
        raise ConfigError(f"model.quantization={method!r} is not one of {list(QUANTIZATION_METHODS)}")
    if model_cfg.finetune != "lora":
        raise ConfigError(f"model.quantization={method} needs model.finetune: lora (got {model_cfg.finetune}): quantised "
                          "weights cannot be trained; use LoRA on the quantised base, or model.quantization: none")
    compute = model_cfg.quantization_compute_dtype
    compute_dtype = resolve_dtype(model_cfg.dtype if compute == "auto" else compute, device)
    storage = getattr(torch, model_cfg.quantization_storage)
    return QuantizationSettings(method=method, double_quant=model_cfg.quantization_double_quant,
                                compute_dtype=compute_dtype, storage=storage)


def default_settings(method: str | None, dtype: torch.dtype) -> QuantizationSettings | None:
    """`method` (none | nf4 | int8) with the config's default options, computing in `dtype`: for loading a
    base outside a training run (mdpo-eval hallucination --quantization). None for none."""
    from ..config import ModelConfig

    if method in (None, "none"):
        return None
    if method not in QUANTIZATION_METHODS:
        raise QuantizationError(f"quantization {method!r} is not one of {list(QUANTIZATION_METHODS)}")
    defaults = ModelConfig(quantization=method)
    return QuantizationSettings(method=method, double_quant=defaults.quantization_double_quant, compute_dtype=dtype,
                                storage=getattr(torch, defaults.quantization_storage))


def check_quantization_available(method: str, device: str | torch.device | None = None) -> None:
    """QuantizationError (naming model.quantization and the fix) unless bitsandbytes imports and serves `device`.

    Costs one `import bitsandbytes` (it may log that an optional hub kernel could not be fetched).
    """
    if method == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError(f"model.quantization={method} needs the bitsandbytes package, which is not installed: "
                                "pip install bitsandbytes (or set model.quantization: none)")
    try:
        import bitsandbytes
    except Exception as exc:  # noqa: BLE001 — a broken build or a missing native library
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise QuantizationError(f"model.quantization={method}: bitsandbytes is installed but does not import "
                                f"({type(exc).__name__}: {first}); reinstall it (pip install -U bitsandbytes) or set "
                                "model.quantization: none") from exc
    kind = torch.device(device).type if device is not None else "cpu"
    supported = getattr(bitsandbytes, "supported_torch_devices", {"cpu", "cuda"})
    if kind not in supported:
        raise QuantizationError(f"model.quantization={method}: this bitsandbytes ({bitsandbytes.__version__}) has no "
                                f"backend for {kind} devices (it serves {sorted(supported)}); set model.quantization: none")


# ---------------------------------------------------------------------------------------- loading
def load_quantized(model_cls, folder, settings: QuantizationSettings, adapter: FamilyAdapter, *, dtype: torch.dtype,
                   attn_implementation: str, device: str | torch.device | None) -> nn.Module:
    """`model_cls.from_pretrained(folder)` with the language model quantised on `device` (default CPU)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    model = model_cls.from_pretrained(folder, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation,
                                      quantization_config=settings.bnb_config(adapter), device_map={"": device})
    return prepare_quantized(model, adapter, settings)


def quantize_in_memory(model: nn.Module, settings: QuantizationSettings, adapter: FamilyAdapter,
                       device: str | torch.device | None = None) -> nn.Module:
    """A new model: `model`'s weights loaded through transformers' quantising loader (for presets).

    The unquantised model is left as it is (the caller drops it); both are held while this runs.
    """
    import copy

    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    quantized = type(model).from_pretrained(
        None, config=copy.deepcopy(model.config), state_dict=model.state_dict(), dtype=dtype,
        attn_implementation=model.config._attn_implementation, quantization_config=settings.bnb_config(adapter),
        device_map={"": device})
    quantized.config._name_or_path = model.config._name_or_path  # from_pretrained(None) says "None"; peft copies it
    quantized.name_or_path = model.name_or_path
    quantized.train(model.training)
    return prepare_quantized(quantized, adapter, settings)


def prepare_quantized(model: nn.Module, adapter: FamilyAdapter, settings: QuantizationSettings | None = None) -> nn.Module:
    """Check where the quantised layers are and pin the CPU kernels (module docstring). Returns `model`."""
    method = settings.method if settings is not None else quantization_of(model).get("method", "bitsandbytes")
    check_quantized_placement(model, adapter, method)
    pin_cpu_kernels(model)
    return model


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the bitsandbytes linear layers (4-bit and 8-bit) of `model`."""
    kinds = _bnb_linear_types()
    return [name for name, module in model.named_modules() if kinds and isinstance(module, kinds)]


def check_quantized_placement(model: nn.Module, adapter: FamilyAdapter, method: str) -> None:
    """UnsupportedModelError unless the quantised layers are exactly inside the language model and the
    LM head is a plain floating weight (what the fused loss reads)."""
    base = adapter.unwrap(model)
    names = quantized_layer_names(base)
    prefix = adapter.language_model_prefix + "."
    stray = [n for n in names if not n.startswith(prefix)]
    if stray:
        raise UnsupportedModelError(
            f"model.quantization={method}: {len(stray)} layer(s) outside the {adapter.family} language model are "
            f"quantised (e.g. {', '.join(stray[:3])}); the vision tower, projector and LM head must keep plain weights "
            "(a folder saved already quantised? load the unquantised weights, or set model.quantization: none)")
    if not names:
        raise UnsupportedModelError(
            f"model.quantization={method}: no linear layer of the {adapter.family} language model "
            f"({adapter.language_model_prefix}) was quantised (its layers are not torch nn.Linear); set model.quantization: none")
    head = base.lm_head.weight
    if not head.is_floating_point():
        raise UnsupportedModelError(f"model.quantization={method}: the LM head is stored as {head.dtype}; the fused LM-head "
                                    "loss needs a plain floating weight")


def pin_cpu_kernels(model: nn.Module) -> None:
    """Keep bitsandbytes' CPU layers on their differentiable, mode-independent paths (module docstring)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # no in-place repacking into the backward-less kernel
        elif isinstance(module, bnb.nn.Linear8bitLt) and not getattr(module, "_mdpo_pinned", False):
            module.register_forward_pre_hook(_int8_train_path_on_cpu)
            module._mdpo_pinned = True


def _int8_train_path_on_cpu(module, args):
    # Linear8bitLt.forward reads `self.training` only to choose its CPU path (dequantised weight in train
    # mode, int8 kernel in eval mode); it has no dropout. On a GPU both modes take the same path.
    if args and torch.is_tensor(args[0]) and args[0].device.type in ("cpu", "xpu"):
        module.training = True


def _bnb_linear_types() -> tuple[type, ...]:
    if importlib.util.find_spec("bitsandbytes") is None:
        return ()
    import bitsandbytes as bnb

    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def quantization_of(model: nn.Module) -> dict:
    """What a loaded model's bitsandbytes quantisation is, for fingerprints ({} for an unquantised model).

    Read from the model itself (`config.quantization_config`, set by transformers' loader), so a folder
    saved already quantised is described too. The storage dtype is left out: it packs the same bytes.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(getattr(base, "config", None), "quantization_config", None)
    if config is None:
        return {}
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if values.get("load_in_8bit") or values.get("_load_in_8bit"):
        return {"method": "int8", "threshold": float(values.get("llm_int8_threshold", 6.0))}
    if values.get("load_in_4bit") or values.get("_load_in_4bit"):
        return {"method": str(values.get("bnb_4bit_quant_type", "fp4")),
                "double_quant": bool(values.get("bnb_4bit_use_double_quant", False)),
                "compute_dtype": str(values.get("bnb_4bit_compute_dtype", "float32")).removeprefix("torch.")}
    return {"method": str(values.get("quant_method", "unknown"))}
