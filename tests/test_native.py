"""The C++ CPU extension (torch.ops.mdpo.*, csrc/) against the fp32 reference, and its loader.

Kernel tests skip when the extension is not built — unless MDPO_REQUIRE_NATIVE=1 (CI), where a
missing extension fails them. The loader tests (fallback warning, hard error) run either way, in
subprocesses with MDPO_DISABLE_NATIVE=1 standing in for a missing build. Every instruction set the
machine and the build allow (avx512 / avx2 / default) is tested, through `_C._set_kernel_isa`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tolerances import assert_close_to_ref

from mdpo_kernels import dispatch, native_loader, sequence_logprobs, sequence_logprobs_ref

IGNORE = -100
REQUIRED = native_loader._flag(native_loader.ENV_REQUIRE)
EXT = native_loader._try_import()
needs_native = pytest.mark.skipif(
    EXT is None and not REQUIRED, reason=f"C++ extension not built: {native_loader.load_error()}"
)
ISAS = ["default", "avx2", "avx512"]
if EXT is not None:
    ISAS = ISAS[: ISAS.index(EXT.kernel_isa()) + 1]


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test with the kernels of one instruction set (all up to the best this CPU allows)."""
    native = native_loader.load()  # fails here when the extension is required but missing
    if native is None:
        pytest.skip("C++ extension not built")
    native._set_kernel_isa(request.param)
    yield request.param
    native._set_kernel_isa(None)


def ops():
    from mdpo_kernels import logprobs_native

    assert logprobs_native.is_available()
    return logprobs_native


def make_case(shape, dtype, *, ignore_frac=0.25, scale=3.0, seed=0):
    """Logits (R, T, V) in `dtype` and aligned int64 targets (R, T) with some positions ignored."""
    gen = torch.Generator().manual_seed(seed)
    rows, positions, vocab = shape
    logits = (torch.randn(rows, positions, vocab, generator=gen) * scale).to(dtype)
    target = torch.randint(0, vocab, (rows, positions), generator=gen)
    target[torch.rand(rows, positions, generator=gen) < ignore_frac] = IGNORE
    return logits, target


def reference(logits, target, upstream):
    """fp32 reference sums and their gradient for the upstream gradient `upstream` (R,)."""
    x = logits.detach().float().requires_grad_()
    out = sequence_logprobs_ref(x, target, ignore_index=IGNORE, shift=False)
    (grad,) = torch.autograd.grad(out, x, upstream)
    return out, grad


def check_against_reference(logits, target, *, inplace=False):
    """Run forward + backward of the native ops and compare with the reference; returns (out, grad)."""
    native = ops()
    upstream = torch.randn(logits.shape[0])
    ref_out, ref_grad = reference(logits, target, upstream)
    out, lse = native.forward(logits, target, IGNORE)
    mask = target != IGNORE
    ref_lse = torch.logsumexp(logits.float(), -1)
    assert_close_to_ref(lse[mask], ref_lse[mask], torch.float32, "value")
    assert not lse[~mask].any()
    grad = native.backward(upstream, logits, target, lse, IGNORE, inplace)
    assert out.dtype == torch.float32 and out.shape == (logits.shape[0],)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    assert_close_to_ref(out, ref_out, logits.dtype, "value")
    assert_close_to_ref(grad, ref_grad, logits.dtype, "grad")
    return out, grad


# ------------------------------------------------------------------------------------ loading / build
def test_extension_loads_when_required():
    """With MDPO_REQUIRE_NATIVE=1 (CI) a missing extension fails here, naming why."""
    if not REQUIRED and EXT is None:
        pytest.skip(f"C++ extension not built and {native_loader.ENV_REQUIRE} not set")
    native = native_loader.load()
    assert native is not None and native.kernel_isa() in ("default", "avx2", "avx512")
    assert dispatch.resolve_impl(torch.device("cpu")) == "native" or os.environ.get(dispatch.ENV_IMPL)


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    full_env.pop(dispatch.ENV_IMPL, None)
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=full_env, timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


