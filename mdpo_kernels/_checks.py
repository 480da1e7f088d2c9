"""Input validation shared by every implementation of the log-prob ops.

Every check here raises on bad input with a message that names the argument at fault.
`check_label_range` is the only one that synchronises with the device (it has to look at the
values); callers on a hot path can switch it off with `check_labels=False`.
"""
from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_logits_and_labels(logits: torch.Tensor, labels: torch.Tensor, *, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"{name} must be a 3-D tensor (R, T, V); got shape {tuple(getattr(logits, 'shape', ()))}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16; got {logits.dtype}")
    check_labels_tensor(labels, logits.shape[:2], logits.device, name=name)


def check_labels_tensor(labels: torch.Tensor, rows_positions, device, *, name: str) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"labels must be a 2-D tensor (R, T); got shape {tuple(getattr(labels, 'shape', ()))}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise TypeError(f"labels must be an integer tensor; got {labels.dtype}")
    if tuple(labels.shape) != tuple(rows_positions):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match {name} shape (R, T) = {tuple(rows_positions)}"
        )
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but {name} are on {device}")


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int, shift: bool) -> None:
    """Raise if a label that is not `ignore_index` lies outside [0, vocab_size).

    With `shift=True` the first column is never used as a target, so it is not checked.
    CPU–GPU sync point: `.any()` reads a value back; only the error path does more.
    """
    used = labels[:, 1:] if shift else labels
    bad = ((used < 0) | (used >= vocab_size)) & (used != ignore_index)
    if bool(bad.any()):
        row, pos = (int(i) for i in bad.nonzero()[0])
        pos += int(shift)
        value = int(labels[row, pos])
        raise ValueError(
            f"labels[{row}, {pos}] = {value} is outside the vocabulary [0, {vocab_size}) and is not "
            f"ignore_index={ignore_index} (pass check_labels=False to skip this check on a hot path)"
        )


def aligned_targets(labels: torch.Tensor, ignore_index: int, shift: bool) -> torch.Tensor:
    """Targets aligned with the logits' positions: target[r, t] is the token that logits[r, t] scores.

    With `shift=True` (Hugging Face convention) target[r, t] = labels[r, t + 1] and the last position
    has no target. The result is int64, contiguous, (R, T); it costs R·T integers, never R·T·V.
    """
    labels = labels.to(torch.int64)
    if not shift:
        return labels.contiguous()
    target = torch.full(labels.shape, ignore_index, dtype=torch.int64, device=labels.device)
    target[:, :-1] = labels[:, 1:]
    return target
