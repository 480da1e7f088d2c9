"""Memory of QLoRA (`model.quantization: nf4`): weight bytes per parameter and the peak memory of one mDPO
training step, an unquantised LLaVA-1.5-shaped model (fp32, bf16) against the same model with its
language model's linear layers in NF4; and the computed fit of LLaVA-1.5-7B / 13B on one GPU.

    python -m benchmarks.qlora                  # CPU: LLaVA-1.5-7B widths, 2 text + 1 vision layers, 56 px (0.70 B weights)
    python -m benchmarks.qlora --quick          # 1 text + 1 vision layer (0.50 B weights)
    python -m benchmarks.qlora --providers fp32,nf4 --text-layers 3
    python -m benchmarks.qlora --fit-only       # the computed 7B / 13B table alone (nf4 bytes per weight measured here)
    python -m benchmarks.qlora --device cuda --text-layers 32 --vision-layers 24 --image-size 336 --grad-ckpt
                                                # a GPU: the whole LLaVA-1.5-7B shape, bf16 vs nf4-bf16

The model and the step are `benchmarks.train_step`'s (`llava_config`, `make_batch`, provider `ours`):
LLaVA-1.5-7B layer widths (Llama H 4096, I 11008, V 32000; CLIP-L/14 vision tower; 2-layer projector)
with fewer layers, random weights; LoRA r = 64, α = 128 on every linear layer of the language model;
one step = one policy forward over [chosen | rejected | corrupted] through the fused LM head, the
mDPO loss against reference log-probs cached in setup (adapters off, no grad), backward, gradient
clipping and `mdpo.optim.make_optimizer`'s AdamW step.

Providers: fp32 / bf16 — the unquantised model in that dtype; nf4 — the language model's linear layers
NF4 with double quantisation (`mdpo.models.quantization`, transformers' loader), everything else and
the compute in fp32; nf4-bf16 — the same with bf16 weights and compute (QLoRA's GPU setting).

Reported per provider: weight bytes (every weight tensor, the NF4 scales included) per parameter, for
the language model's linear layers (the part NF4 quantises), for the rest (vision tower, projector,
embeddings, norms, LM head) and for the whole model; resident bytes before a step (weights, LoRA,
optimizer state, batch; counted from the tensors); peak extra memory of one step (CPU: the harness's
child process, VmHWM − VmRSS; CUDA: allocator peak minus allocated before); peak total = resident +
extra (CUDA: the allocator's peak); median step time (on the CPU NF4 dequantises every weight at every
matmul in bitsandbytes' CPU path: read CPU times as a cost, not a forecast of a GPU).

The computed fit (`fit_table`) is arithmetic, not a run: the real LLaVA-1.5-7B / 13B parameter counts,
bf16 weights (2 bytes) or NF4 language-model linear layers at the bytes per weight measured here, LoRA
r = 64 at 16 bytes per trained weight (fp32 weight, gradient and two Adam moments), activations of one
pair (three 680-token rows: 576 image tokens + 40 prompt + 64 response) with and without gradient
checkpointing (`layer_activation_bytes`: 44 H + 12 I bytes per token and layer; with checkpointing
every layer's input plus one layer's share), and 1.5 GB of CUDA context and allocator slack. A GPU of
G GB fits a setting when the total is ≤ G·10⁹ bytes ("with ckpt": only with gradient checkpointing).
"""
from __future__ import annotations

import argparse
import gc

import torch

from benchmarks import _harness as H
from benchmarks.train_step import BETA, LLAVA_15_7B, LR, MAX_GRAD_NORM, image_tokens, llava_config, make_batch, seq_len

PROVIDERS = {  # provider -> (model dtype, quantised)
    "fp32": ("float32", False), "bf16": ("bfloat16", False), "nf4": ("float32", True), "nf4-bf16": ("bfloat16", True),
}
DEFAULTS = {
    "cpu": dict(text_layers=2, vision_layers=1, pairs=1, prompt_tokens=8, response_tokens=16, image_size=56),
    "cpu-quick": dict(text_layers=1, vision_layers=1, pairs=1, prompt_tokens=8, response_tokens=16, image_size=56),
    "cuda": dict(text_layers=32, vision_layers=24, pairs=1, prompt_tokens=40, response_tokens=64, image_size=336),
    "cuda-quick": dict(text_layers=4, vision_layers=2, pairs=1, prompt_tokens=40, response_tokens=64, image_size=336),
}
STATS: dict[str, dict] = {}  # per provider: weight report, resident bytes (this process)