def test_missing_extension_warns_once_and_falls_back():
    result = _run_python(
        """
        import torch
        from mdpo_kernels import dispatch, sequence_logprobs, sequence_logprobs_ref
        logits, labels = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
        for _ in range(3):
            out = sequence_logprobs(logits, labels)
        torch.testing.assert_close(out, sequence_logprobs_ref(logits, labels))
        assert dispatch.resolve_impl(torch.device("cpu")) == "torch"
        try:
            sequence_logprobs(logits, labels, impl="native")
        except RuntimeError as exc:
            print("IMPL_NATIVE_ERROR:", exc)
        """,
        MDPO_DISABLE_NATIVE="1", MDPO_REQUIRE_NATIVE="0",
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("mdpo_kernels._C is NOT available") == 1, result.stderr
    assert "MDPO_REQUIRE_NATIVE=1" in result.stderr  # tells how to make it an error
    assert "IMPL_NATIVE_ERROR:" in result.stdout and "disabled by MDPO_DISABLE_NATIVE=1" in result.stdout


def test_missing_extension_is_an_error_when_required():
    result = _run_python(
        """
        import torch
        from mdpo_kernels import sequence_logprobs
        sequence_logprobs(torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6)))
        print("RAN")
        """,
        MDPO_DISABLE_NATIVE="1", MDPO_REQUIRE_NATIVE="1",
    )
    assert result.returncode != 0 and "RAN" not in result.stdout
    assert "RuntimeError" in result.stderr and "MDPO_REQUIRE_NATIVE=1" in result.stderr
    assert "disabled by MDPO_DISABLE_NATIVE=1" in result.stderr  # the kept load error


# ------------------------------------------------------------------------------------ values, gradients
@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_odd_shape_matches_reference(isa, dtype):
    logits, target = make_case((3, 47, 123), dtype)
    target[2] = IGNORE  # a row with no supervised position
    out, grad = check_against_reference(logits, target)
    assert out[2].item() == 0.0 and not grad[2].any()
    assert not grad[target == IGNORE].any()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vocab_70000_several_blocks_and_a_tail(isa, dtype):
    # 70000 = 34 blocks of 2048 + 368; 368 is not a multiple of the 16/32-element step either.
    logits, target = make_case((2, 5, 70000), dtype, ignore_frac=0.2)
    logits[0, 0, 69999] = 40.0  # the maximum in the tail, after 34 blocks: rescales the running sum
    target[0, 0] = 69999
    check_against_reference(logits, target)


@needs_native
def test_all_positions_ignored_and_empty_shapes(isa):
    native = ops()
    logits, target = make_case((2, 4, 9), torch.float32)
    target.fill_(IGNORE)
    out, lse = native.forward(logits, target, IGNORE)
    assert not out.any() and not lse.any()
    grad = native.backward(torch.randn(2), logits, target, lse, IGNORE, False)
    assert not grad.any()
    empty = torch.randn(2, 0, 9)
    out, lse = native.forward(empty, torch.zeros(2, 0, dtype=torch.long), IGNORE)
    assert out.shape == (2,) and not out.any() and lse.shape == (2, 0)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_rows_positions_and_vocab_slice(isa, dtype):
    # Every other position of a (T, R, V + 5) buffer, transposed: no dimension but V is contiguous,
    # and rows do not start V elements apart.
    base, _ = make_case((2 * 9, 3, 205 + 5), dtype)
    logits = base[::2].transpose(0, 1)[:, :, :205]
    _, target = make_case((3, 9, 205), dtype, seed=1)
    assert not logits.is_contiguous() and logits.stride(-1) == 1
    check_against_reference(logits, target)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_writes_only_its_view(isa, dtype):
    native = ops()
    base, _ = make_case((3, 2 * 7, 64), dtype)
    logits = base[:, ::2]  # strided view: in place must write these rows and nothing else
    _, target = make_case((3, 7, 64), dtype, seed=2)
    untouched = base[:, 1::2].clone()
    upstream = torch.randn(3)
    out, lse = native.forward(logits, target, IGNORE)
    expected = native.backward(upstream, logits, target, lse, IGNORE, False)
    returned = native.backward(upstream, logits, target, lse, IGNORE, True)
    assert returned is logits
    assert torch.equal(logits, expected)  # same kernel, same bits
    assert torch.equal(base[:, 1::2], untouched)
    with pytest.raises(RuntimeError, match="overlap"):
        native.backward(upstream, torch.randn(1, 64).expand(3, 7, 64), target, lse, IGNORE, True)


@needs_native
def test_inf_and_nan_logits_follow_the_reference(isa):
    logits, target = make_case((3, 5, 300), torch.float32, ignore_frac=0.0)
    logits[:, :, 100:180] = float("-inf")  # a masked part of the vocabulary, never a target
    target = target % 100
    target[:, 0] = 5
    logits[0, 0, 5] = float("-inf")  # the target itself masked: log-prob −inf
    logits[2, 3, 250] = float("nan")
    native = ops()
    out, _ = native.forward(logits, target, IGNORE)
    ref = sequence_logprobs_ref(logits, target, ignore_index=IGNORE, shift=False)
    assert out[0].item() == float("-inf") and torch.isnan(out[2]) and torch.isnan(ref[2])
    assert_close_to_ref(out[1:2], ref[1:2], torch.float32, "value")
    out, grad = check_against_reference(logits[1:2], target[1:2])
    assert torch.isfinite(out).all() and not grad[..., 100:180].any()


@needs_native
def test_sums_are_deterministic_across_thread_counts():
    native = ops()
    logits, target = make_case((4, 64, 3000), torch.float32)
    upstream = torch.randn(4)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            out, lse = native.forward(logits, target, IGNORE)
            results.append((out, native.backward(upstream, logits, target, lse, IGNORE, False)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@needs_native
def test_public_api_picks_native_by_default(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_IMPL, raising=False)
    assert dispatch.resolve_impl(torch.device("cpu")) == "native"
    logits, labels = make_case((2, 8, 40), torch.bfloat16)
    x = logits.requires_grad_()
    upstream = torch.randn(2)
    (grad,) = torch.autograd.grad(sequence_logprobs(x, labels), x, upstream)
    x_ref = logits.detach().float().requires_grad_()
    (ref_grad,) = torch.autograd.grad(sequence_logprobs_ref(x_ref, labels), x_ref, upstream)
    assert_close_to_ref(grad, ref_grad, torch.bfloat16, "grad")


# ------------------------------------------------------------------------------------ errors, operators
@needs_native
def test_bad_arguments_are_named():
    native = ops()
    logits, target = make_case((2, 4, 9), torch.float32, ignore_frac=0.0)
    target[1, 3] = 9
    with pytest.raises(RuntimeError, match=r"target\[1, 3\] = 9 is outside the vocabulary \[0, 9\)"):
        native.forward(logits, target, IGNORE)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        native.forward(logits.double(), target.clamp(max=8), IGNORE)
    with pytest.raises(RuntimeError, match="target must be int64"):
        native.forward(logits, target.int().clamp(max=8), IGNORE)
    with pytest.raises(RuntimeError, match=r"lse must have shape \(R, T\)"):
        native.backward(torch.ones(2), logits, target.clamp(max=8), torch.zeros(2, 3), IGNORE, False)


@needs_native
@pytest.mark.parametrize("op_name", ["logprobs_forward", "logprobs_backward", "logprobs_backward_"])
def test_opcheck(op_name):
    ops()  # registers the fakes
    op = getattr(torch.ops.mdpo, op_name)
    samples = []
    for dtype, shape in ((torch.float32, (2, 5, 37)), (torch.bfloat16, (3, 4, 70))):
        logits, target = make_case(shape, dtype)
        logits = logits[:, :, : shape[2] - 3]  # strided rows
        target = target.clamp(max=shape[2] - 4)
        if op_name == "logprobs_forward":
            samples.append((logits, target, IGNORE))
        else:
            _, lse = torch.ops.mdpo.logprobs_forward(logits, target, IGNORE)
            grad_logps = torch.randn(shape[0])
            samples.append((grad_logps, logits.clone() if op_name.endswith("_") else logits, target, lse, IGNORE))
    for args in samples:
        torch.library.opcheck(op, args)


@needs_native
@pytest.mark.slow
def test_torch_compile_traces_through_the_ops():
    """fullgraph torch.compile of the public op (forward and backward) calls the C++ kernels."""
    torch._dynamo.reset()

    def loss(logits, labels, weights):
        return (sequence_logprobs(logits, labels, impl="native", check_labels=False) * weights).sum()

    compiled = torch.compile(loss, fullgraph=True)
    logits, labels = make_case((2, 16, 500), torch.float32)
    weights = torch.randn(2)
    x_eager, x_compiled = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    expected = loss(x_eager, labels, weights)
    expected.backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = compiled(x_compiled, labels, weights)
        got.backward()
    called = {event.key for event in prof.key_averages()}
    assert {"mdpo::logprobs_forward", "mdpo::logprobs_backward"} <= called, sorted(called)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


# ------------------------------------------------------------------------------------ huge-page advice
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"
_ADVISED_PROBE = """
    import torch
    from mdpo_kernels import logprobs_native
    assert logprobs_native.is_available()
    logits = torch.randn(2, 128, 32768)  # 32 MiB: a fresh gradient this large gets the advice when it is on
    target = torch.randint(0, 32768, (2, 128))
    _, lse = logprobs_native.forward(logits, target, -100)
    grad = logprobs_native.backward(torch.ones(2), logits, target, lse, -100, False)
    middle = grad.data_ptr() + grad.nbytes // 2
    inside = False
    for line in open("/proc/self/smaps"):  # the mapping holding the gradient's middle: is it marked `hg`?
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= middle < hi
        elif inside and head == "VmFlags:":
            print("ADVISED" if "hg" in line.split()[1:] else "NOT_ADVISED")
            break
"""


@needs_native
@pytest.mark.skipif(not os.path.exists(_THP), reason="no transparent huge pages (Linux only)")
@pytest.mark.parametrize("value, expected", [(None, "NOT_ADVISED"), ("0", "NOT_ADVISED"), ("1", "ADVISED"),
                                             ("off", "NOT_ADVISED"), ("on", "ADVISED")])
def test_fresh_gradient_gets_huge_page_advice_only_when_asked(value, expected):
    """Default: no MADV_HUGEPAGE on a fresh gradient (median over fresh allocations is better without it
    on THP defrag=madvise machines, see csrc/logprobs_cpu.cpp); MDPO_HUGEPAGES=1 opts in."""
    env = {k: v for k, v in os.environ.items() if k != "MDPO_HUGEPAGES"}
    if value is not None:
        env["MDPO_HUGEPAGES"] = value
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_ADVISED_PROBE)], capture_output=True, text=True,
                            env=env, timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [expected], result.stdout + result.stderr


@needs_native
@pytest.mark.skipif(not os.path.exists(_THP), reason="no transparent huge pages (Linux only)")
def test_bad_hugepages_value_is_named():
    env = dict(os.environ, MDPO_HUGEPAGES="sometimes")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_ADVISED_PROBE)], capture_output=True, text=True,
                            env=env, timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode != 0
    assert "MDPO_HUGEPAGES" in result.stderr and "'sometimes'" in result.stderr, result.stderr


@needs_native
def test_hugepages_override_and_its_query():
    """`_C.huge_pages()` reports the decision; `_C._set_huge_pages(True | False | None)` overrides it (benchmarks)."""
    native = native_loader.load()
    default = native.huge_pages()
    assert default is (os.environ.get("MDPO_HUGEPAGES", "0").lower() in ("1", "on", "true", "yes"))
    try:
        native._set_huge_pages(True)
        assert native.huge_pages() is True
        native._set_huge_pages(False)
        assert native.huge_pages() is False
        with pytest.raises(TypeError, match="True, False or None"):
            native._set_huge_pages("yes")
    finally:
        native._set_huge_pages(None)
    assert native.huge_pages() is default
