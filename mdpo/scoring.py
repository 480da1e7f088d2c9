"""Per-sequence log-probs of a vision-language model, through the fused LM head.

`SequenceScorer` wraps a model and its family adapter as one `nn.Module`, so that DDP sees a single
forward: the language model's last hidden states go straight into `linear_sequence_logprobs`,
which projects only the supervised (response) tokens through the LM head. No (rows, T, V) logits
exist at any point.
"""
from __future__ import annotations

import contextlib

import torch

from mdpo_kernels import linear_sequence_logprobs


class SequenceScorer(torch.nn.Module):
    """forward(batch) -> (R,) fp32 sums of response-token log-probs, rows in the batch's order."""

    def __init__(self, model: torch.nn.Module, adapter, *, average: bool = False, impl: str | None = None):
        super().__init__()
        self.model, self.adapter, self.average, self.impl = model, adapter, average, impl

    def forward(self, batch: dict) -> torch.Tensor:
        hidden = self.adapter.hidden_states(self.model, batch)
        weight, bias = self.adapter.lm_head(self.model)
        return linear_sequence_logprobs(
            hidden, weight, batch["labels"], bias=bias, average=self.average, impl=self.impl, check_labels=False
        )

    def reference_context(self):
        """The frozen reference: the same model with its LoRA adapters switched off.

        Without adapters (full fine-tuning) the model itself is returned unchanged: that is only the
        reference before the first update (the cached pass); live training passes a separate copy.
        """
        disable = getattr(self.model, "disable_adapter", None)
        return disable() if disable is not None else contextlib.nullcontext()


@torch.no_grad()
def reference_logps(scorer: SequenceScorer, batch: dict, reference_model: torch.nn.Module | None = None) -> torch.Tensor:
    """Reference log-probs of a batch: adapters disabled, or a separate frozen model; forward only."""
    if reference_model is not None:
        return SequenceScorer(reference_model, scorer.adapter, average=scorer.average, impl=scorer.impl)(batch)
    with scorer.reference_context():
        return scorer(batch)


def move_batch(batch: dict, device: torch.device) -> dict:
    """Tensors to `device`; other entries (sample ids, counts) untouched."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
