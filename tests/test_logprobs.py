"""`sequence_logprobs` (every backend) against the fp32 reference, plus errors and dispatch.

Backends: "triton" (interpreted on CPU), "torch" (chunked), and "native" when the C++ extension is
built (skipped otherwise, and on CUDA). Tolerances come from tests/tolerances.py.
"""
from __future__ import annotations

import pytest
import torch
from tolerances import assert_close_to_ref

from mdpo_kernels import dispatch, sequence_logprobs, sequence_logprobs_ref

IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["triton", "torch", "native"])
def impl(request, device):
    if request.param == "native":
        if device != "cpu":
            pytest.skip("the C++ backend is CPU-only")
        if dispatch._native_backend() is None:
            pytest.skip("C++ extension not built")
    return request.param


def make_inputs(shape, dtype, device, *, ignore_frac=0.25, scale=3.0):
    """Random logits (R, T, V) in `dtype` and HF labels (R, T) with a fraction set to IGNORE."""
    rows, positions, vocab = shape
    logits = (torch.randn(rows, positions, vocab) * scale).to(dtype).to(device)
    labels = torch.randint(0, vocab, (rows, positions))
    labels[torch.rand(rows, positions) < ignore_frac] = IGNORE
    return logits, labels.to(device)


def run_and_reference(x, labels, impl, **kwargs):
    """(out, grad, ref_out, ref_grad) for a random upstream gradient; `x` requires grad (leaf or view)."""
    out = sequence_logprobs(x, labels, impl=impl, **kwargs)
    upstream = torch.randn(out.shape, device=out.device)
    (grad,) = torch.autograd.grad(out, x, upstream)
    x_ref = x.detach().float().requires_grad_()
    ref = sequence_logprobs_ref(x_ref, labels, **{k: v for k, v in kwargs.items() if k in ("shift", "average", "ignore_index")})
    (ref_grad,) = torch.autograd.grad(ref, x_ref, upstream)
    return out, grad, ref, ref_grad


def check(x, labels, impl, **kwargs):
    out, grad, ref, ref_grad = run_and_reference(x, labels, impl, **kwargs)
    assert out.dtype == torch.float32 and out.shape == (x.shape[0],)
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert torch.isfinite(out).all() and torch.isfinite(grad.float()).all()
    assert_close_to_ref(out, ref, x.dtype, "value")
    assert_close_to_ref(grad, ref_grad, x.dtype, "grad")
    return out, grad


# ----------------------------------------------------------------------------------------- values, grads
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_odd_shape_matches_reference(impl, dtype, device):
    logits, labels = make_inputs((3, 47, 123), dtype, device)
    labels[2] = IGNORE  # a row with no supervised position
    out, grad = check(logits.requires_grad_(), labels, impl)
    assert out[2].item() == 0.0 and not grad[2].any()
    assert out[0].item() < 0


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("average", [False, True])
def test_shift_and_average(impl, shift, average, device):
    logits, labels = make_inputs((4, 9, 50), torch.float32, device)
    labels[3] = IGNORE
    out, _ = check(logits.requires_grad_(), labels, impl, shift=shift, average=average)
    assert out[3].item() == 0.0


