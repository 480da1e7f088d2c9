"""Benchmark of a whole mDPO training step on a LLaVA-1.5-7B-shaped model with random weights.

    python -m benchmarks.train_step                         # GPU: 32 text + 24 vision layers, 336 px, LoRA r=64, bf16, 2 pairs
    python -m benchmarks.train_step --device cpu            # CPU: 2 text + 1 vision layers, 112 px, 1 pair, fp32
    python -m benchmarks.train_step --quick                 # smoke run (CPU: 1 text layer, 56 px; GPU: 4 text layers)
    python -m benchmarks.train_step --text-layers 32 --pairs 4 --grad-ckpt --providers ours,paper
    python -m benchmarks.train_step --device cpu --text-layers 1 --image-size 336 --prompt-tokens 40 \
        --response-tokens 120 --rejected-tokens 100 --interleave 4 --tag cpu-shared \
        --providers ours,ours-shared,ref-pass,ref-pass-shared    # issue 13's shared-prefix figures
    python -m benchmarks.train_step --device cpu --interleave 4 --tag cpu-trl --providers ours,trl-dpo,trl-real
                                                            # against TRL's real DPOTrainer (needs `trl`)

A step is what the user waits for: forward over the rows, loss, backward, gradient clipping (max norm
1.0) and an AdamW step (lr 1e-5), then `zero_grad(set_to_none=True)`. Not in the step, for every
provider alike: data collation and the host-to-device copy of the batch (the batch is built once on
the device), the LR scheduler, and metric logging (the paper code's 13 `.cpu()` syncs per step are not
reproduced, which favours the paper pattern).

The model: `LlavaForConditionalGeneration` built from a `LlavaConfig` with random weights — Llama text
model H = 4096, intermediate 11008, 32 heads (no GQA), V = 32000; CLIP-L/14-shaped vision tower
(hidden 1024, intermediate 4096, 16 heads, patch 14, features from layer −2, CLS dropped: 336 px →
576 image tokens); 2-layer GELU MLP projector. The layer counts and image size are flags, so it runs
on a 24 GiB CPU (a few layers) and on one 80 GB GPU (all layers). LoRA r = 64, α = 128, dropout 0.05 on
every linear layer of the language model (`mdpo.models.apply_lora`; vision tower, projector and LM head
frozen), or `--full` fine-tuning of the language model and LM head (`freeze_for_full_finetune`).

A row is [BOS | image tokens | prompt | response]; only the response is supervised. Rows are laid out
[chosen | rejected | corrupted], B each: chosen and rejected share the image, the corrupted row repeats
the chosen response with another image. With `--rejected-tokens` ≠ `--response-tokens` the shorter
rows are right-padded to T, as the collator pads them; otherwise there is no padding.

Providers (side by side, one process for time; on the CPU each in its own child process for memory):
  ours      what `mdpo/train.py` did per micro-batch before issue 13 (`shared_prefix=off`): ONE policy
            forward over the 3B rows through
            `SequenceScorer` (the adapter's last hidden states → `linear_sequence_logprobs`: only the
            response tokens meet the LM head, no logits), `MDPOLoss`, and reference log-probs read from a
            cache (computed once in setup, adapters off — not part of the step; the (3B,) CPU tensor is
            copied to the device each step, as `cache.lookup(...).to(device)` does)
  ours-shared  the same with `shared_prefix=on` (train.py's default): each pair as one packed row
            [prefix | y_w | y_l], the corrupted rows beside it (`mdpo.shared_prefix`); cache computed shared
  ref-pass / ref-pass-shared   the cached reference pass over one micro-batch (no grad, adapters off,
            dropout off), unshared / shared
  ours-live the same forward, with the reference computed live (one no-grad call over 3B rows,
            adapters off) — train.py's `reference.mode: live`; shows what the cache saves
  paper     the paper code's pattern (an old TRL DPOTrainer subclass): two policy calls per step
            (chosen+rejected, 2B rows; then corrupted, B rows), then the reference live under no_grad
            with the LoRA adapters disabled, again two calls over all 3B rows; full logits from
            `model(**batch).logits`, cast `.to(float32)`, `log_softmax` + `gather` + masked sum
            (`_get_batch_logps`); the policy's fp32 logits stay alive until the loss (the paper code
            returns them for its logit metrics)
  trl-dpo   plain DPO the (old) TRL way, for scale: one policy call over 2B rows, the live reference
            over the same 2B rows, full logits + log_softmax as above; `objective="dpo"`
  trl-real  TRL's own `DPOTrainer` (the `trl` package, 1.16 when written; `trl_real_setup`): one
            `trainer.training_step` (its concatenated [chosen | rejected] forward through TRL's fused LM
            head, the live reference with the adapters off, its sigmoid loss and metrics, backward), then
            its clip and AdamW step; LoRA applied by TRL from an equal `peft.LoraConfig`. Needs `trl`;
            without it the provider reports an error row and the others run
With `--full` there are no adapters to switch off: the live providers use a frozen deep copy of the
model as the reference (TRL's `ref_model`), which also counts in their resident memory.

Reported per provider: time per step (median, 20/80 %), tokens/s (all tokens of the rows the policy
processes: 3B·T for ours/paper, 2B·T for trl-dpo/trl-real), peak memory — "extra" (the harness's figure: above
what is resident before the step: weights, optimizer state, batch) and "total" (CUDA: the allocator's
peak during one step, `max_memory_allocated`; CPU: resident bytes counted from the tensors + the
measured extra) — and the ratios of each provider to `paper` and to `trl-dpo`.
With `--interleave ROUNDS` the providers are timed interleaved (one warm-up call each, then ROUNDS
rounds in a rotated order: a shared machine's drifting load hits all of them alike), and each row
also reports the language model's forwards and tokens per step (exact, device-independent), the model
FLOPs per step (`forward_flops`) and their rate as a fraction of bare `torch.mm` at the model's GEMM
shapes, probed twice per round; the shared-prefix targets of issue 13 are printed (step ≥ 1.5× and
peak extra memory ≤ 0.8× of `ours`, reference pass ≥ 1.4×, ≥ 50 % of the GEMM rate).
Targets (printed, never asserted): GPU — ours ≥ 1.5× the paper pattern's tokens/s at ≤ 0.6× its peak
memory; CPU — ratios only. The CPU runs few layers, so the LM head's and the logits' share of time and
memory is much larger there than in the 32-layer model: read CPU ratios as a check, not a forecast.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import statistics

import torch

from benchmarks import _harness as H

IGNORE = -100
BETA = 0.1
LR = 1e-5
MAX_GRAD_NORM = 1.0
ALL_PROVIDERS = ["ours", "ours-shared", "ours-live", "paper", "trl-dpo", "trl-real", "ref-pass", "ref-pass-shared"]
SHARED = ("ours-shared", "ref-pass-shared")  # providers whose scorer shares the image + prompt prefix
BASELINES = ("paper", "trl-dpo", "trl-real")

# LLaVA-1.5-7B: Vicuna-7B text model + CLIP ViT-L/14-336 + 2-layer MLP projector.
LLAVA_15_7B = dict(
    hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000,
    vision_hidden=1024, vision_intermediate=4096, vision_heads=16, patch=14,
)
# Per-device defaults of the flags (any flag given on the command line wins).
DEFAULTS = {
    "cuda": dict(text_layers=32, vision_layers=24, pairs=2, prompt_tokens=64, response_tokens=128, image_size=336),
    "cuda-quick": dict(text_layers=4, vision_layers=2, pairs=2, prompt_tokens=64, response_tokens=128, image_size=336),
    "cpu": dict(text_layers=2, vision_layers=1, pairs=1, prompt_tokens=32, response_tokens=64, image_size=112),
    "cpu-quick": dict(text_layers=1, vision_layers=1, pairs=1, prompt_tokens=16, response_tokens=32, image_size=56),
}

# Per-provider facts recorded by `setup` in this process (tokens, resident bytes, CUDA peak of the last call).
STATS: dict[str, dict] = {}
_MODEL_CACHE: dict[str, tuple] = {}


# ----------------------------------------------------------------------------------------------- model
def image_tokens(shape: dict) -> int:
    """CLIP patches per image; the "default" feature strategy drops the CLS token."""
    return (shape["image_size"] // shape["patch"]) ** 2


def rejected_tokens(shape: dict) -> int:
    """|y_l| (default |y_w|, the older benchmark's equal-length rows)."""
    return shape.get("rejected_tokens") or shape["response_tokens"]


def seq_len(shape: dict) -> int:
    """T: the longest row, image tokens + prompt + the longer response."""
    return image_tokens(shape) + shape["prompt_tokens"] + max(shape["response_tokens"], rejected_tokens(shape))


def llava_config(shape: dict):
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=shape["vision_hidden"], intermediate_size=shape["vision_intermediate"],
            num_hidden_layers=shape["vision_layers"], num_attention_heads=shape["vision_heads"],
            image_size=shape["image_size"], patch_size=shape["patch"], projection_dim=768, hidden_act="quick_gelu",
        ),
        text_config=dict(
            model_type="llama", hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
            num_hidden_layers=shape["text_layers"], num_attention_heads=shape["heads"],
            num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"], rms_norm_eps=1e-5,
            max_position_embeddings=max(4096, seq_len(shape)), pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
        # The original LLaVA-1.5 splices images at a sentinel id outside the vocabulary; HF needs an id
        # inside it: the last one, never drawn as a text token here.
        image_token_id=shape["vocab"] - 1, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )


