"""A small CPU benchmark group for pytest-benchmark — not part of the default test run.

    python -m pytest benchmarks/test_bench_cpu.py --benchmark-only          # the group, about 30 s on 2 cores
    python -m pytest benchmarks/test_bench_cpu.py --benchmark-only --benchmark-columns=median,iqr,rounds
    python -m pytest benchmarks/test_bench_cpu.py --benchmark-only --benchmark-json=bench.json
    python -m pytest benchmarks/test_bench_cpu.py --benchmark-disable       # the correctness checks only, one call each

`python -m pytest -q` from the repo root does not collect this file: pyproject.toml's `testpaths` is
`tests/` only. It needs pytest-benchmark (the `dev` extra); without it the file is skipped.

Groups (forward + backward with a random upstream gradient, fp32, CPU):
  sequence_logprobs         ours through the C++ extension (skipped when not built) and the chunked torch
                            path vs eager log_softmax + gather, at 4 × 128 positions × V = 8000
  linear_sequence_logprobs  ours vs naive matmul → log_softmax → gather, 4 × 128 × H 256 × V 8000, a quarter ignored
  reference pass            the no-grad, adapters-off fused forward that fills ours' reference cache
  train_step                one whole mDPO step (forward, loss, backward, clip, AdamW) of a tiny LLaVA with LoRA:
                            ours (one 3B-row forward, fused head, cached reference) vs the paper pattern and TRL DPO
Every test checks its result against a reference before timing, so a wrong answer fails; timings are
only reported, never asserted.
"""
from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as tests/conftest.py: never wait on the model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

pytest.importorskip("pytest_benchmark", reason="the CPU benchmark group needs pytest-benchmark")

import torch  # noqa: E402

from mdpo_kernels import dispatch, sequence_logprobs  # noqa: E402
from mdpo_kernels.reference import linear_sequence_logprobs_ref, sequence_logprobs_ref  # noqa: E402

try:
    from mdpo_kernels import linear_sequence_logprobs
except ImportError:  # older checkout: not yet exported at the top level
    from mdpo_kernels.linear_logprobs import linear_sequence_logprobs

pytestmark = pytest.mark.benchmark_group

IGNORE = -100
ROUNDS = 5
# fp32 tolerances, as tests/tolerances.py (value: per-row sums; grad: per-element gradients)
VALUE_TOL = dict(rtol=1e-5, atol=1e-4)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def _time(benchmark, fn):
    """A few rounds after one warm-up call: bounded time, whatever the machine."""
    return benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)


# ----------------------------------------------------------------------------------- sequence_logprobs
def _eager_logprobs(logits, labels):
    from benchmarks.logprobs import eager_logprobs

    return eager_logprobs(logits, labels)


@pytest.mark.parametrize("provider", ["native", "torch", "eager"])
def test_sequence_logprobs(benchmark, provider):
    benchmark.group = "sequence_logprobs R4×T128×V8000 fwd+bwd"
    if provider == "native" and dispatch._native_backend() is None:
        pytest.skip("C++ extension not built")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 128, 8000, generator=gen).requires_grad_()
    labels = torch.randint(0, 8000, (4, 128), generator=gen)
    labels[:, :32] = IGNORE
    upstream = torch.randn(4, generator=gen)
    if provider == "eager":
        op = _eager_logprobs
    else:
        def op(x, y):
            return sequence_logprobs(x, y, check_labels=False, impl=provider)

    expected = sequence_logprobs_ref(logits.detach(), labels)
    (expected_grad,) = torch.autograd.grad(sequence_logprobs_ref(logits, labels), logits, upstream)
    value = op(logits, labels)
    (grad,) = torch.autograd.grad(value, logits, upstream)
    torch.testing.assert_close(value.detach().float(), expected, **VALUE_TOL)
    torch.testing.assert_close(grad, expected_grad, **GRAD_TOL)

    _time(benchmark, lambda: torch.autograd.grad(op(logits, labels), logits, upstream))