# Real model sizes for the computed fit: Vicuna-7B / 13B text models, CLIP ViT-L/14-336, the 2-layer projector.
REAL_MODELS = {
    "LLaVA-1.5-7B": dict(hidden=4096, intermediate=11008, layers=32, vocab=32000),
    "LLaVA-1.5-13B": dict(hidden=5120, intermediate=13824, layers=40, vocab=32000),
}
CLIP_L_336_PARAMS = 303_507_456  # CLIPVisionModel (ViT-L/14, 336 px): 24 layers of width 1024, embeddings, norms
GPU_SIZES_GB = (24, 48, 80)


# ----------------------------------------------------------------------------------------------- model
def build(provider: str, shape: dict, device: torch.device):
    """(LoRA model, adapter): the LLaVA-shaped model of `provider`, weights drawn with seed 0."""
    from transformers import LlavaForConditionalGeneration

    from mdpo.models import apply_lora, enable_gradient_checkpointing, get_adapter
    from mdpo.models.quantization import QuantizationSettings, check_quantization_available, quantize_in_memory

    dtype_name, quantised = PROVIDERS[provider]
    dtype = getattr(torch, dtype_name)
    adapter = get_adapter("llava")
    with torch.random.fork_rng(devices=[]), torch.device("cpu" if quantised else device):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration._from_config(llava_config(shape), attn_implementation="sdpa", dtype=dtype)
    if quantised:  # quantised on the device by transformers' loader; the unquantised copy is dropped
        check_quantization_available("nf4", device)
        settings = QuantizationSettings("nf4", double_quant=True, compute_dtype=dtype)
        unquantised, model = model, None
        model = quantize_in_memory(unquantised, settings, adapter, device)
        del unquantised
        gc.collect()
    model = apply_lora(model, adapter, r=shape["lora_r"], alpha=shape["lora_alpha"], dropout=0.05)
    if shape["grad_ckpt"]:
        enable_gradient_checkpointing(model)
    return model.train(), adapter