def get_model(shape: dict, options: dict):
    """(model, adapter): the LoRA (peft) or full-fine-tuning model, built once per process and shape.

    The providers of one run share it (weights on the device are built once); each provider's setup
    makes its own optimizer, whose state is freed with the provider's step function.
    """
    from transformers import LlavaForConditionalGeneration

    from mdpo.models import apply_lora, enable_gradient_checkpointing, freeze_for_full_finetune, get_adapter
    from mdpo.models.loading import choose_attn_implementation

    model_keys = ("text_layers", "vision_layers", "image_size", "finetune", "lora_r", "lora_alpha", "grad_ckpt",
                  *LLAVA_15_7B.keys())
    key = json.dumps({**{k: shape[k] for k in model_keys}, "device": options["device"], "dtype": options["dtype"]}, sort_keys=True)
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    _MODEL_CACHE.clear()
    device, dtype = torch.device(options["device"]), getattr(torch, options["dtype"])
    config = llava_config(shape)
    with torch.random.fork_rng(devices=[]), torch.device(device):  # weights drawn on the device itself
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration._from_config(
            config, attn_implementation=choose_attn_implementation(device), dtype=dtype)
    adapter = get_adapter("llava")
    adapter.check_fused_head(model)
    if shape["finetune"] == "lora":
        model = apply_lora(model, adapter, r=shape["lora_r"], alpha=shape["lora_alpha"], dropout=0.05)
    else:
        freeze_for_full_finetune(model, adapter)
    if shape["grad_ckpt"]:
        enable_gradient_checkpointing(model)
    model.train()
    _MODEL_CACHE[key] = (model, adapter)
    return model, adapter


