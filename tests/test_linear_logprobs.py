"""linear_sequence_logprobs against the fp32 reference: values, gradients, chunking, precision, memory."""
import importlib

import pytest
import torch
from tolerances import assert_close_to_ref

from mdpo_kernels import dispatch
from mdpo_kernels.linear_logprobs import CHUNK_BYTES, chunk_tokens_for, linear_sequence_logprobs
from mdpo_kernels.logprobs import sequence_logprobs
from mdpo_kernels.reference import linear_sequence_logprobs_ref

F32 = torch.float32  # storage dtype of most tests; tolerances come from tests/tolerances.py


def _available_impls():
    impls = ["torch"]
    if dispatch._native_backend() is not None:
        impls.append("native")
    try:
        importlib.import_module("mdpo_kernels.logprobs_triton")
        impls.append("triton")
    except ImportError:
        pass
    return impls


def _inputs(R, T, H, V, device, dtype=torch.float32, bias=True, ignore_first=0):
    hidden = torch.randn(R, T, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) / H**0.5).to(dtype)
    b = torch.randn(V, device=device).to(dtype) if bias else None
    labels = torch.randint(0, V, (R, T), device=device)
    labels[:, :ignore_first] = -100
    return hidden, weight, b, labels


def _run(fn, hidden, weight, bias, labels, grads, upstream, **kw):
    """Value and gradients of `fn` for the leaves named in `grads` ("hidden", "weight", "bias")."""
    leaves = {"hidden": hidden, "weight": weight, "bias": bias}
    leaves = {k: (v.detach().clone().requires_grad_(k in grads) if v is not None else None) for k, v in leaves.items()}
    out = fn(leaves["hidden"], leaves["weight"], labels, bias=leaves["bias"], **kw)
    if grads:
        (out * upstream).sum().backward()
    return out.detach(), {k: leaves[k].grad for k in grads}


def _ref(hidden, weight, bias, labels, grads, upstream, **kw):
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    return _run(linear_sequence_logprobs_ref, f32(hidden), f32(weight), f32(bias), labels, grads, upstream, **kw)


@pytest.mark.parametrize("impl", _available_impls())
@pytest.mark.parametrize("grads", [("hidden",), ("hidden", "weight", "bias"), ("weight",)])
@pytest.mark.parametrize("chunk_tokens", [None, 7, 1])
def test_values_and_gradients_fp32(device, impl, grads, chunk_tokens):
    R, T, H, V = 3, 47, 16, 123  # N = 3·46 − 2·11 = 116 supervised tokens: 7 does not divide it
    hidden, weight, bias, labels = _inputs(R, T, H, V, device, ignore_first=12)
    labels[2, 30:40] = -100  # a hole in the middle of a row
    upstream = torch.randn(R, device=device)
    out, got = _run(linear_sequence_logprobs, hidden, weight, bias, labels, grads, upstream, impl=impl, chunk_tokens=chunk_tokens)
    ref, want = _ref(hidden, weight, bias, labels, grads, upstream)
    assert_close_to_ref(out, ref, F32)
    for name in grads:
        assert_close_to_ref(got[name], want[name], F32, kind="grad", msg=f"grad {name}")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("average", [False, True])
def test_without_bias_and_average(device, bias, average):
    hidden, weight, b, labels = _inputs(4, 20, 12, 97, device, bias=bias, ignore_first=5)
    labels[1, 15:] = -100
    upstream = torch.randn(4, device=device)
    grads = ("hidden", "weight") + (("bias",) if bias else ())
    out, got = _run(linear_sequence_logprobs, hidden, weight, b, labels, grads, upstream, average=average, chunk_tokens=9)
    ref, want = _ref(hidden, weight, b, labels, grads, upstream, average=average)
    assert_close_to_ref(out, ref, F32)
    for name in grads:
        assert_close_to_ref(got[name], want[name], F32, kind="grad", msg=f"grad {name}")


def test_same_value_as_sequence_logprobs_on_full_logits(device):
    hidden, weight, bias, labels = _inputs(2, 33, 8, 70, device, ignore_first=10)
    logits = hidden @ weight.t() + bias
    assert_close_to_ref(linear_sequence_logprobs(hidden, weight, labels, bias=bias), sequence_logprobs(logits, labels), F32)