def test_realistic_vocab_bf16(impl, device):
    logits, labels = make_inputs((2, 24, 32000), torch.bfloat16, device)
    labels[:, :8] = IGNORE  # a prompt
    check(logits.requires_grad_(), labels, impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vocab_above_64k_runs_several_blocks(impl, dtype, device, monkeypatch):
    vocab = 70000
    if impl == "triton":
        from mdpo_kernels import logprobs_triton

        monkeypatch.setattr(logprobs_triton, "FORCE_BLOCK_V", 16384)
        block, _ = logprobs_triton._block_and_warps(vocab, logprobs_triton.FORWARD_MAX_BLOCK_V)
        assert -(-vocab // block) == 5  # the online log-sum-exp really rescales across blocks
    logits, labels = make_inputs((2, 4, vocab), dtype, device, ignore_frac=0.0)
    # Large offsets and the maximum in the last, partial block: the running max must be rescaled.
    logits = (logits.float() + 500.0).to(dtype)
    logits[:, :, vocab - 3] += 40
    labels[0, 1], labels[1, 2] = vocab - 1, vocab - 3
    check(logits.requires_grad_(), labels, impl)


def test_all_rows_ignored(impl, device):
    logits, labels = make_inputs((3, 6, 40), torch.float32, device)
    labels.fill_(IGNORE)
    x = logits.requires_grad_()
    for average in (False, True):
        out = sequence_logprobs(x, labels, average=average, impl=impl)
        (grad,) = torch.autograd.grad(out, x, torch.randn(3, device=device))
        assert torch.equal(out, torch.zeros(3, device=device))
        assert torch.equal(grad, torch.zeros_like(grad))


# ----------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("layout", ["rows", "positions", "transposed", "padded_vocab"])
def test_non_contiguous_inputs(impl, layout, device):
    rows, positions, vocab = 3, 10, 77
    base = (torch.randn(2 * positions, 2 * positions, vocab + 9) * 3).to(device).requires_grad_()
    select = {
        "rows": lambda b: b[: 2 * rows : 2, :positions, :vocab],  # strided rows: logits[::2]
        "positions": lambda b: b[:rows, ::2, :vocab],  # strided positions
        "transposed": lambda b: b[:positions, :rows, :vocab].transpose(0, 1),  # stride(0) < stride(1)
        "padded_vocab": lambda b: b[:rows, :positions, :vocab],  # stride(-2) = V + 9, stride(-1) = 1
    }[layout]
    x = select(base)
    assert x.shape == (rows, positions, vocab) and not x.is_contiguous() and x.stride(-1) == 1
    labels_base = torch.randint(0, vocab, (2 * rows, positions), device=device)
    labels = labels_base[::2]  # non-contiguous labels too
    labels[0, 3] = IGNORE
    check(x, labels, impl)


# ----------------------------------------------------------------------------------------- in place
@pytest.mark.parametrize("strided", [False, True])
def test_inplace_backward_writes_gradient_into_logits(impl, strided, device):
    logits, labels = make_inputs((6 if strided else 3, 11, 90), torch.float32, device)
    labels = labels[::2] if strided else labels
    labels[1] = IGNORE
    buffer = logits.clone()
    x = (buffer[::2] if strided else buffer).requires_grad_()  # strided: every other row of the buffer
    out = sequence_logprobs(x, labels, impl=impl, inplace_backward=True)
    upstream = torch.randn(3, device=device)
    (grad,) = torch.autograd.grad(out, x, upstream)
    x_ref = (logits[::2] if strided else logits).clone().requires_grad_()
    (ref_grad,) = torch.autograd.grad(sequence_logprobs_ref(x_ref, labels), x_ref, upstream)
    assert_close_to_ref(grad, ref_grad, torch.float32, "grad")
    assert grad.data_ptr() == x.data_ptr()  # no new (R, T, V) buffer
    assert torch.equal(x.detach(), grad)  # ignored positions (row 1, last column) were zeroed too
    assert not x.detach()[1].any() and not x.detach()[:, -1].any()
    if strided:  # the rows in between are not touched
        assert torch.equal(buffer[1::2], logits[1::2])


def test_default_backward_leaves_logits_untouched(impl, device):
    logits, labels = make_inputs((2, 8, 60), torch.bfloat16, device)
    x = logits.clone().requires_grad_()
    out = sequence_logprobs(x, labels, impl=impl)
    (grad,) = torch.autograd.grad(out, x, torch.randn(2, device=device))
    assert grad.data_ptr() != x.data_ptr()
    assert torch.equal(x.detach(), logits)


# ----------------------------------------------------------------------------------------- determinism, no_grad
def test_deterministic(impl, device):
    logits, labels = make_inputs((3, 20, 1000), torch.bfloat16, device)
    upstream = torch.randn(3, device=device)
    results = []
    for _ in range(2):
        x = logits.clone().requires_grad_()
        out = sequence_logprobs(x, labels, impl=impl)
        (grad,) = torch.autograd.grad(out, x, upstream)
        results.append((out, grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_no_grad_saves_nothing(impl, device):
    logits, labels = make_inputs((2, 5, 30), torch.float32, device)
    x = logits.requires_grad_()
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.no_grad():
            out = sequence_logprobs(x, labels, impl=impl)
        assert out.grad_fn is None and not out.requires_grad and packed == []
        out_detached = sequence_logprobs(logits.detach(), labels, impl=impl)
        assert out_detached.grad_fn is None and packed == []
        with_grad = sequence_logprobs(x, labels, impl=impl)
    assert with_grad.grad_fn is not None and len(packed) > 0  # the hook does see saves when they happen
    torch.testing.assert_close(out, with_grad.detach(), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- errors
def test_label_out_of_range_names_row_and_position(impl, device):
    logits, labels = make_inputs((3, 7, 50), torch.float32, device, ignore_frac=0.0)
    bad = labels.clone()
    bad[1, 5] = 50
    with pytest.raises(ValueError, match=r"labels\[1, 5\] = 50"):
        sequence_logprobs(logits, bad, impl=impl)
    bad = labels.clone()
    bad[2, 3] = -7  # negative and not ignore_index
    with pytest.raises(ValueError, match=r"labels\[2, 3\] = -7"):
        sequence_logprobs(logits, bad, impl=impl, shift=False)
    first_column = labels.clone()
    first_column[0, 0] = 10_000  # never a target with shift=True: not an error
    assert torch.isfinite(sequence_logprobs(logits, first_column, impl=impl)).all()


def test_check_labels_false_skips_the_check(impl, device):
    logits, labels = make_inputs((2, 6, 40), torch.float32, device, ignore_frac=0.0)
    labels[1, 2] = -3
    try:
        out = sequence_logprobs(logits, labels, impl=impl, check_labels=False)
    except ValueError as err:  # a backend may still refuse the index itself, but not via the range check
        assert "outside the vocabulary" not in str(err)
        return
    except (IndexError, RuntimeError):
        return
    if impl == "triton":  # documented: the bad row reads NaN, nothing is loaded out of bounds
        assert torch.isnan(out[1]) and torch.isfinite(out[0])


def test_shape_dtype_device_errors(device):
    logits, labels = make_inputs((2, 5, 30), torch.float32, device)
    with pytest.raises(ValueError, match="labels shape"):
        sequence_logprobs(logits, labels[:, :4])
    with pytest.raises(ValueError, match="3-D"):
        sequence_logprobs(logits[0], labels)
    with pytest.raises(ValueError, match="2-D"):
        sequence_logprobs(logits, labels[0])
    with pytest.raises(TypeError, match="logits must be float32, bfloat16 or float16"):
        sequence_logprobs(logits.to(torch.int32), labels)
    with pytest.raises(TypeError, match="logits must be float32, bfloat16 or float16"):
        sequence_logprobs(logits.double(), labels)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        sequence_logprobs(logits, labels.float())
    with pytest.raises(ValueError, match="labels are on meta"):
        sequence_logprobs(logits, labels.to("meta"))


def test_bad_impl_name_and_env(device, monkeypatch):
    logits, labels = make_inputs((2, 5, 30), torch.float32, device)
    with pytest.raises(ValueError, match=r"impl='fastest'"):
        sequence_logprobs(logits, labels, impl="fastest")
    monkeypatch.setenv(dispatch.ENV_IMPL, "fastest")
    with pytest.raises(ValueError, match=dispatch.ENV_IMPL):
        sequence_logprobs(logits, labels)
    assert torch.isfinite(sequence_logprobs(logits, labels, impl="torch")).all()  # the argument wins


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from mdpo_kernels import logprobs_triton

    monkeypatch.setattr(logprobs_triton, "INTERPRETING", False)
    logits, labels = make_inputs((1, 3, 10), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        sequence_logprobs(logits, labels, impl="triton")


# ----------------------------------------------------------------------------------------- dispatch
def test_dispatch_resolution(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_IMPL, raising=False)
    expected_cpu = "native" if dispatch._native_backend() is not None else "torch"
    assert dispatch.resolve_impl(torch.device("cpu")) == expected_cpu
    assert dispatch.resolve_impl(torch.device("cuda")) == "triton"  # resolution only, nothing launched
    monkeypatch.setenv(dispatch.ENV_IMPL, "torch")
    assert dispatch.resolve_impl(torch.device("cuda")) == "torch"
    assert dispatch.resolve_impl(torch.device("cpu"), "triton") == "triton"  # impl= beats the variable
    assert dispatch.backend("triton").__name__ == "mdpo_kernels.logprobs_triton"
    assert dispatch.backend("torch").__name__ == "mdpo_kernels.logprobs_torch"


def test_env_var_selects_backend(monkeypatch, device):
    from mdpo_kernels import logprobs_triton

    calls = []
    original = logprobs_triton.forward
    monkeypatch.setattr(logprobs_triton, "forward", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setenv(dispatch.ENV_IMPL, "triton")
    logits, labels = make_inputs((2, 5, 30), torch.float32, device)
    sequence_logprobs(logits, labels)
    assert calls == [1]
    sequence_logprobs(logits, labels, impl="torch")
    assert calls == [1]
