"""`sequence_logprobs`: fused per-token log-softmax, label gather and per-sequence sum.

One call covers every row of a [chosen | rejected | corrupted] batch. The maths is shared by all
backends (Triton, C++, chunked torch), which only differ in how they run it:

    forward : logp[r] = Σ_t m[r,t] · (x[r,t,y] − lse(x[r,t,:]))        m = target ≠ ignore_index
    backward: ∂logp[r]/∂x[r,t,v] = m[r,t] · (1[v = y] − softmax(x[r,t])[v])

The forward keeps only `lse` (R·T floats) for the backward, which then reads the logits once more
and writes the gradient once: 2 reads + 1 write of R·T·V elements in all.
"""
from __future__ import annotations

import torch

from . import dispatch
from ._checks import aligned_targets, check_label_range, check_logits_and_labels
from .reference import sequence_logprobs_ref


class SequenceLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index: int, inplace_backward: bool, impl: str):
        backend = dispatch.backend(impl)
        logps, lse = backend.forward(logits, target, ignore_index)
        ctx.save_for_backward(logits, target, lse)
        ctx.ignore_index, ctx.inplace_backward, ctx.impl = ignore_index, inplace_backward, impl
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        logits, target, lse = ctx.saved_tensors
        grad_logits = None
        if ctx.needs_input_grad[0]:
            backend = dispatch.backend(ctx.impl)
            grad_logits = backend.backward(
                grad_logps.float().contiguous(), logits, target, lse, ctx.ignore_index, ctx.inplace_backward
            )
        return grad_logits, None, None, None, None


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
    *,
    inplace_backward: bool = False,
    check_labels: bool = True,
    impl: str | None = None,
) -> torch.Tensor:
    """Per-sequence sum (or mean) of the labels' log-probabilities.

    logits: (R, T, V) float32 / bfloat16 / float16; rows and positions may be strided, the vocabulary
        dimension is made contiguous if it is not.
    labels: (R, T) integer. With `shift=True` (Hugging Face convention) labels[r, t + 1] is scored by
        logits[r, t]; with `shift=False` labels[r, t] is. Positions equal to `ignore_index` count 0.
    average: divide each row by its number of supervised positions (rows with none give 0).
    inplace_backward: write the gradient into `logits` (saves one R·T·V buffer; `logits` is garbage
        afterwards). Off by default.
    check_labels: raise on a label outside [0, V) (one host sync); switch off on a hot path.
    impl: force "triton", "native", "torch" or "reference" (see `dispatch`).
    returns: (R,) float32.
    """
    check_logits_and_labels(logits, labels)
    if check_labels:
        check_label_range(labels, logits.shape[-1], ignore_index, shift)
    impl = dispatch.resolve_impl(logits.device, impl)
    if impl == "reference":
        return sequence_logprobs_ref(logits, labels, ignore_index=ignore_index, shift=shift, average=average)
    if logits.stride(-1) != 1:
        if inplace_backward:
            raise ValueError("inplace_backward=True needs logits with a contiguous vocabulary dimension (stride(-1) == 1)")
        logits = logits.contiguous()
    target = aligned_targets(labels, ignore_index, shift)
    if torch.is_grad_enabled() and logits.requires_grad:
        logps = SequenceLogprobsFunction.apply(logits, target, ignore_index, inplace_backward, impl)
    else:  # forward only (e.g. the reference pass): nothing is kept for a backward.
        logps, _ = dispatch.backend(impl).forward(logits, target, ignore_index)
    if average:
        logps = logps / (target != ignore_index).sum(-1).clamp(min=1)
    return logps