def test_large_vocab(device):
    hidden, weight, bias, labels = _inputs(2, 9, 16, 70000, device)
    labels[0, 4] = 69999  # the last vocabulary entry
    grads = ("hidden", "weight", "bias")
    upstream = torch.randn(2, device=device)
    out, got = _run(linear_sequence_logprobs, hidden, weight, bias, labels, grads, upstream, chunk_tokens=5)
    ref, want = _ref(hidden, weight, bias, labels, grads, upstream)
    assert_close_to_ref(out, ref, F32)
    for name in grads:
        assert_close_to_ref(got[name], want[name], F32, kind="grad", msg=f"grad {name}")


@pytest.mark.parametrize("grads", [("hidden",), ("hidden", "weight", "bias")])
def test_ignored_rows_and_full_rows(device, grads):
    hidden, weight, bias, labels = _inputs(4, 15, 8, 41, device)
    labels[0] = -100  # nothing supervised: value 0, zero gradient
    labels[2, ::2] = -100  # every other
    # rows 1 and 3: every position supervised
    upstream = torch.randn(4, device=device)
    out, got = _run(linear_sequence_logprobs, hidden, weight, bias, labels, grads, upstream, chunk_tokens=4)
    ref, want = _ref(hidden, weight, bias, labels, grads, upstream)
    assert out[0] == 0
    assert_close_to_ref(out, ref, F32)
    assert torch.count_nonzero(got["hidden"][0]) == 0
    assert torch.count_nonzero(got["hidden"][:, -1]) == 0  # the last position has no target after the shift
    for name in grads:
        assert_close_to_ref(got[name], want[name], F32, kind="grad", msg=f"grad {name}")


@pytest.mark.parametrize("grads", [(), ("hidden",), ("hidden", "weight", "bias")])
def test_everything_ignored(device, grads):
    hidden, weight, bias, labels = _inputs(2, 6, 8, 30, device)
    labels.fill_(-100)
    out, got = _run(linear_sequence_logprobs, hidden, weight, bias, labels, grads, torch.ones(2, device=device))
    assert torch.equal(out, torch.zeros(2, device=device))
    for g in got.values():
        assert torch.count_nonzero(g) == 0


def test_shift_false_and_strided_hidden(device):
    base, weight, bias, labels = _inputs(3, 24, 10, 50, device, ignore_first=3)
    hidden = base[:, ::2]  # non-contiguous positions
    labels = labels[:, :12]
    for shift in (False, True):
        assert_close_to_ref(
            linear_sequence_logprobs(hidden, weight, labels, bias=bias, shift=shift, chunk_tokens=5),
            linear_sequence_logprobs_ref(hidden, weight, labels, bias=bias, shift=shift),
            F32,
        )


def test_reference_impl_and_retain_graph(device):
    hidden, weight, bias, labels = _inputs(2, 12, 8, 40, device, ignore_first=2)
    torch.testing.assert_close(
        linear_sequence_logprobs(hidden, weight, labels, bias=bias, impl="reference"),
        linear_sequence_logprobs_ref(hidden, weight, labels, bias=bias),
    )
    for chunk_tokens in (None, 3):  # one chunk (D kept from the forward) and several (recomputed)
        w = weight.clone().requires_grad_()
        out = linear_sequence_logprobs(hidden, w, labels, bias=bias, chunk_tokens=chunk_tokens)
        out.sum().backward(retain_graph=True)
        first = w.grad.clone()
        w.grad = None
        out.sum().backward()
        torch.testing.assert_close(w.grad, first, atol=0, rtol=0)


def _assert_no_worse_than_plain_torch(device, dtype, grads):
    """Cut Cross-Entropy's rule: |ours − fp32| ≤ |plain same-dtype torch − fp32| + a small margin.

    3 rows × 40 positions, 90 supervised tokens in chunks of 31; H 64, V 300.
    """
    hidden, weight, bias, labels = _inputs(3, 40, 64, 300, device, dtype=dtype, ignore_first=10)
    hidden = hidden * 2  # logits of a few units: bf16 rounding of the logits matters
    upstream = torch.randn(3, device=device)
    ref, want = _ref(hidden, weight, bias, labels, grads, upstream)
    ours, got = _run(linear_sequence_logprobs, hidden, weight, bias, labels, grads, upstream, chunk_tokens=31)
    torch_out, torch_got = _run(_plain_torch, hidden, weight, bias, labels, grads, upstream)
    err = lambda a, b: (a.float() - b.float()).abs().max().item()  # noqa: E731
    assert err(ours, ref) <= err(torch_out, ref) + 1e-4 * ref.abs().max().item()
    for name in grads:
        scale = want[name].abs().max().item()
        assert got[name].dtype == dtype
        assert err(got[name], want[name]) <= err(torch_got[name], want[name]) + 2e-3 * scale, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grads", [("hidden",), ("hidden", "weight", "bias")])