def make_batch(shape: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """3B rows [chosen | rejected | corrupted] of length T = image tokens + prompt + the longer response.

    input_ids (3B, T) with the image token placed `image_tokens` times after BOS; labels = input_ids on
    the response, −100 elsewhere; pixel_values (3B, 3, S, S): chosen and rejected share an image, the
    corrupted rows get another one. With |y_l| ≠ |y_w| the shorter rows are right-padded, as the
    collator pads them (attention_mask 0, labels −100); `num_pairs` = B as the collator gives it.
    """
    pairs, vocab = shape["pairs"], shape["vocab"]
    gen = torch.Generator().manual_seed(1)

    def text(n):  # ids 3 … V−2: not pad/BOS/EOS, not the image token
        return torch.randint(3, vocab - 1, (pairs, n), generator=gen)

    prompt = text(shape["prompt_tokens"])
    prompt[:, 0] = 1  # BOS
    image = torch.full((pairs, image_tokens(shape)), vocab - 1)
    prefix = torch.cat([prompt[:, :1], image, prompt[:, 1:]], dim=1)
    chosen, rejected = text(shape["response_tokens"]), text(rejected_tokens(shape))
    width = prefix.shape[1] + max(chosen.shape[1], rejected.shape[1])
    pad = lambda rows: torch.nn.functional.pad(rows, (0, width - rows.shape[1]), value=0)  # noqa: E731
    input_ids = torch.cat([pad(torch.cat([prefix, resp], dim=1)) for resp in (chosen, rejected, chosen)])
    lengths = [prefix.shape[1] + r.shape[1] for r in (chosen, rejected, chosen)]
    attention_mask = torch.cat([(torch.arange(width) < n).long().expand(pairs, -1) for n in lengths])
    labels = input_ids.clone()
    labels[:, : prefix.shape[1]] = IGNORE
    labels[attention_mask == 0] = IGNORE
    size = shape["image_size"]
    original = torch.randn(pairs, 3, size, size, generator=gen)
    corrupted = torch.randn(pairs, 3, size, size, generator=gen)
    pixel_values = torch.cat([original, original, corrupted])
    return {
        "input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
        "pixel_values": pixel_values.to(device=device, dtype=dtype), "labels": labels.to(device), "num_pairs": pairs,
    }


def rows_of(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in batch.items() if torch.is_tensor(v)}


# ----------------------------------------------------------------------------------------------- pieces
def make_scorer(model, adapter, shared: bool = False):
    """(scorer module, where it came from): the trainer's own SequenceScorer; `shared`: model.shared_prefix=on
    (ours-shared), else off (ours: one forward over the 3B rows as they come)."""
    from mdpo.scoring import SequenceScorer

    mode = "on" if shared else "off"
    return SequenceScorer(model, adapter, shared_prefix=mode), f"mdpo.scoring.SequenceScorer(shared_prefix={mode})"


def adapters_off(model):
    """The frozen reference of a LoRA model: the same model with its adapters switched off."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if disable is not None else contextlib.nullcontext()


def full_logits_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The paper code's / old TRL's `_get_batch_logps` on `outputs.logits.to(torch.float32)`. (R,) fp32.

    Materialises (R, T, V) fp32 logits and a (R, T, V) fp32 log_softmax (saved for backward).
    """
    logits = logits.to(torch.float32)[:, :-1]
    labels = labels[:, 1:]
    mask = labels != IGNORE
    per_token = torch.gather(logits.log_softmax(-1), 2, torch.where(mask, labels, 0).unsqueeze(2)).squeeze(2)
    return (per_token * mask).sum(-1)


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------------------------- work
def lm_forwards(provider: str, shape: dict, batch: dict, model=None, adapter=None) -> list[dict]:
    """The language-model forwards of one step: rows × L (padding included), with or without gradient,
    images through the vision tower, tokens through the LM head. Exact and device-independent.

    ours-shared / ref-pass-shared: the packed forwards `mdpo.shared_prefix` runs for this batch.
    """
    from mdpo import shared_prefix

    pairs, T = shape["pairs"], seq_len(shape)
    supervised = int((batch["labels"] != IGNORE).sum())

    def fwd(rows, grad, full_logits=False, length=T, head=None):
        return {"rows": rows, "L": length, "grad": grad, "images": rows, "full_logits": full_logits,
                "head": rows * length if full_logits else head}

    if provider in SHARED:
        plan = shared_prefix._plan(model, adapter, batch)
        if plan is None:
            raise RuntimeError("the benchmark batch does not have the collator's layout: no shared forward")
        _, packed, _, _, groups, _ = plan
        out = [fwd(len(g), provider == "ours-shared", length=max(packed[j].length for j in g), head=0) for g in groups]
        out[0]["head"] = supervised
        return out
    if provider == "ref-pass":
        return [fwd(3 * pairs, False, head=supervised)]
    if provider == "ours":
        return [fwd(3 * pairs, True, head=supervised)]
    if provider == "ours-live":
        return [fwd(3 * pairs, True, head=supervised), fwd(3 * pairs, False, head=supervised)]
    if provider == "paper":
        return [fwd(2 * pairs, True, True), fwd(pairs, True, True), fwd(2 * pairs, False, True), fwd(pairs, False, True)]
    if provider == "trl-real":  # TRL's fused LM head scores only the completion tokens, in tiles
        head = int((batch["labels"][: 2 * pairs] != IGNORE).sum())
        return [fwd(2 * pairs, True, head=head), fwd(2 * pairs, False, head=head)]
    return [fwd(2 * pairs, True, True), fwd(2 * pairs, False, True)]  # trl-dpo


def forward_flops(shape: dict, f: dict) -> int:
    """Model FLOPs of one forward `f` (see lm_forwards), with its backward when f["grad"].

    Language model per layer: q, k, v, o and the gated MLP (2·tokens·in·out each), attention QKᵀ and
    AV over the dense L × L square that SDPA computes under a mask (4·rows·L²·H), LoRA's A and B.
    LM head 2·H·V per scored token. Vision tower (CLIP, 1 + image tokens per image) and projector:
    forward only (frozen, no gradient). Backward with LoRA: dX of the frozen GEMMs (1×), attention
    (2×), LoRA (2×), LM head dX (1×); full fine-tuning adds the weight gradients (2×).
    """
    H, I, V, Lt = shape["hidden"], shape["intermediate"], shape["vocab"], shape["text_layers"]
    kv = H * shape["kv_heads"] // shape["heads"]
    tokens = f["rows"] * f["L"]
    linear = 2 * tokens * Lt * (2 * H * H + 2 * H * kv + 3 * H * I)
    attention = 4 * f["rows"] * f["L"] ** 2 * H * Lt
    lora = 0
    if shape["finetune"] == "lora":
        r = shape["lora_r"]
        lora = 2 * tokens * Lt * r * (2 * (H + H) + 2 * (H + kv) + 3 * (H + I))
    head = 2 * f["head"] * H * V
    n_img, Hv, Iv, Lv = image_tokens(shape), shape["vision_hidden"], shape["vision_intermediate"], shape["vision_layers"]
    nv = n_img + 1
    vision = f["images"] * (2 * nv * Lv * (4 * Hv * Hv + 2 * Hv * Iv) + 4 * nv * nv * Hv * Lv
                            + 2 * nv * 3 * shape["patch"] ** 2 * Hv + 2 * n_img * (Hv * H + H * H))
    if f["grad"]:
        weights = 2 if shape["finetune"] == "lora" else 3
        linear, attention, lora, head = weights * linear, 3 * attention, 3 * lora, weights * head
    return int(linear + attention + lora + head + vision)


def mm_probe(shape: dict, options: dict):
    """(one call, its FLOPs): bare `torch.mm` at the text model's GEMM shapes for T tokens, into
    preallocated outputs (fresh outputs would add page faults that no GEMM rate includes)."""
    device, dtype = torch.device(options["device"]), getattr(torch, options["dtype"])
    H, I, T = shape["hidden"], shape["intermediate"], seq_len(shape)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(T, H, generator=gen).to(device, dtype), torch.randn(T, I, generator=gen).to(device, dtype)
    wq, wu, wd = (torch.randn(a, b, generator=gen).to(device, dtype) for a, b in ((H, H), (H, I), (I, H)))

    oh, oi = torch.empty(T, H, device=device, dtype=dtype), torch.empty(T, I, device=device, dtype=dtype)

    def call():
        torch.mm(x, wq, out=oh), torch.mm(x, wu, out=oi), torch.mm(y, wd, out=oh)

    return call, 2 * T * (H * H + 2 * H * I)


def run_interleaved(spec: H.BenchSpec, shape: dict, rounds: int, measure_memory: bool) -> tuple[list[dict], dict]:
    """Time the providers interleaved: one warm-up call each, then `rounds` rounds, each calling every
    provider once in a rotated order, and the bare-GEMM probe once; median and spread per provider.

    A shared machine's load drifts; interleaving exposes every provider to the same drift. Memory: each
    provider in its own child process on the CPU (the harness's `memory_in_child`), in process on CUDA.
    """
    import time

    device = torch.device(spec.options["device"])
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)  # noqa: E731
    fns, failed = {}, {}
    for p in spec.providers:
        try:
            fns[p] = setup(p, shape, "step", spec.options)
        except Exception as err:  # noqa: BLE001 — a provider that cannot run is a result (e.g. on under flash-attn)
            failed[p] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    probe, probe_flops = mm_probe(shape, spec.options)
    for fn in (*fns.values(), probe):
        fn()
    times: dict[str, list[float]] = {p: [] for p in fns}
    mm: list[float] = []
    names = list(fns)
    for i in range(rounds):
        for p in names[i % len(names):] + names[: i % len(names)]:
            sync()
            t0 = time.perf_counter()
            fns[p]()
            sync()
            times[p].append(time.perf_counter() - t0)
            print(f"  round {i + 1}/{rounds} {p}: {times[p][-1]:.2f} s", flush=True)
        for _ in range(2):
            sync()
            t0 = time.perf_counter()
            probe()
            sync()
            mm.append(probe_flops / (time.perf_counter() - t0))
    stamp_fields = H.stamp(spec.options["device"])
    STATS["_rounds"] = times  # per-round times (s): paired ratios in shared_report
    rows = []
    for p in names:
        ms = [t * 1e3 for t in times[p]]
        row = {"benchmark": spec.name, "provider": p, "shape": spec.label(shape), "shape_params": shape, "mode": "step",
               **{k: v for k, v in spec.options.items() if isinstance(v, (str, int, float, bool))},
               "ms_median": statistics.median(ms), "ms_p20": H._quantile(ms, 0.2), "ms_p80": H._quantile(ms, 0.8),
               "ms_min": min(ms), "ms_max": max(ms), "reps": len(ms), "ms_all": ms, "timing": "interleaved"}
        rows.append(row)
    for p, error in failed.items():
        rows.append({"benchmark": spec.name, "provider": p, "shape": spec.label(shape), "mode": "step", "error": error})
    if measure_memory:
        for row in rows:
            if row["provider"].startswith("ref-pass") or "error" in row:  # ref: forward only, no memory target
                continue
            try:
                if device.type == "cuda":
                    row["peak_mem_bytes"], row["mem_method"] = H.measure_peak_memory(fns[row["provider"]], device)
                else:
                    row["peak_mem_bytes"], row["mem_method"] = H.memory_in_child(spec, row["provider"], shape, "step")
            except Exception as err:  # noqa: BLE001
                row["mem_error"] = f"{type(err).__name__}: {str(err)[:160]}"
    for row in rows:
        row.update(stamp_fields)
    mm_rate = {"flops_per_s_median": statistics.median(mm), "flops_per_s_min": min(mm), "flops_per_s_max": max(mm),
               "gemm_shapes": f"T={seq_len(shape)} tokens × (H×H, H×I, I×H)"}
    for row in rows:
        flops = STATS.get(row["provider"], {}).get("model_flops")
        if flops:
            row["model_flops"] = flops
            row["flops_per_s"] = flops / (row["ms_median"] * 1e-3)
            row["fraction_of_mm"] = row["flops_per_s"] / mm_rate["flops_per_s_median"]
    return rows, mm_rate


