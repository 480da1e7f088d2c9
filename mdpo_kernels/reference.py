"""Plain-torch fp32 references of every op in this library.

Same signatures as the fast ops, fp32 maths, whole tensors at once (they build the full
`(R, T, V)` log-softmax). Tests and benchmarks compare against these; they are also the
last-resort implementation (`impl="reference"`).
"""
from __future__ import annotations

import torch

from ._checks import check_logits_and_labels


def sequence_logprobs_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
) -> torch.Tensor:
    """Σ_t log softmax(logits[r, t])[label] over supervised positions, in fp32.

    logits: (R, T, V) any float dtype; labels: (R, T) integer, HF convention when `shift=True`
    (labels[r, t + 1] is the target of logits[r, t]). Returns (R,) float32.
    """
    check_logits_and_labels(logits, labels)
    logits = logits.float()
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
    token_logps = logits.log_softmax(-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    total = torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(-1)
    if average:
        total = total / mask.sum(-1).clamp(min=1)
    return total


def linear_sequence_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
) -> torch.Tensor:
    """`sequence_logprobs_ref(hidden @ weight.T + bias, labels)` with the logits built in fp32.

    hidden: (R, T, H); weight: (V, H); bias: (V,) or None. Returns (R,) float32.
    """
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    return sequence_logprobs_ref(logits, labels, ignore_index=ignore_index, shift=shift, average=average)