def test_low_precision_no_worse_than_plain_torch(device, monkeypatch, dtype, grads):
    from mdpo_kernels import linear_logprobs

    monkeypatch.setattr(linear_logprobs, "WEIGHT_BLOCK_BYTES", 4 * 64 * 70)  # CPU block-cast path: 5 blocks of ≤ 70 rows
    _assert_no_worse_than_plain_torch(device, dtype, grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grads", [("hidden",), ("hidden", "weight", "bias"), ("weight",)])
def test_cuda_out_dtype_path_emulated_on_cpu(device, monkeypatch, dtype, grads):
    """The CUDA low-precision path (bf16/fp16 GEMMs with fp32 output, D cast down, the weight gradient in
    row blocks) run on the CPU with an emulated `torch.mm(out_dtype=float32)`: same rule as above."""
    if device != "cpu":
        pytest.skip("on a GPU the test above runs this path for real")
    from mdpo_kernels import linear_logprobs

    calls = []

    def mm_out_fp32(a, b, out=None):  # cuBLAS: low-precision operands, fp32 accumulation and output
        assert a.dtype == b.dtype == dtype, (a.dtype, b.dtype)
        calls.append((tuple(a.shape), tuple(b.shape)))
        return torch.mm(a.float(), b.float(), out=out)

    monkeypatch.setattr(linear_logprobs, "_head_mode", lambda weight: "out_dtype" if weight.dtype == dtype else "fp32")
    monkeypatch.setattr(linear_logprobs, "_mm_out_fp32", mm_out_fp32)
    monkeypatch.setattr(linear_logprobs, "WEIGHT_BLOCK_BYTES", 4 * 64 * 70)  # weight gradient in 5 blocks of ≤ 70 rows
    _assert_no_worse_than_plain_torch(device, dtype, grads)
    # Every GEMM took the emulated path: 90 supervised tokens in 3 chunks (31, 31, 28). Frozen head:
    # projection + D W per chunk (6). Trained: 3 projections, 2 recomputed (the last chunk is kept),
    # the weight gradient in 5 row blocks per chunk (15), and D W per chunk when hidden needs it (3).
    expected = {("hidden",): 6, ("hidden", "weight", "bias"): 23, ("weight",): 20}[grads]
    assert len(calls) == expected, calls


def _plain_torch(hidden, weight, labels, bias=None):
    """What a user writes: the matmul in the storage dtype, then log-softmax in fp32."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logp = logits.float().log_softmax(-1)[:, :-1]
    target = labels[:, 1:]
    mask = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


class _SavedCounter:
    def __init__(self):
        self.shapes = []

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def _pack(self, t):
        self.shapes.append(tuple(t.shape))
        return t

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def test_nothing_saved_under_no_grad(device):
    hidden, weight, bias, labels = _inputs(2, 30, 8, 60, device, ignore_first=4)
    for t in (hidden, weight, bias):
        t.requires_grad_()
    with _SavedCounter() as saved, torch.no_grad():
        out = linear_sequence_logprobs(hidden, weight, labels, bias=bias, chunk_tokens=5)
    assert saved.shapes == [] and out.grad_fn is None
    with _SavedCounter() as saved:  # the counter does see what the grad-mode call keeps
        out = linear_sequence_logprobs(hidden, weight, labels, bias=bias, chunk_tokens=5)
    assert saved.shapes and out.grad_fn is not None


@pytest.mark.parametrize("trained_head", [False, True])
def test_keeps_at_most_one_chunk_for_the_backward(device, trained_head):
    R, T, H, V = 2, 30, 8, 60
    hidden, weight, bias, labels = _inputs(R, T, H, V, device)
    hidden.requires_grad_()
    weight.requires_grad_(trained_head)
    n_tokens = R * (T - 1)  # 58 = 11 chunks of 5 + one of 3
    for chunk_tokens, last_chunk in ((5, 3), (n_tokens, n_tokens)):
        with _SavedCounter() as saved:
            out = linear_sequence_logprobs(hidden, weight, labels, chunk_tokens=chunk_tokens)
        assert not [s for s in saved.shapes if len(s) == 2 and s[1] == V and s != (V, H)]  # no logits saved
        if trained_head:  # the last chunk's D stays on the node until the backward has used it
            assert tuple(out.grad_fn.kept[1].shape) == (last_chunk, V)
            out.sum().backward()
            assert out.grad_fn.kept is None
        else:
            assert saved.shapes == [(n_tokens, H)]  # frozen head: only D·W per token


@pytest.mark.parametrize("grads, chunk_tokens, projections", [
    ((), 5, 6),  # no grad: one projection per chunk (29 tokens → 6 chunks)
    (("hidden",), 5, 6),  # frozen head: D·W formed in the forward, nothing recomputed
    (("hidden", "weight"), 5, 11),  # trained head: recompute every chunk but the kept last one
    (("hidden", "weight"), None, 1),  # trained head, one chunk: kept, no recompute
])
def test_projection_count(device, monkeypatch, grads, chunk_tokens, projections):
    """The GEMM budget of the module doc: how often the logits of a chunk are formed."""
    from mdpo_kernels import linear_logprobs

    calls = []
    original = linear_logprobs._Head.project
    monkeypatch.setattr(linear_logprobs._Head, "project", lambda self, h, out: calls.append(h.shape[0]) or original(self, h, out))
    hidden, weight, bias, labels = _inputs(1, 30, 8, 40, device)
    _run(linear_sequence_logprobs, hidden, weight, bias, labels, grads, torch.ones(1, device=device), chunk_tokens=chunk_tokens)
    assert len(calls) == projections


def test_chunk_size_arithmetic():
    cpu = torch.device("cpu")
    assert chunk_tokens_for(10_000, 32000, cpu, torch.float32) <= CHUNK_BYTES // (4 * 32000)
    assert chunk_tokens_for(10_000, 32000, cpu, torch.float32, budget_bytes=4 * 32000 * 100) == 100
    assert chunk_tokens_for(250, 32000, cpu, torch.float32, budget_bytes=4 * 32000 * 100) == 84  # 3 equal chunks
    assert chunk_tokens_for(50, 10**9, cpu, torch.float32) == 13  # floor of 16 tokens → 4 chunks of 13
    assert chunk_tokens_for(0, 32000, cpu, torch.float32) == 0
    assert chunk_tokens_for(768, 51200, cpu, torch.float32, budget_bytes=128 * 2**20) == 384  # 655 → 2 chunks
    cuda = torch.device("cuda")  # arithmetic only: nothing is allocated
    assert chunk_tokens_for(10_000, 1000, cuda, torch.bfloat16, budget_bytes=6 * 1000 * 100) == 100  # fp32 + bf16 copy of D


def test_bad_input_errors(device):
    hidden, weight, bias, labels = _inputs(2, 6, 8, 30, device)
    with pytest.raises(ValueError, match=r"labels\[1, 3\] = 30 is outside"):
        bad = labels.clone()
        bad[1, 3] = 30
        linear_sequence_logprobs(hidden, weight, bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bad = labels.clone()
        bad[0, 2] = -5
        linear_sequence_logprobs(hidden, weight, bad)
    with pytest.raises(ValueError, match="hidden must be a 3-D"):
        linear_sequence_logprobs(hidden[0], weight, labels)
    with pytest.raises(ValueError, match="weight shape"):
        linear_sequence_logprobs(hidden, weight[:, :5], labels)
    with pytest.raises(ValueError, match="labels shape"):
        linear_sequence_logprobs(hidden, weight, labels[:, :4])
    with pytest.raises(ValueError, match="bias must be a 1-D tensor of size V = 30"):
        linear_sequence_logprobs(hidden, weight, labels, bias=bias[:29])
    with pytest.raises(TypeError, match="weight dtype"):
        linear_sequence_logprobs(hidden, weight.double(), labels)
    with pytest.raises(TypeError, match="bias dtype"):
        linear_sequence_logprobs(hidden, weight, labels, bias=bias.half())
    with pytest.raises(TypeError, match="labels must be an integer"):
        linear_sequence_logprobs(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="weight is on meta"):
        linear_sequence_logprobs(hidden, weight.to("meta"), labels)
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_sequence_logprobs(hidden, weight, labels, chunk_tokens=0)
