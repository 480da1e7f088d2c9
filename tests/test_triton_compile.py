"""The Triton kernels compile for NVIDIA GPUs (sm_80, sm_90) — checked on a machine without one.

TRITON_INTERPRET=1 runs the kernels' Python, not Triton's compiler, so a kernel can pass every
interpreted test and still fail to compile (a type mismatch between `if` branches, an op with no GPU
lowering). Triton compiles ahead of time for a named target with the ptxas it ships, no GPU or driver
needed. Each kernel is compiled down to a cubin with the signature and the BLOCK_V / num_warps its
launcher would choose for a compiled run. The compiling happens in one child process without
TRITON_INTERPRET: under the interpreter, Triton's own library functions (tl.max, tl.sum) are wrapped
for interpretation and cannot be compiled.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import triton

from mdpo_kernels import logprobs_triton as kernels

TRITON_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# (vocabulary, integer width of the strides): a small vocabulary (one masked block, 4 warps) with
# 32-bit strides, and LLaVA's vocabulary (several blocks, 8/16 warps) with 64-bit strides, as a
# launch gets when a tensor spans more than 2**31 elements.
CASES = [(70, "i32"), (32000, "i64")]
TARGETS = [(90, dtype) for dtype in TRITON_DTYPE] + [(80, "bfloat16")]
KERNELS = ("forward", "backward")


def _case_id(kernel: str, arch: int, dtype: str, vocab: int, width: str) -> str:
    return f"{kernel}-sm{arch}-{dtype}-V{vocab}-{width}"


def _signature(kernel: str, dtype: str, width: str) -> dict:
    element = f"*{TRITON_DTYPE[dtype]}"
    if kernel == "forward":
        return {
            "logits_ptr": element, "target_ptr": "*i64", "token_logp_ptr": "*fp32", "lse_ptr": "*fp32",
            "positions": "i32", "vocab": "i32", "stride_r": width, "stride_t": width,
            "ignore_index": "i32", "BLOCK_V": "constexpr",
        }
    return {
        "logits_ptr": element, "grad_ptr": element, "target_ptr": "*i64", "lse_ptr": "*fp32",
        "grad_logp_ptr": "*fp32", "positions": "i32", "vocab": "i32", "stride_r": width, "stride_t": width,
        "grad_stride_r": width, "grad_stride_t": width, "ignore_index": "i32", "BLOCK_V": "constexpr",
    }


def compile_all() -> dict:
    """Compile every (kernel, target, case); -> {case id: {"ok", "error", "num_warps", "arch", ...}}.

    Runs in the child process (no TRITON_INTERPRET).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for kernel in KERNELS:
        fn = kernels._logprobs_forward_kernel if kernel == "forward" else kernels._logprobs_backward_kernel
        max_block = kernels.FORWARD_MAX_BLOCK_V if kernel == "forward" else kernels.BACKWARD_MAX_BLOCK_V
        for arch, dtype in TARGETS:
            for vocab, width in CASES:
                block, num_warps = kernels._block_and_warps(vocab, max_block, interpreting=False)
                source = ASTSource(fn=fn, signature=_signature(kernel, dtype, width), constexprs={"BLOCK_V": block})
                entry = {"block": block, "num_warps": num_warps}
                try:
                    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
                    entry.update(
                        ok=True, compiled_arch=compiled.metadata.target.arch,
                        compiled_warps=compiled.metadata.num_warps, cubin_bytes=len(compiled.asm["cubin"]),
                        ptx_defines_kernel=f"_logprobs_{kernel}_kernel" in compiled.asm["ptx"],
                    )
                except Exception as exc:  # reported by the test that owns this case
                    entry.update(ok=False, error=f"{type(exc).__name__}: {exc}")
                results[_case_id(kernel, arch, dtype, vocab, width)] = entry
    return results


def _nvidia_backend_missing() -> str | None:
    try:
        from triton.backends import backends
    except ImportError as exc:
        return f"triton.backends does not import ({exc})"
    if "nvidia" not in backends:
        return "Triton has no NVIDIA backend here"
    if not os.path.isdir(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")):
        return "Triton's bundled ptxas is missing"
    return None


@pytest.fixture(scope="module")
def compiled() -> dict:
    reason = _nvidia_backend_missing()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")  # the launch default; silences a warning
    proc = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0, f"the compiling child failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch,dtype", TARGETS, ids=[f"sm{a}-{d}" for a, d in TARGETS])
@pytest.mark.parametrize("vocab,width", CASES, ids=[f"V{v}-{w}" for v, w in CASES])
def test_kernel_compiles_to_cubin(compiled, kernel, arch, dtype, vocab, width):
    result = compiled[_case_id(kernel, arch, dtype, vocab, width)]
    assert result["ok"], result.get("error")
    assert result["compiled_arch"] == arch
    assert result["compiled_warps"] == result["num_warps"]
    assert result["cubin_bytes"] > 0 and result["ptx_defines_kernel"]


def test_compiled_block_choice_fits_registers():
    """The compiled choice keeps ≤ 16 fp32 values per thread; the interpreter takes one big block."""
    for vocab in (70, 32000, 151936, 256000):
        for max_block in (kernels.FORWARD_MAX_BLOCK_V, kernels.BACKWARD_MAX_BLOCK_V):
            block, num_warps = kernels._block_and_warps(vocab, max_block, interpreting=False)
            assert min(triton.next_power_of_2(vocab), max_block) == block
            assert block // (num_warps * 32) <= 16, (vocab, block, num_warps)
    assert kernels._block_and_warps(32000, kernels.FORWARD_MAX_BLOCK_V, interpreting=True)[0] == 32768


if __name__ == "__main__":  # the compiling child of the `compiled` fixture
    print(json.dumps(compile_all()))