# ---------------------------------------------------------------------------- linear_sequence_logprobs
@pytest.mark.parametrize("provider", ["ours", "naive"])
def test_linear_sequence_logprobs(benchmark, provider):
    benchmark.group = "linear_sequence_logprobs R4×T128 H256 V8000 fwd+bwd (hidden grad)"
    from benchmarks.linear_logprobs import naive

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 128, 256, generator=gen).requires_grad_()
    weight = torch.randn(8000, 256, generator=gen) / 16
    labels = torch.randint(0, 8000, (4, 128), generator=gen)
    labels[:, :32] = IGNORE
    upstream = torch.randn(4, generator=gen)
    if provider == "ours":
        def op(h, w, y):
            return linear_sequence_logprobs(h, w, y, check_labels=False)
    else:
        op = naive

    expected = linear_sequence_logprobs_ref(hidden.detach(), weight, labels)
    (expected_grad,) = torch.autograd.grad(linear_sequence_logprobs_ref(hidden, weight, labels), hidden, upstream)
    value = op(hidden, weight, labels)
    (grad,) = torch.autograd.grad(value, hidden, upstream)
    torch.testing.assert_close(value.detach().float(), expected, **VALUE_TOL)
    torch.testing.assert_close(grad, expected_grad, **GRAD_TOL)

    _time(benchmark, lambda: torch.autograd.grad(op(hidden, weight, labels), hidden, upstream))


# ---------------------------------------------------------------------------------------- train step
TINY_LLAVA = dict(
    hidden=128, intermediate=256, heads=4, kv_heads=4, vocab=1000,
    vision_hidden=64, vision_intermediate=128, vision_heads=4, patch=14,
    text_layers=2, vision_layers=1, image_size=56, pairs=2, prompt_tokens=8, response_tokens=16,
    finetune="lora", lora_r=8, lora_alpha=16, grad_ckpt=False,
)
CPU_FP32 = {"device": "cpu", "dtype": "float32"}


def test_reference_pass(benchmark):
    """The fused path and the full-logits path give the same log-probs; the step-0 loss is 3·ln 2.

    Timed: the reference pass that fills ours' cache (no grad, adapters off, fused head), per micro-batch.
    """
    benchmark.group = "reference pass tiny LLaVA (no grad, 3B rows)"
    from mdpo.loss import mdpo_loss
    from benchmarks import train_step as TS

    model, adapter = TS.get_model(TINY_LLAVA, CPU_FP32)
    batch = TS.make_batch(TINY_LLAVA, torch.device("cpu"), torch.float32)
    scorer, _ = TS.make_scorer(model, adapter)
    with torch.no_grad():
        fused = scorer(batch)
        full = TS.full_logits_logps(model(**TS.model_inputs(batch), use_cache=False).logits, batch["labels"])
        with TS.adapters_off(model):
            reference = scorer(batch)
    torch.testing.assert_close(fused, full, **VALUE_TOL)
    loss, _ = mdpo_loss(fused, reference)  # LoRA B starts at 0: policy = reference
    assert math.isclose(loss.item(), 3 * math.log(2), rel_tol=1e-5)

    def reference_pass():
        with torch.no_grad(), TS.adapters_off(model):
            scorer(batch)

    _time(benchmark, reference_pass)


@pytest.mark.parametrize("provider", ["ours", "paper", "trl-dpo"])
def test_train_step(benchmark, provider):
    benchmark.group = "train_step tiny LLaVA (H128, 2+1 layers, 2 pairs × T80, LoRA r8)"
    from benchmarks import train_step as TS

    step = TS.setup(provider, TINY_LLAVA, "step", CPU_FP32)
    model, _ = TS.get_model(TINY_LLAVA, CPU_FP32)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    before = [p.detach().clone() for p in lora_b]
    step()
    assert any(not torch.equal(b, p) for b, p in zip(before, lora_b)), "the step did not update the LoRA weights"
    assert all(p.grad is None for p in lora_b), "the step must leave no gradients behind"

    _time(benchmark, step)
