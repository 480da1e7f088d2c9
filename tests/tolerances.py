"""The one tolerance table for comparing fast ops against their fp32 references.

    from tolerances import TOLERANCES, assert_close_to_ref
    assert_close_to_ref(actual, expected, dtype, kind="value")   # or kind="grad"

`dtype` is the STORAGE dtype of the op's inputs (float32, bfloat16, float16); `expected` comes from the
fp32 reference (`mdpo_kernels.reference.*_ref`) run on the same stored inputs upcast to fp32, so the
table only has to absorb what the fast op itself adds:
- "value": per-sequence log-prob sums (fp32 outputs). Every op keeps fp32 maths, so the slack covers
  fp32 summation order plus, for low-precision storage, one rounding of intermediate logits to the
  storage dtype (a matmul whose output is bf16 / fp16 before the fp32 softmax).
- "grad": gradients returned in the storage dtype: fp32 maths, then one rounding to the storage dtype
  (bf16: 8 significant bits -> rtol 1.6e-2 ≈ 4 ulp, torch's own default; fp16: 11 bits -> 2e-3).
  Gradients accumulated over many terms (an LM-head weight) compare with the same numbers.
Both are `torch.testing.assert_close(actual.float(), expected.float(), rtol=..., atol=...)`, i.e.
|a − e| ≤ atol + rtol·|e| elementwise.
"""
from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, dict[str, dict[str, float]]] = {
    torch.float32: {"value": {"rtol": 1e-5, "atol": 1e-4}, "grad": {"rtol": 1e-4, "atol": 1e-6}},
    torch.bfloat16: {"value": {"rtol": 2e-3, "atol": 2e-2}, "grad": {"rtol": 1.6e-2, "atol": 1e-5}},
    torch.float16: {"value": {"rtol": 5e-4, "atol": 5e-3}, "grad": {"rtol": 2e-3, "atol": 1e-5}},
}


def tolerance(dtype: torch.dtype, kind: str = "value") -> dict[str, float]:
    """{"rtol": ..., "atol": ...} for inputs stored in `dtype`; kind is "value" or "grad"."""
    if dtype not in TOLERANCES:
        raise KeyError(f"no tolerance for dtype {dtype}; known: {list(TOLERANCES)}")
    if kind not in ("value", "grad"):
        raise KeyError(f"kind must be 'value' or 'grad', got {kind!r}")
    return TOLERANCES[dtype][kind]


def assert_close_to_ref(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str = "value", msg: str | None = None) -> None:
    """Assert `actual` (fast op) matches `expected` (fp32 reference) within the table's slack for `dtype`.

    Shapes must match exactly; both are compared in fp32 on the CPU.
    """
    tol = tolerance(dtype, kind)
    torch.testing.assert_close(
        actual.detach().float().cpu(), expected.detach().float().cpu(), rtol=tol["rtol"], atol=tol["atol"],
        msg=(lambda default: f"{msg}: {default}") if msg else None,
    )