def weight_report(model, adapter) -> dict:
    """{part: {"params", "bytes"}} for lm_linear (the language model's linear layers), other (every other
    base weight) and lora; an NF4 layer counts in×out parameters and its packed bytes plus its
    scales (absmax, nested absmax, code books)."""
    import bitsandbytes as bnb

    base = adapter.unwrap(model)
    prefix = adapter.language_model_prefix + "."
    report = {part: {"params": 0, "bytes": 0} for part in ("lm_linear", "other", "lora")}
    seen: set[int] = set()

    def add(part, tensor, params=None):
        if tensor is None or id(tensor) in seen:
            return
        seen.add(id(tensor))
        report[part]["bytes"] += tensor.numel() * tensor.element_size()
        report[part]["params"] += tensor.numel() if params is None else params

    for name, module in base.named_modules():
        own = list(module.named_parameters(recurse=False))  # buffers (rotary tables, position ids) are not weights
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            add("lm_linear", module.weight, params=module.in_features * module.out_features)
            for tensor in (state.absmax, state.code, getattr(state, "offset", None)):
                add("lm_linear", tensor, params=0)
            if state.nested:
                add("lm_linear", state.state2.absmax, params=0)
                add("lm_linear", state.state2.code, params=0)
            add("lm_linear", module.bias)
            continue
        for pname, tensor in own:
            part = "lora" if "lora_" in name else (
                "lm_linear" if name.startswith(prefix) and isinstance(module, torch.nn.Linear) else "other")
            add(part, tensor)
    for part in report.values():
        part["bytes_per_param"] = part["bytes"] / part["params"] if part["params"] else None
    whole = {k: report["lm_linear"][k] + report["other"][k] for k in ("params", "bytes")}
    report["model"] = {**whole, "bytes_per_param": whole["bytes"] / whole["params"]}
    return report


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------------------------- step
def setup(provider: str, shape: dict, mode: str, options: dict):
    """The provider's model, batch, reference cache and optimizer; returns one training step (see `_harness`)."""
    from mdpo.loss import MDPOLoss
    from mdpo.optim import make_optimizer
    from mdpo.scoring import SequenceScorer

    if mode != "step":
        raise ValueError(f"mode {mode!r}: this benchmark has one mode, 'step'")
    if provider not in PROVIDERS:
        raise ValueError(f"provider {provider!r} is not one of {list(PROVIDERS)}")
    device = torch.device(options["device"])
    model, adapter = build(provider, shape, device)
    batch = make_batch(shape, device, getattr(torch, PROVIDERS[provider][0]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, lr=LR, weight_decay=0.0)
    scorer = SequenceScorer(model, adapter, shared_prefix="off")
    criterion = MDPOLoss(beta=BETA)
    scorer.eval()  # the reference cache, as prepare_reference_cache computes it
    with torch.no_grad(), model.disable_adapter():
        reference = scorer(batch).float().cpu()
    scorer.train()
    on_cuda = device.type == "cuda"
    stats = STATS.setdefault(provider, {})

    def step():
        loss, _ = criterion(policy_logps=scorer(batch), ref_logps=reference.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_cuda:
            stats["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)

    step()  # AdamW's moments exist from the first step on: count them as resident
    report = weight_report(model, adapter)
    moments = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    stats.update(weights=report, resident_bytes=report["model"]["bytes"] + report["lora"]["bytes"] + _tensor_bytes(moments)
                 + _tensor_bytes(v for v in batch.values() if torch.is_tensor(v)) + _tensor_bytes([reference]))
    return step


# ----------------------------------------------------------------------------------------------- fit
def real_model_params(name: str, lora_r: int = 64) -> dict:
    """Parameter counts of a real LLaVA-1.5 model by part: lm_linear, other (vision tower, projector,
    embeddings, norms, LM head), lora (r on every linear layer of the language model)."""
    m = REAL_MODELS[name]
    h, i, layers, vocab = m["hidden"], m["intermediate"], m["layers"], m["vocab"]
    per_layer = 4 * h * h + 3 * h * i
    lora = layers * lora_r * (4 * (h + h) + 2 * (h + i) + (i + h))
    projector = 1024 * h + h + h * h + h
    other = CLIP_L_336_PARAMS + projector + 2 * vocab * h + layers * 2 * h + h
    return {"lm_linear": layers * per_layer, "other": other, "lora": lora, "hidden": h, "intermediate": i, "layers": layers}


def layer_activation_bytes(params: dict, tokens: int) -> int:
    """What one decoder layer keeps for the backward of a LoRA step, bf16 compute: per token ~10 H + 4 I bf16
    values (norm inputs and outputs, q / k / v and the attention output, the MLP's gate, up, activation
    and product) and 6 H + I fp32 values (each adapted projection's dropped-out input to its fp32 LoRA A):
    44 H + 12 I bytes per token."""
    h, i = params["hidden"], params["intermediate"]
    return tokens * (44 * h + 12 * i)


def activation_bytes(params: dict, tokens: int, checkpointing: bool) -> int:
    """Activations of one step: every layer's share (`layer_activation_bytes`), or with gradient
    checkpointing each layer's input (tokens × H, bf16) plus one layer's share, recomputed."""
    if not checkpointing:
        return params["layers"] * layer_activation_bytes(params, tokens)
    return params["layers"] * tokens * params["hidden"] * 2 + layer_activation_bytes(params, tokens)


def fit_table(nf4_bytes_per_weight: float, tokens: int = 3 * 680, context_gb: float = 1.5) -> tuple[list[dict], str]:
    """(rows, markdown) of the computed memory of LoRA on a bf16 base and QLoRA on an NF4 base (module docstring)."""
    rows = []
    for name in REAL_MODELS:
        p = real_model_params(name)
        for setting, lm_bytes in (("LoRA, bf16 base", 2.0), ("QLoRA, NF4 base", nf4_bytes_per_weight)):
            weights = p["lm_linear"] * lm_bytes + p["other"] * 2
            lora = p["lora"] * 16
            fixed = weights + lora + context_gb * 1e9
            ckpt, full = activation_bytes(p, tokens, True), activation_bytes(p, tokens, False)
            row = {"model": name, "setting": setting, "params_b": (p["lm_linear"] + p["other"]) / 1e9,
                   "weights_gb": weights / 1e9, "lora_gb": lora / 1e9, "activations_ckpt_gb": ckpt / 1e9,
                   "activations_gb": full / 1e9, "total_ckpt_gb": (fixed + ckpt) / 1e9, "total_gb": (fixed + full) / 1e9}
            for g in GPU_SIZES_GB:
                row[f"fits_{g}gb"] = "yes" if row["total_gb"] <= g else ("with ckpt" if row["total_ckpt_gb"] <= g else "no")
            rows.append(row)
    header = ("| model | setting | weights | LoRA r=64 + AdamW | activations: ckpt / none | total: ckpt / none | "
              + " | ".join(f"one {g} GB GPU" for g in GPU_SIZES_GB) + " |")
    lines = [header, "|" + "---|" * (6 + len(GPU_SIZES_GB))]
    for r in rows:
        fits = " | ".join(r[f"fits_{g}gb"] for g in GPU_SIZES_GB)
        lines.append(f"| {r['model']} ({r['params_b']:.2f} B) | {r['setting']} | {r['weights_gb']:.1f} GB | {r['lora_gb']:.1f} GB | "
                     f"{r['activations_ckpt_gb']:.1f} / {r['activations_gb']:.1f} GB | {r['total_ckpt_gb']:.1f} / {r['total_gb']:.1f} GB | "
                     f"{fits} |")
    return rows, "\n".join(lines)


# ----------------------------------------------------------------------------------------------- report
def annotate(rows: list[dict], device: str) -> None:
    for row in rows:
        stats = STATS.get(row["provider"], {})
        if "weights" in stats:
            row["weights"] = stats["weights"]
            row["resident_bytes"] = stats["resident_bytes"]
        if row.get("peak_mem_bytes") is not None:
            if device == "cuda" and "cuda_peak_bytes" in stats:
                row["peak_total_bytes"], row["total_method"] = stats["cuda_peak_bytes"], "cuda max_memory_allocated"
            elif "resident_bytes" in stats:
                row["peak_total_bytes"] = stats["resident_bytes"] + row["peak_mem_bytes"]
                row["total_method"] = "resident (counted) + extra (measured)"
    for base in ("fp32", "bf16"):
        ref = next((r for r in rows if r["provider"] == base and r.get("peak_total_bytes")), None)
        for row in rows:
            if ref is not None and row.get("peak_total_bytes"):
                row[f"total_mem_vs_{base}"] = row["peak_total_bytes"] / ref["peak_total_bytes"]


def summary_table(rows: list[dict]) -> str:
    gib = lambda b: "—" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    bpp = lambda part: "—" if not part or part.get("bytes_per_param") is None else f"{part['bytes_per_param']:.3f}"  # noqa: E731
    header = ["provider", "bytes/weight LM linear", "bytes/weight rest", "bytes/weight model", "weights GiB", "resident GiB",
              "peak extra GiB", "peak total GiB", "total vs fp32", "total vs bf16", "median s/step"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        w = r.get("weights") or {}
        if "error" in r:
            lines.append(f"| {r['provider']} | {r['error']} |" + " |" * (len(header) - 2))
            continue
        ratio = lambda k: "—" if r.get(k) is None else f"{r[k]:.2f}×"  # noqa: E731
        lines.append("| " + " | ".join([
            r["provider"], bpp(w.get("lm_linear")), bpp(w.get("other")), bpp(w.get("model")),
            gib((w.get("model") or {}).get("bytes")), gib(r.get("resident_bytes")), gib(r.get("peak_mem_bytes")),
            gib(r.get("peak_total_bytes")), ratio("total_mem_vs_fp32"), ratio("total_mem_vs_bf16"),
            "—" if "ms_median" not in r else f"{r['ms_median'] / 1e3:.2f}"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = H.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), default_modes=("step",))
    parser.add_argument("--text-layers", type=int, default=None, help="Llama decoder layers (LLaVA-1.5-7B: 32)")
    parser.add_argument("--vision-layers", type=int, default=None, help="CLIP encoder layers (CLIP-L: 24)")
    parser.add_argument("--pairs", type=int, default=None, help="preference pairs per step (3 rows each)")
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--response-tokens", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None, help="a multiple of 14 (336 → 576 image tokens)")
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--lora-alpha", type=int, default=128)
    parser.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing of every decoder layer")
    parser.add_argument("--budget-s", type=float, default=None, help="timing budget per provider (≥ 3 steps; 2 with --quick)")
    parser.add_argument("--fit-only", action="store_true", help="print the computed 7B / 13B fit with --nf4-bytes and exit")
    parser.add_argument("--nf4-bytes", type=float, default=None,
                        help="NF4 bytes per language-model weight for --fit-only (default: 0.5 + 1/64 + 4/(64·256), "
                             "packed nibbles + 8-bit block scales + their fp32 scales)")
    parser.add_argument("--tag", default=None, help="results file tag (default: the device, -quick)")
    args = parser.parse_args(argv)

    if args.fit_only:
        nf4 = args.nf4_bytes if args.nf4_bytes is not None else 0.5 + 1 / 64 + 4 / (64 * 256)
        print(f"computed, not run (NF4 at {nf4:.4f} bytes per language-model weight):\n")
        print(fit_table(nf4)[1])
        return []
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev_type = torch.device(device).type
    if args.modes != "step":
        raise SystemExit("--modes: this benchmark has one mode, 'step'")
    defaults = DEFAULTS[("cuda" if dev_type == "cuda" else "cpu") + ("-quick" if args.quick else "")]
    shape = {**LLAVA_15_7B, **{k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in defaults.items()},
             "finetune": "lora", "lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "grad_ckpt": args.grad_ckpt}
    providers = args.providers.split(",") if args.providers else (
        ["bf16", "nf4-bf16"] if dev_type == "cuda" else list(PROVIDERS))
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; known: {list(PROVIDERS)}")
    options = {"device": device}
    spec = H.BenchSpec(name="qlora", module="benchmarks.qlora", factory="setup", providers=providers, shapes=[shape],
                       modes=["step"], options=options,
                       shape_label=lambda s: f"{s['text_layers']}+{s['vision_layers']} layers, T={seq_len(s)}")
    rows = H.run_benchmark(spec, setup, quick=args.quick, measure_memory=not args.no_memory,
                           budget_s=args.budget_s if args.budget_s is not None else (1.0 if args.quick else 10.0))
    annotate(rows, dev_type)
    nf4_row = next((r for r in rows if r["provider"].startswith("nf4") and r.get("weights")), None)
    nf4_bytes = nf4_row["weights"]["lm_linear"]["bytes_per_param"] if nf4_row else 0.5 + 1 / 64 + 4 / (64 * 256)
    fit_rows, fit_md = fit_table(nf4_bytes)
    model_row = next((r for r in rows if r.get("weights")), None)
    params = model_row["weights"]["model"]["params"] if model_row else float("nan")
    notes = [
        f"model: LLaVA-1.5-7B widths with {shape['text_layers']}/32 text and {shape['vision_layers']}/24 vision layers at "
        f"{shape['image_size']} px ({image_tokens(shape)} image tokens): {params / 1e9:.3f} B weights; LoRA r={shape['lora_r']} "
        f"α={shape['lora_alpha']} on the language model's linear layers; gradient checkpointing {'on' if shape['grad_ckpt'] else 'off'}",
        f"batch: {shape['pairs']} pair(s), rows of T = {seq_len(shape)} tokens; one step = forward + mDPO loss (cached "
        "reference) + backward + clip + AdamW",
        "nf4: the language model's linear layers NF4 with double quantisation (transformers' loader, bitsandbytes "
        "0.50), vision tower / projector / embeddings / LM head unquantised",
        "peak extra: above the resident weights, LoRA, AdamW state and batch (CPU: each provider in its own process, "
        "VmHWM − VmRSS); peak total: " + ("CUDA allocator peak" if dev_type == "cuda" else "resident (counted) + extra (measured)"),
        f"computed fit for the real models (not run), NF4 at {nf4_bytes:.4f} bytes per language-model weight as measured:",
        *fit_md.splitlines(),
    ]
    for row in rows:
        row["fit"] = fit_rows
    tag = args.tag or (dev_type + ("-quick" if args.quick else ""))
    H.write_reports(rows, prefix="qlora", device_tag=tag, notes=notes, results_dir=args.results_dir)
    print()
    print(summary_table(rows))
    print()
    print("\n".join(notes))
    return rows


if __name__ == "__main__":
    main()