# ----------------------------------------------------------------------------------------------- real TRL
def trl_version() -> str | None:
    """The installed TRL's version, None without TRL (the trl-real provider then reports an error row)."""
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


def trl_real_setup(shape: dict, options: dict):
    """The `trl-real` provider: one optimizer step of TRL's own `DPOTrainer` (written against TRL 1.16).

    TRL builds the trainer as a user would: the base model (same config, random weights, seed 0) and a
    `peft.LoraConfig` equal to `apply_lora`'s (every linear layer of the language model, r, α, dropout
    0.05), so TRL wraps it with peft itself and takes the reference from the adapters switched off; a
    one-record vision dataset and the tiny LLaVA processor only configure it (TRL needs a
    `ProcessorMixin` and a dataset with an image to take its VLM path). `--full`: TRL's `ref_model`
    is a frozen copy. The timed step is TRL's smallest public unit of a full step, what
    `Trainer._inner_training_loop` does per batch: `trainer.training_step(model, inputs)` (TRL's
    `_compute_loss`: the policy forward over [chosen | rejected] (2B rows) through TRL's fused LM head
    (`add_fused_lm_head`: completion tokens only, in tiles, no full logits), the live no-grad reference
    forward over the same 2B rows, the sigmoid DPO loss, TRL's metrics; then `accelerator.backward`),
    `accelerator.clip_grad_norm_(…, 1.0)`, `optimizer.step()` (the trainer's own AdamW, lr 1e-5, no
    weight decay), `zero_grad`. `inputs` has the layout TRL's `DataCollatorForVisionPreference`
    returns (checked against it here, on the tiny processor): input_ids / attention_mask /
    pixel_values / completion_mask over the chosen and rejected rows of `make_batch` — collation is
    outside the step for every provider. Choices where TRL's defaults differ from the other
    providers: dropout kept (`disable_dropout=False`), gradient checkpointing only with `--grad-ckpt`
    (TRL turns it on by default), fp32 on the CPU (`bf16` only with a bf16 dtype), `max_length=None`.
    """
    try:
        from trl import DPOConfig, DPOTrainer
    except ImportError as err:
        raise RuntimeError("trl-real needs TRL (pip install trl; requirements-cpu.txt lists it among the peers)") from err
    import tempfile

    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    from mdpo.models import freeze_for_full_finetune, get_adapter
    from mdpo.models.loading import choose_attn_implementation
    from mdpo.models.lora import language_model_linear_names
    from mdpo.tiny_processors import build_tiny_processor

    device, dtype = torch.device(options["device"]), getattr(torch, options["dtype"])
    pairs, lora = shape["pairs"], shape["finetune"] == "lora"
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration._from_config(
            llava_config(shape), attn_implementation=choose_attn_implementation(device), dtype=dtype)
    adapter = get_adapter("llava")
    peft_config, ref_model = None, None
    if lora:
        peft_config = LoraConfig(r=shape["lora_r"], lora_alpha=shape["lora_alpha"], lora_dropout=0.05, bias="none",
                                 target_modules=language_model_linear_names(model, adapter), task_type="CAUSAL_LM")
    else:
        freeze_for_full_finetune(model, adapter)
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    scratch = tempfile.TemporaryDirectory(prefix="trl-real-")  # its output_dir; nothing is saved there
    config = DPOConfig(
        output_dir=scratch.name, report_to="none", per_device_train_batch_size=pairs,
        learning_rate=LR, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, beta=BETA, loss_type=["sigmoid"],
        optim="adamw_torch", lr_scheduler_type="constant", max_length=None, disable_dropout=False,
        gradient_checkpointing=shape["grad_ckpt"], bf16=dtype == torch.bfloat16, fp16=False,
        use_cpu=device.type == "cpu", dataloader_num_workers=0, save_strategy="no", logging_strategy="no",
    )
    record = {"image": [Image.new("RGB", (56, 56))], "prompt": ["<image>\nWhat is in the picture?"],
              "chosen": ["A red ball."], "rejected": ["A blue cube."]}
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=Dataset.from_dict(record),
                         processing_class=build_tiny_processor("llava"), peft_config=peft_config)
    batch = make_batch(shape, device, dtype)
    rows = rows_of(batch, 0, 2 * pairs)
    inputs = {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"],
              "pixel_values": rows["pixel_values"], "completion_mask": (rows["labels"] != IGNORE).long()}
    collated = trainer.data_collator([dict(trainer.train_dataset[0])])
    if set(collated) != set(inputs):
        raise RuntimeError(f"TRL's collator returns {sorted(collated)}, the trl-real inputs have {sorted(inputs)}")
    if shape["grad_ckpt"]:  # what Trainer.train() does before its loop
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=config.gradient_checkpointing_kwargs)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train()'s loop; training_step divides by it
    model, optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    on_cuda = device.type == "cuda"
    stats = STATS.setdefault("trl-real", {})
    stats["scorer"] = f"trl {trl_version()} DPOTrainer.training_step (fused LM head, live reference)"

    def step():
        trainer.training_step(model, inputs)
        trainer.accelerator.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trainer._metrics["train"].clear()  # what its logging step does; the lists would grow over the run
        if on_cuda:
            stats["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)

    record_stats("trl-real", shape, batch, model, adapter, trainer.ref_model, trainable, 2 * pairs, [])
    step.trainer, step.scratch = trainer, scratch  # kept alive with the step, removed with it
    return step


# ----------------------------------------------------------------------------------------------- factory
def setup(provider: str, shape: dict, mode: str, options: dict):
    """Model, batch, optimizer (and cache) for one provider; returns the one-step callable (see `_harness`)."""
    from mdpo.loss import MDPOLoss, mdpo_loss

    if mode != "step":
        raise ValueError(f"mode {mode!r}: this benchmark has one mode, 'step'")
    if provider not in ALL_PROVIDERS:
        raise ValueError(f"provider {provider!r} is not one of {ALL_PROVIDERS}")
    device, dtype = torch.device(options["device"]), getattr(torch, options["dtype"])
    if provider == "trl-real":  # its own model, trainer and optimizer
        return trl_real_setup(shape, options)
    model, adapter = get_model(shape, options)
    batch = make_batch(shape, device, dtype)
    pairs = shape["pairs"]
    lora = shape["finetune"] == "lora"
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
    reference_model = None
    if provider != "ours" and not lora:  # live reference without adapters: a frozen copy (TRL's ref_model)
        reference_model = copy.deepcopy(model).eval().requires_grad_(False)
    on_cuda = device.type == "cuda"
    stats = STATS.setdefault(provider, {})

    def finish(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_cuda:  # allocator statistic, no sync; the last call is the harness's memory call
            stats["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)

    if provider in ("ref-pass", "ref-pass-shared"):  # the cached reference pass over one micro-batch
        scorer, stats["scorer"] = make_scorer(model if reference_model is None else reference_model, adapter,
                                              provider in SHARED)

        def step():
            model.eval()  # as prepare_reference_cache: dropout off, no grad, adapters off
            with torch.no_grad(), adapters_off(model):
                scorer(batch).float().cpu()
            model.train()

        policy_rows = 3 * pairs
        extra_resident = []
    elif provider in ("ours", "ours-shared", "ours-live"):
        scorer, stats["scorer"] = make_scorer(model, adapter, provider in SHARED)
        ref_scorer = scorer if reference_model is None else make_scorer(reference_model, adapter)[0]
        criterion = MDPOLoss(beta=BETA)
        ref_cache = None
        if provider != "ours-live":  # the cache, computed once before training (train.py: compute_reference_cache)
            scorer.eval()
            with torch.no_grad(), adapters_off(model):
                ref_cache = scorer(batch).float().cpu()
            scorer.train()

        def step():
            if ref_cache is not None:
                ref = ref_cache.to(device, non_blocking=True)  # cache.lookup(ids).to(device)
            else:
                with torch.no_grad(), adapters_off(model):
                    ref = ref_scorer(batch)
            loss, _metrics = criterion(policy_logps=scorer(batch), ref_logps=ref)
            finish(loss)

        policy_rows = 3 * pairs
        extra_resident = [] if ref_cache is None else [ref_cache]
    elif provider == "paper":
        chosen_rejected, corrupted = rows_of(batch, 0, 2 * pairs), rows_of(batch, 2 * pairs, 3 * pairs)
        ref_model = model if reference_model is None else reference_model

        def branch_logps(net, rows):
            logits = net(**model_inputs(rows), use_cache=False).logits.to(torch.float32)
            return full_logits_logps(logits, rows["labels"]), logits

        def step():
            # concatenated_forward(policy): chosen+rejected in one call, then the corrupted image
            pol_cr, logits_cr = branch_logps(model, chosen_rejected)
            pol_k, logits_k = branch_logps(model, corrupted)
            with torch.no_grad(), (adapters_off(model) if reference_model is None else contextlib.nullcontext()):
                ref_cr, _ = branch_logps(ref_model, chosen_rejected)
                ref_k, _ = branch_logps(ref_model, corrupted)
            loss, metrics = mdpo_loss(torch.cat([pol_cr, pol_k]), torch.cat([ref_cr, ref_k]), beta=BETA)
            metrics["logits/chosen"] = logits_cr.detach().mean()  # kept alive until here, as in the paper code
            metrics["logits/imageless_chosen"] = logits_k.detach().mean()
            del logits_cr, logits_k
            finish(loss)

        policy_rows = 3 * pairs
        extra_resident = []
    else:  # trl-dpo
        chosen_rejected = rows_of(batch, 0, 2 * pairs)
        ref_model = model if reference_model is None else reference_model

        def step():
            pol = full_logits_logps(model(**model_inputs(chosen_rejected), use_cache=False).logits, chosen_rejected["labels"])
            with torch.no_grad(), (adapters_off(model) if reference_model is None else contextlib.nullcontext()):
                ref = full_logits_logps(ref_model(**model_inputs(chosen_rejected), use_cache=False).logits, chosen_rejected["labels"])
            loss, _metrics = mdpo_loss(pol, ref, beta=BETA, objective="dpo")
            finish(loss)

        policy_rows = 2 * pairs
        extra_resident = []

    record_stats(provider, shape, batch, model, adapter, reference_model, trainable, policy_rows, extra_resident)
    return step


def record_stats(provider: str, shape: dict, batch: dict, model, adapter, reference_model, trainable: list,
                 policy_rows: int, extra_resident: list) -> None:
    """STATS[provider]: rows, tokens, the LM forwards and their FLOPs, and the resident bytes before a step."""
    stats = STATS.setdefault(provider, {})
    T = seq_len(shape)
    # Resident before a step (after the first): weights (+ reference copy), AdamW's two moments, the batch.
    weights = list(model.parameters()) + list(model.buffers())
    if reference_model is not None:
        weights += list(reference_model.parameters()) + list(reference_model.buffers())
    supervised = int((batch["labels"] != IGNORE).sum())
    forwards = lm_forwards(provider, shape, batch, model, adapter)
    stats.update(
        policy_rows=policy_rows, T=T, tokens=policy_rows * T, supervised=supervised, forwards=forwards,
        lm_tokens=sum(f["rows"] * f["L"] for f in forwards),
        lm_tokens_grad=sum(f["rows"] * f["L"] for f in forwards if f["grad"]),
        model_flops=sum(forward_flops(shape, f) for f in forwards),
        resident_bytes=_tensor_bytes(weights) + 2 * _tensor_bytes(trainable) + _tensor_bytes(v for v in batch.values() if torch.is_tensor(v))
        + _tensor_bytes(extra_resident),
    )


# ----------------------------------------------------------------------------------------------- reports
def annotate(rows: list[dict], device: str) -> None:
    """tokens/s, resident and total peak memory, and ratios to each baseline present."""
    for row in rows:
        stats = STATS.get(row["provider"], {})
        for key in ("policy_rows", "T", "tokens", "supervised", "resident_bytes", "scorer", "lm_tokens", "lm_tokens_grad",
                    "model_flops", "forwards"):
            if key in stats:
                row[key] = stats[key]
        if "ms_median" in row and "tokens" in row:
            row["tokens_per_s"] = row["tokens"] / (row["ms_median"] * 1e-3)
        if row.get("peak_mem_bytes") is not None:
            if device == "cuda" and "cuda_peak_bytes" in stats:
                row["peak_total_bytes"], row["total_method"] = stats["cuda_peak_bytes"], "cuda max_memory_allocated"
            elif "resident_bytes" in stats:
                row["peak_total_bytes"] = stats["resident_bytes"] + row["peak_mem_bytes"]
                row["total_method"] = "resident (counted) + extra (measured)"
    for base in BASELINES:
        ref = next((r for r in rows if r["provider"] == base), None)
        if ref is None:
            continue
        H.add_ratios(rows, base)
        for row in rows:
            if row.get("tokens_per_s") and ref.get("tokens_per_s"):
                row[f"throughput_vs_{base}"] = row["tokens_per_s"] / ref["tokens_per_s"]
            if row.get("peak_total_bytes") and ref.get("peak_total_bytes"):
                row[f"total_mem_vs_{base}"] = row["peak_total_bytes"] / ref["peak_total_bytes"]


def summary_table(rows: list[dict]) -> str:
    gib = lambda b: "—" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    ratio = lambda v: "—" if v is None else f"{v:.2f}×"  # noqa: E731
    header = ["provider", "policy rows × T", "LM tokens/step", "median s", "tokens/s", "peak extra GiB", "resident GiB", "peak total GiB",
              "tok/s vs paper", "total mem vs paper", "tok/s vs trl-dpo", "total mem vs trl-dpo"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if "ms_median" not in r:
            lines.append(f"| {r['provider']} | {r.get('error') or 'skipped: ' + str(r.get('skipped'))} |" + " |" * (len(header) - 2))
            continue
        lines.append("| " + " | ".join([
            r["provider"], f"{r.get('policy_rows')} × {r.get('T')}", str(r.get("lm_tokens", "—")), f"{r['ms_median'] / 1e3:.3f}",
            f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "—",
            gib(r.get("peak_mem_bytes")), gib(r.get("resident_bytes")), gib(r.get("peak_total_bytes")),
            ratio(r.get("throughput_vs_paper")), ratio(r.get("total_mem_vs_paper")),
            ratio(r.get("throughput_vs_trl-dpo")), ratio(r.get("total_mem_vs_trl-dpo")),
        ]) + " |")
    return "\n".join(lines)


def target_report(rows: list[dict], device: str) -> list[str]:
    by = {r["provider"]: r for r in rows}
    ours, lines = by.get("ours"), []
    if not ours or "ms_median" not in ours:
        return ["ours has no timing: no ratios"]
    fmt = lambda v: "—" if v is None else f"{v:.2f}×"  # noqa: E731
    for base in BASELINES:
        peer = by.get(base)
        if not peer:
            continue
        if "ms_median" not in peer:
            lines.append(f"ours vs {base}: {base} did not run ({peer.get('error') or peer.get('skipped')})")
            continue
        tput, total, extra = ours.get(f"throughput_vs_{base}"), ours.get(f"total_mem_vs_{base}"), ours.get(f"mem_vs_{base}")
        text = (f"ours vs {base}: tokens/s {fmt(tput)}, peak total memory {fmt(total)}, peak extra memory {fmt(extra)}")
        if device == "cuda" and base == "paper":
            ok_t = tput is not None and tput >= 1.5
            ok_total = total is not None and total <= 0.6
            ok_extra = extra is not None and extra <= 0.6
            text += (f" — target tokens/s ≥ 1.5×: {'REACHED' if ok_t else 'not reached'}; peak memory ≤ 0.6×: "
                     f"{'REACHED' if ok_total else 'not reached'} on the total peak, "
                     f"{'REACHED' if ok_extra else 'not reached'} on the extra above weights + optimizer state")
        elif device != "cuda":
            text += " (CPU: ratios only, no target)"
        lines.append(text)
    return lines


def shared_report(rows: list[dict], mm_rate: dict) -> list[str]:
    """The shared-prefix targets (issue 13), each met or missed with its number."""
    by = {r["provider"]: r for r in rows if "ms_median" in r}
    lines = []

    def ratio(a, b, key):
        return by[a][key] / by[b][key] if a in by and b in by and by[a].get(key) and by[b].get(key) else None

    fmt = lambda v: "—" if v is None else f"{v:.2f}×"  # noqa: E731
    verdict = lambda ok: "MET" if ok else "missed"  # noqa: E731
    rounds = STATS.get("_rounds", {})

    def per_round(a, b):  # the ratio within each round: robust to a load that drifts between rounds
        if a not in rounds or b not in rounds:
            return ""
        values = [x / y for x, y in zip(rounds[a], rounds[b])]
        return (f"; per round {', '.join(f'{v:.2f}' for v in values)} (median {statistics.median(values):.2f}×)")

    step = ratio("ours", "ours-shared", "ms_median")
    if step is not None:
        lines.append(f"ours-shared step time vs ours: {fmt(step)} faster on the medians (target ≥ 1.5×: {verdict(step >= 1.5)})"
                     f"{per_round('ours', 'ours-shared')}; LM tokens per step {by['ours']['lm_tokens']} → "
                     f"{by['ours-shared']['lm_tokens']} ({by['ours']['lm_tokens'] / by['ours-shared']['lm_tokens']:.2f}× fewer)")
    mem = ratio("ours-shared", "ours", "peak_mem_bytes")
    if mem is not None:
        lines.append(f"ours-shared peak extra memory vs ours: {fmt(mem)} (target ≤ 0.8×: {verdict(mem <= 0.8)})")
    ref = ratio("ref-pass", "ref-pass-shared", "ms_median")
    if ref is not None:
        lines.append(f"cached reference pass shared vs unshared: {fmt(ref)} faster on the medians (target ≥ 1.4×: "
                     f"{verdict(ref >= 1.4)}){per_round('ref-pass', 'ref-pass-shared')}; LM tokens "
                     f"{by['ref-pass']['lm_tokens']} → {by['ref-pass-shared']['lm_tokens']}")
    rate = mm_rate.get("flops_per_s_median")
    if rate:
        lines.append(f"bare torch.mm at the model's shapes ({mm_rate['gemm_shapes']}): {rate / 1e9:.1f} GFLOP/s median "
                     f"({mm_rate['flops_per_s_min'] / 1e9:.1f}–{mm_rate['flops_per_s_max'] / 1e9:.1f} over the rounds)")
        for name, row in by.items():
            if row.get("fraction_of_mm") is not None:
                target = f" (target ≥ 50 %: {verdict(row['fraction_of_mm'] >= 0.5)})" if name == "ours-shared" else ""
                lines.append(f"{name}: {row['model_flops'] / 1e12:.2f} TFLOP per step / {row['ms_median'] / 1e3:.2f} s = "
                             f"{row['flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * row['fraction_of_mm']:.0f} % of bare torch.mm{target}")
    return lines


def trl_report(rows: list[dict]) -> list[str]:
    """ours (and ours-shared) against real TRL and against the trl-dpo imitation: step time and tokens/s.

    Step time compares what the user waits for (mDPO's 3B rows against DPO's 2B); tokens/s counts each
    provider's own policy rows. Per-round ratios come from the interleaved rounds (the same load).
    """
    by = {r["provider"]: r for r in rows if "ms_median" in r}
    rounds, lines = STATS.get("_rounds", {}), []
    version = trl_version()
    for mine in ("ours", "ours-shared"):
        for base in ("trl-real", "trl-dpo"):
            if mine not in by or base not in by:
                continue
            a, b = by[mine], by[base]
            text = (f"{mine} vs {base}{f' (trl {version})' if base == 'trl-real' else ''}: step time "
                    f"{b['ms_median'] / a['ms_median']:.2f}× faster on the medians")
            if mine in rounds and base in rounds:
                per = [y / x for x, y in zip(rounds[mine], rounds[base])]
                text += f" (per round {', '.join(f'{v:.2f}' for v in per)}; median {statistics.median(per):.2f}×)"
            if a.get("tokens_per_s") and b.get("tokens_per_s"):
                text += f"; tokens/s {a['tokens_per_s'] / b['tokens_per_s']:.2f}× ({a['policy_rows']} vs {b['policy_rows']} policy rows)"
            if a.get("peak_mem_bytes") and b.get("peak_mem_bytes"):
                text += f"; peak extra memory {a['peak_mem_bytes'] / b['peak_mem_bytes']:.2f}×"
            lines.append(text)
    if "trl-real" in by and "trl-dpo" in by:
        lines.append(f"trl-dpo (imitation) vs trl-real: step time {by['trl-real']['ms_median'] / by['trl-dpo']['ms_median']:.2f}× "
                     "(> 1: the imitation is faster than real TRL)")
    return lines


def interleaved_table(rows: list[dict]) -> str:
    gib = lambda b: "—" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    header = ["provider", "LM forwards (rows × L, grad)", "LM tokens/step", "median s", "p20–p80 s", "min–max s",
              "peak extra GiB", "model TFLOP/step", "% of torch.mm"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if "ms_median" not in r:
            lines.append(f"| {r['provider']} | {r.get('error')} |" + " |" * (len(header) - 2))
            continue
        forwards = " + ".join(f"{f['rows']}×{f['L']}{'' if f['grad'] else ' (no grad)'}" for f in r.get("forwards", []))
        lines.append("| " + " | ".join([
            r["provider"], forwards, str(r.get("lm_tokens", "—")), f"{r['ms_median'] / 1e3:.2f}",
            f"{r['ms_p20'] / 1e3:.2f}–{r['ms_p80'] / 1e3:.2f}", f"{r['ms_min'] / 1e3:.2f}–{r['ms_max'] / 1e3:.2f}",
            gib(r.get("peak_mem_bytes")), f"{r['model_flops'] / 1e12:.2f}" if r.get("model_flops") else "—",
            f"{100 * r['fraction_of_mm']:.0f} %" if r.get("fraction_of_mm") else "—",
        ]) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> list[dict]:
    parser = H.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), default_modes=("step",))
    parser.add_argument("--text-layers", type=int, default=None, help="Llama decoder layers (LLaVA-1.5-7B: 32)")
    parser.add_argument("--vision-layers", type=int, default=None, help="CLIP encoder layers (CLIP-L: 24)")
    parser.add_argument("--pairs", type=int, default=None, help="preference pairs B per step (3B policy rows)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="text prompt tokens per row, BOS included (besides the image tokens)")
    parser.add_argument("--response-tokens", type=int, default=None, help="response tokens per row (the supervised ones); |y_w|")
    parser.add_argument("--rejected-tokens", type=int, default=None, help="|y_l| (default: --response-tokens); shorter rows are right-padded")
    parser.add_argument("--image-size", type=int, default=None, help="image side in pixels, a multiple of 14 (336 → 576 image tokens)")
    finetune = parser.add_mutually_exclusive_group()
    finetune.add_argument("--lora", dest="finetune", action="store_const", const="lora", help="LoRA on the language model (default)")
    finetune.add_argument("--full", dest="finetune", action="store_const", const="full", help="full fine-tuning of the language model + LM head")
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--lora-alpha", type=int, default=128)
    parser.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing of every decoder layer")
    parser.add_argument("--budget-s", type=float, default=None, help="timing budget per provider (reps = budget / one step, ≥ 3; 2 with --quick)")
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="time the providers interleaved over ROUNDS rounds (plus a warm-up call each) and report "
                             "LM tokens, model FLOPs and the fraction of the bare torch.mm rate; results as train_step-<tag>")
    parser.add_argument("--tag", default=None, help="results file tag (default: the device, -quick/-full/-ckpt)")
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev_type = torch.device(device).type
    dtype = args.dtype or ("bfloat16" if dev_type == "cuda" else "float32")
    if args.modes != "step":
        raise SystemExit("--modes: this benchmark has one mode, 'step'")
    defaults = DEFAULTS[("cuda" if dev_type == "cuda" else "cpu") + ("-quick" if args.quick else "")]
    flags = {k: getattr(args, k) for k in defaults}
    shape = {**LLAVA_15_7B, **{k: (v if v is not None else defaults[k]) for k, v in flags.items()},
             "finetune": args.finetune or "lora", "lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "grad_ckpt": args.grad_ckpt}
    if args.rejected_tokens is not None:
        if args.rejected_tokens < 1:
            raise SystemExit(f"--rejected-tokens must be ≥ 1, got {args.rejected_tokens}")
        shape["rejected_tokens"] = args.rejected_tokens
    for key in ("text_layers", "vision_layers", "pairs", "prompt_tokens", "response_tokens", "lora_r"):
        if shape[key] < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be ≥ 1, got {shape[key]}")
    if shape["image_size"] < shape["patch"] or shape["image_size"] % shape["patch"]:
        raise SystemExit(f"--image-size must be a positive multiple of the patch size {shape['patch']}, got {shape['image_size']}")
    providers = args.providers.split(",") if args.providers else (
        ["ours", "ours-shared", "ours-live", "paper", "trl-dpo"] if dev_type == "cuda" else ["ours", "ours-shared", "paper", "trl-dpo"])
    unknown = sorted(set(providers) - set(ALL_PROVIDERS))
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; known: {ALL_PROVIDERS}")
    options = {"device": device, "dtype": dtype}

    # Build the model once here: it is shared by the providers and its size goes into the notes.
    model, adapter = get_model(shape, options)
    total_params = sum(p.numel() for p in model.parameters())
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _, scorer_source = make_scorer(model, adapter)
    del model
    from mdpo_kernels import dispatch

    T, n_img = seq_len(shape), image_tokens(shape)
    tuning = f"LoRA r={shape['lora_r']} α={shape['lora_alpha']}" if shape["finetune"] == "lora" else "full fine-tuning"
    notes = [
        f"model: LLaVA-1.5-7B shape with {shape['text_layers']}/32 text layers (H {shape['hidden']}, I {shape['intermediate']}, "
        f"{shape['heads']} heads, V {shape['vocab']}) and {shape['vision_layers']}/24 CLIP-L layers at {shape['image_size']} px "
        f"({n_img} image tokens); {total_params / 1e9:.2f} B parameters, {trainable_params / 1e6:.1f} M trainable ({tuning}); "
        f"{dtype}; gradient checkpointing {'on' if shape['grad_ckpt'] else 'off'}",
        f"batch: {shape['pairs']} pair(s) → rows of T = {T} tokens ({n_img} image + {shape['prompt_tokens']} prompt incl. BOS + "
        f"{shape['response_tokens']} response y_w, {rejected_tokens(shape)} y_l, only the responses supervised); policy rows: 3B = {3 * shape['pairs']} "
        f"(ours, ours-live, paper), 2B = {2 * shape['pairs']} (trl-dpo, trl-real)",
        f"ours: {scorer_source}; fused LM head's log-softmax through impl '{dispatch.resolve_impl(torch.device(device))}'",
        "step = forward(s) + loss + backward + clip_grad_norm_(1.0) + AdamW step; reference cache (ours) built in setup",
        "peak extra: above weights + optimizer state + batch (CPU: each provider in its own process); peak total: "
        + ("CUDA allocator peak of one step" if dev_type == "cuda" else "counted resident bytes + measured extra"),
    ]
    if "trl-real" in providers:
        notes.append(f"trl-real: TRL {trl_version() or '(not installed)'} DPOTrainer.training_step + clip + its AdamW step; "
                     "LoRA by TRL through peft_config, reference = adapters off, fused LM head, dropout kept")
    for note in notes:
        print("#", note, flush=True)

    spec = H.BenchSpec(
        name="train_step", module="benchmarks.train_step", factory="setup", providers=providers, shapes=[shape],
        modes=["step"], options=options,
        shape_label=lambda s: (f"L{s['text_layers']}+V{s['vision_layers']} {s['image_size']}px B{s['pairs']} "
                               f"T{seq_len(s)} {'lora' + str(s['lora_r']) if s['finetune'] == 'lora' else 'full'}"
                               f"{' ckpt' if s['grad_ckpt'] else ''}"),
    )
    tag = args.tag or (dev_type + ("-quick" if args.quick else "") + ("-full" if shape["finetune"] == "full" else "")
                       + ("-ckpt" if shape["grad_ckpt"] else ""))
    if args.interleave:
        notes.append(f"timing: providers interleaved over {args.interleave} rounds (rotated order) after one warm-up call "
                     "each; median, 20/80 % and min–max; the bare torch.mm probe once per round")
        rows, mm_rate = run_interleaved(spec, shape, args.interleave, measure_memory=not args.no_memory)
        annotate(rows, dev_type)
        targets = shared_report(rows, mm_rate) + trl_report(rows)
        paths = H.write_reports(rows, "train_step", tag, notes=notes + ["target: " + t for t in targets],
                                results_dir=args.results_dir)
        with open(paths["md"], "a") as md:
            md.write("\n## Interleaved\n\n" + interleaved_table(rows) + "\n")
        with open(paths["json"]) as f:
            payload = json.load(f)
        if isinstance(payload, dict):
            payload["mm_rate"] = mm_rate
            with open(paths["json"], "w") as f:
                json.dump(payload, f, indent=1, default=str)
        _MODEL_CACHE.clear()
        print()
        print(interleaved_table(rows))
        print()
        for line in targets:
            print("target:", line)
        print("wrote", ", ".join(paths.values()))
        return rows
    rows: list[dict] = []
    paths: dict = {}
    for provider in providers:  # one provider at a time, reports rewritten after each: a killed run keeps its rows
        rows += H.run_benchmark(dataclasses.replace(spec, providers=[provider]), setup, quick=args.quick,
                                measure_memory=not args.no_memory, budget_s=args.budget_s)
        for row in rows:
            for key in [k for k in row if k.startswith(("speedup_vs_", "mem_vs_", "throughput_vs_", "total_mem_vs_"))]:
                del row[key]
        annotate(rows, dev_type)
        targets = target_report(rows, dev_type)
        paths = H.write_reports(rows, "train_step", tag, notes=notes + ["target: " + t for t in targets], results_dir=args.results_dir)
        with open(paths["md"], "a") as md:
            md.write("\n## Per step\n\n" + summary_table(rows) + "\n")
    _MODEL_CACHE.clear()
    print()
    print(summary_table(rows))
    print()
    for line in target_report(rows, dev_type):
        print("target:", line)
    print("wrote", ", ".join(paths.values()))
    return rows


if __name__ == "__main__":
    main()
