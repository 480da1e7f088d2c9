"""Per-sequence log-probs of a vision-language model, through the fused LM head.

`SequenceScorer` wraps a model and its family adapter as one `nn.Module`, so that DDP sees a single
forward: the language model's last hidden states go straight into `linear_sequence_logprobs`,
which projects only the supervised (response) tokens through the LM head. No (rows, T, V) logits
exist at any point.

With `shared_prefix` on (the default where the family supports it, `mdpo.shared_prefix`), each pair's
chosen and rejected rows go through the language model as one packed row [prefix | y_w | y_l], so the
image + prompt prefix is computed once; the log-probs come back in the same row order and agree with
the unshared forward to rounding. The policy forward, the reference passes and held-out evaluation
all go through this class, so all of them share.
"""
from __future__ import annotations

import contextlib

import torch

from mdpo_kernels import linear_sequence_logprobs

from . import shared_prefix as _shared


class SequenceScorer(torch.nn.Module):
    """forward(batch) -> (R,) fp32 sums of response-token log-probs, rows in the batch's order.

    shared_prefix: auto | on | off (model.shared_prefix); auto shares where `mdpo.shared_prefix`
    supports the family and attention implementation, on raises a ConfigError where it does not.
    `self.shares_prefix` says what was chosen.
    """

    def __init__(self, model: torch.nn.Module, adapter, *, average: bool = False, impl: str | None = None,
                 shared_prefix: str = "auto"):
        super().__init__()
        self.model, self.adapter, self.average, self.impl = model, adapter, average, impl
        self.shared_prefix = shared_prefix
        self.shares_prefix = _shared.resolve(shared_prefix, adapter, model)

    def forward(self, batch: dict) -> torch.Tensor:
        weight, bias = self.adapter.lm_head(self.model)
        packed = _shared.scoring_inputs(self.model, self.adapter, batch) if self.shares_prefix else None
        if packed is not None:  # hidden[r, s] predicts labels[r, s]: no shift
            hidden, labels = packed
            return linear_sequence_logprobs(hidden, weight, labels, bias=bias, shift=False, average=self.average,
                                            impl=self.impl, check_labels=False)
        hidden = self.adapter.hidden_states(self.model, batch)
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
        return SequenceScorer(reference_model, scorer.adapter, average=scorer.average, impl=scorer.impl,
                              shared_prefix=scorer.shared_prefix)(batch)
    with scorer.reference_context():
        return scorer(batch)


def move_batch(batch: dict, device: torch.device) -> dict:
    """Tensors to `device`; other entries (sample ids, counts) untouched."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
