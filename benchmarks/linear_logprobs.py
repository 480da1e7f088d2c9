"""Benchmark of `linear_sequence_logprobs` (hidden states → sequence log-probs) against its peers.

    python -m benchmarks.linear_logprobs                    # CPU: shapes a, b; GPU: a, b, c in bf16
    python -m benchmarks.linear_logprobs --quick            # smoke run: small shape, short timing
    python -m benchmarks.linear_logprobs --shapes b --heads frozen --providers ours,cce

Providers (forward + backward, a random upstream gradient per row; timed interleaved in one process: per
shape, every provider once per round in a rotated order, ≥ --rounds rounds (5 by default: calls take
seconds here), so a shared machine's drifting load hits all alike; every call returns fresh gradients;
median, 20–80 % and min–max reported; CPU memory: one child process each):
  ours       `linear_sequence_logprobs` (automatic dispatch for the per-chunk log-softmax)
  naive      matmul → log_softmax → gather → masked sum over all positions, (R, T, V) logits
  compile    torch.compile of naive
  torch-lce  torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions() (chunked),
             reduction="none", summed per row (skipped when this torch lacks it)
  liger      Liger's LigerFusedLinearDPOLoss (no reference model, compiled): a scalar DPO loss from the
             first half of the rows (chosen) against the second (rejected)
  cce        Cut Cross-Entropy linear_cross_entropy, reduction="none", shift=True; impl="torch_compile" on
             the CPU, its Triton kernels ("cce") on a GPU
  gemms      the bare GEMMs over the supervised tokens only (h Wᵀ, then D W and, head trained, Dᵀ h with
             a ready-made D): the floor for any method that projects only supervised tokens
Heads: "frozen" — only hidden requires a gradient (LoRA training, the LM head is not adapted);
"trained" — hidden and weight do. No bias anywhere (Cut Cross-Entropy takes none).

Shapes (R rows × T positions, H, V):
  a  8 × 512 (4 pairs), first quarter of every row ignored, H = 1024, V = 32000
  b  6 × 768 (3 branches × 2 samples: 576 image + 64 prompt + 128 response tokens, only the response
     supervised), H = 2560, V = 51200 (Bunny / Phi-2)
  c  as b with H = 3584, V = 151936 (Qwen2-VL), GPU only
TFLOP/s counts the useful GEMM work over supervised tokens only: (2 frozen | 3 trained) · 2·N·V·H.
Targets (printed, never asserted): CPU — a: time ≤ 0.6× naive, peak extra ≤ 0.2× naive's; b: no slower
than cce and no more extra memory. GPU — ≤ 1.15× gemms, faster than liger, no slower than cce.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks import _harness as H
from mdpo_kernels import dispatch
from mdpo_kernels.linear_logprobs import linear_sequence_logprobs

IGNORE = -100
ALL_PROVIDERS = ["ours", "naive", "compile", "torch-lce", "liger", "cce", "gemms"]
SHAPES = {
    "a": {"name": "a", "rows": 8, "T": 512, "H": 1024, "V": 32000, "ignored": 128},
    "b": {"name": "b", "rows": 6, "T": 768, "H": 2560, "V": 51200, "ignored": 640},
    "c": {"name": "c", "rows": 6, "T": 768, "H": 3584, "V": 151936, "ignored": 640},
    "quick": {"name": "quick", "rows": 4, "T": 128, "H": 256, "V": 8000, "ignored": 32},
}


def supervised_tokens(shape: dict) -> int:
    """Supervised positions after the shift: labels[r, ignored:] scored by positions ignored−1 … T−2."""
    return shape["rows"] * (shape["T"] - shape["ignored"])


# ----------------------------------------------------------------------------------------------- peers
def naive(hidden, weight, labels):
    """What TRL-style code does: every position through the LM head, log-softmax, gather, masked sum."""
    logits = (hidden @ weight.t())[:, :-1]
    target = labels[:, 1:]
    mask = target != IGNORE
    per_token = logits.log_softmax(-1).gather(-1, torch.where(mask, target, 0).unsqueeze(-1)).squeeze(-1)
    return (per_token * mask).sum(-1).float()


_compiled = None


def compiled(hidden, weight, labels):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(naive, dynamic=False)
    return _compiled(hidden, weight, labels)


def torch_lce(hidden, weight, labels):
    rows, positions, size = hidden.shape
    loss = F.linear_cross_entropy(
        hidden[:, :-1].reshape(-1, size), weight, labels[:, 1:].reshape(-1),
        reduction="none", ignore_index=IGNORE, options=torch.nn.LinearCrossEntropyOptions(),
    )
    return -loss.view(rows, positions - 1).sum(-1)


def cce(hidden, weight, labels):
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if hidden.is_cuda else "torch_compile"
    loss = linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, reduction="none", shift=True, impl=impl)
    return -loss.float().sum(-1)


_liger_loss = None


def liger(hidden, weight, labels):
    """A scalar DPO loss (chosen = first half of the rows); Liger computes its gradients in the forward."""
    global _liger_loss
    if _liger_loss is None:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        _liger_loss = LigerFusedLinearDPOLoss(ignore_index=IGNORE, use_ref_model=False, compiled=True)
    return _liger_loss(weight, hidden[:, :-1], labels[:, 1:])[0]  # (loss, aux outputs)


def ours(hidden, weight, labels):
    return linear_sequence_logprobs(hidden, weight, labels, check_labels=False)


# ----------------------------------------------------------------------------------------------- factory
def setup(provider: str, shape: dict, mode: str, options: dict):
    """Inputs for one run and the callable that runs one iteration (see `_harness`)."""
    device, dtype = torch.device(options["device"]), getattr(torch, options["dtype"])
    if provider == "torch-lce" and not hasattr(F, "linear_cross_entropy"):
        raise H.Skip(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    if shape["name"] == "c" and device.type != "cuda":
        raise H.Skip("shape c is GPU-only")
    if provider == "liger" and shape["rows"] % 2:
        raise H.Skip("Liger's DPO loss needs an even number of rows")
    rows, positions, size, vocab = shape["rows"], shape["T"], shape["H"], shape["V"]
    trained = shape["head"] == "trained"
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(rows, positions, size, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, size, generator=gen) / size**0.5).to(device=device, dtype=dtype).requires_grad_(trained)
    labels = torch.randint(0, vocab, (rows, positions), generator=gen)
    labels[:, : shape["ignored"]] = IGNORE
    labels = labels.to(device)
    upstream = torch.randn(rows, generator=gen).to(device)
    leaves = (hidden, weight) if trained else (hidden,)

    if provider == "gemms":
        # The bare GEMMs over the N supervised tokens, with D = a ready-made (N, V) matrix.
        n = supervised_tokens(shape)
        h = torch.randn(n, size, generator=gen).to(device=device, dtype=dtype)
        d = torch.randn(n, vocab, generator=gen).to(device=device, dtype=dtype)

        def run():
            logits = h @ weight.detach().t()
            del logits
            grad_h = d @ weight.detach()
            grad_w = d.t() @ h if trained else None
            del grad_h, grad_w

        return run

    op = {"ours": ours, "naive": naive, "compile": compiled, "torch-lce": torch_lce, "liger": liger, "cce": cce}[provider]
    if mode == "full":
        if provider == "liger":
            def run():
                torch.autograd.grad(op(hidden, weight, labels), leaves)
        else:
            def run():
                torch.autograd.grad(op(hidden, weight, labels), leaves, upstream)
    elif mode == "forward":  # the reference pass: no autograd at all
        if provider == "liger":
            raise H.Skip("Liger's loss always computes gradients")

        def run():
            with torch.no_grad():
                op(hidden, weight, labels)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return run


def flops(shape: dict, mode: str, options: dict) -> int:
    gemms = 1 if mode == "forward" else (3 if shape["head"] == "trained" else 2)
    return gemms * 2 * supervised_tokens(shape) * shape["V"] * shape["H"]


# ----------------------------------------------------------------------------------------------- targets
def target_report(rows: list[dict], device: str) -> list[str]:
    by = {(r["shape"], r["mode"], r["provider"]): r for r in rows}
    lines = []

    def ratio(shape, a, b, key):
        ra, rb = by.get((shape, "full", a)), by.get((shape, "full", b))
        if not ra or not rb or ra.get(key) is None or rb.get(key) is None:
            return None
        return ra[key] / rb[key]

    for shape in dict.fromkeys(r["shape"] for r in rows):
        name = shape.split(":")[0]
        t_naive, m_naive = ratio(shape, "ours", "naive", "ms_median"), ratio(shape, "ours", "naive", "peak_mem_bytes")
        t_cce, m_cce = ratio(shape, "ours", "cce", "ms_median"), ratio(shape, "ours", "cce", "peak_mem_bytes")
        t_gemm, t_liger = ratio(shape, "ours", "gemms", "ms_median"), ratio(shape, "ours", "liger", "ms_median")
        fmt = lambda v: "—" if v is None else f"{v:.2f}×"  # noqa: E731
        verdict = lambda ok: "—" if ok is None else ("REACHED" if ok else "not reached")  # noqa: E731
        if device == "cpu" and name == "a":
            lines.append(f"{shape}: time {fmt(t_naive)} naive (target ≤ 0.6×: {verdict(t_naive and t_naive <= 0.6)}), "
                         f"peak extra {fmt(m_naive)} naive's (target ≤ 0.2×: {verdict(m_naive and m_naive <= 0.2)})")
        elif device == "cpu" and name == "b":
            lines.append(f"{shape}: time {fmt(t_cce)} cce (target ≤ 1×: {verdict(t_cce and t_cce <= 1.0)}), "
                         f"peak extra {fmt(m_cce)} cce's (target ≤ 1×: {verdict(m_cce and m_cce <= 1.0)})")
        elif device == "cuda":
            lines.append(f"{shape}: time {fmt(t_gemm)} bare GEMMs (target ≤ 1.15×: {verdict(t_gemm and t_gemm <= 1.15)}), "
                         f"{fmt(t_liger)} liger (target < 1×: {verdict(t_liger and t_liger < 1.0)}), "
                         f"{fmt(t_cce)} cce (target ≤ 1×: {verdict(t_cce and t_cce <= 1.0)})")
        if t_gemm is not None and device == "cpu":
            lines.append(f"{shape}: {fmt(t_gemm)} the bare GEMMs over supervised tokens")
    return lines


def main(argv=None) -> list[dict]:
    parser = H.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), default_modes=("full",))
    parser.add_argument("--shapes", default=None, help="comma-separated subset of a,b,c (default a,b on CPU, a,b,c on GPU)")
    parser.add_argument("--heads", default="frozen,trained", help="comma-separated: frozen (hidden grad only), trained (weight too)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="timing budget per provider (rounds = budget / one round of calls, at least --rounds)")
    parser.add_argument("--rounds", type=int, default=None, help="at least this many interleaved rounds (default 5, 3 with --quick)")
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = torch.device(device).type == "cuda"
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    names = ["quick"] if args.quick else (args.shapes.split(",") if args.shapes else (["a", "b", "c"] if on_gpu else ["a", "b"]))
    unknown = set(names) - set(SHAPES)
    if unknown:
        raise SystemExit(f"--shapes: unknown {sorted(unknown)}; known: {sorted(SHAPES)}")
    heads = args.heads.split(",")
    if set(heads) - {"frozen", "trained"}:
        raise SystemExit("--heads takes frozen and/or trained")
    shapes = [dict(SHAPES[n], head=head) for n in names for head in heads]
    providers = args.providers.split(",") if args.providers else ALL_PROVIDERS
    if set(providers) - set(ALL_PROVIDERS):
        raise SystemExit(f"--providers: unknown {sorted(set(providers) - set(ALL_PROVIDERS))}; known: {ALL_PROVIDERS}")

    notes = [
        f"ours: per-chunk log-softmax through impl '{dispatch.resolve_impl(torch.device(device))}' on {device}; dtype {dtype}",
        "full = forward + backward with a random upstream gradient per row (liger: its scalar DPO loss)",
        "peak extra memory: above the inputs; CPU: each provider measured in its own process",
        f"timing: providers interleaved (rounds in a rotated order); {torch.get_num_threads()} torch threads; "
        f"load average (1/5/15 min) at the start: {H.load_average()}",
    ]
    for note in notes:
        print("#", note)
    spec = H.BenchSpec(
        name="linear_logprobs", module="benchmarks.linear_logprobs", factory="setup", providers=providers, shapes=shapes,
        modes=args.modes.split(","), options={"device": device, "dtype": dtype}, baseline="naive", flops=flops,
        shape_label=lambda s: f"{s['name']}:{s['head']} {s['rows']}×{s['T']} H{s['H']} V{s['V']}",
    )
    rows = H.run_benchmark(spec, setup, quick=args.quick, measure_memory=not args.no_memory, budget_s=args.budget_s,
                           interleave=True, min_rounds=args.rounds if args.rounds is not None else (3 if args.quick else 5))
    targets = target_report(rows, torch.device(device).type)
    H.report(rows, "linear_logprobs", torch.device(device).type + ("-quick" if args.quick else ""), targets,
             notes=notes, results_dir=args.results_dir)
    return rows


if __name__ == "__main__":
    main()
