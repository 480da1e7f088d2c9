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

The LM head's weight is read only inside the head module's own forward (`FusedLMHead`): a sharding
engine (FSDP2, DeepSpeed ZeRO-3) gathers a sharded head around that call with its own hooks and
reduces its gradient back into the shard, so the fused op always sees the whole weight.
"""
from __future__ import annotations

import contextlib

import torch

from mdpo_kernels import linear_sequence_logprobs

from . import shared_prefix as _shared


class FusedLMHead(torch.nn.Linear):
    """An LM head (`nn.Linear`) whose forward can also score: `head(hidden)` is the usual logits,
    `head(hidden, labels, ...)` is `linear_sequence_logprobs(hidden, head.weight, labels, ...)`: (R,)
    fp32 per-sequence log-probs, with no logits built.

    The head's weight is only touched inside this forward, so FSDP2 / ZeRO-3 forward hooks gather a
    sharded weight for the call and their backward hooks reduce its gradient into the shard. Installed
    by `fuse_lm_head` as a class swap of the model's own `nn.Linear`: same parameters, same names, same
    state dict; generation keeps calling it without labels.
    """

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None, *, shift: bool = True,
                average: bool = False, impl: str | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(hidden)
        return linear_sequence_logprobs(hidden, self.weight, labels, bias=self.bias, shift=shift, average=average,
                                        impl=impl, check_labels=False)


def fuse_lm_head(model: torch.nn.Module, adapter) -> FusedLMHead:
    """Make the model's LM head a `FusedLMHead` (in place, idempotent) and return it."""
    head = adapter.lm_head_module(model)
    if type(head) is torch.nn.Linear:
        head.__class__ = FusedLMHead
    elif not isinstance(head, FusedLMHead):
        from .errors import UnsupportedModelError

        raise UnsupportedModelError(f"{adapter.family}: the LM head is a {type(head).__name__}, not a plain nn.Linear; "
                                    "the fused LM-head loss needs logits = hidden @ weightᵀ + bias")
    return head


class SequenceScorer(torch.nn.Module):
    """forward(batch) -> (R,) fp32 sums of response-token log-probs, rows in the batch's order.

    shared_prefix: auto | on | off (model.shared_prefix); auto shares where `mdpo.shared_prefix`
    supports the family and attention implementation, on raises a ConfigError where it does not.
    `self.shares_prefix` says what was chosen. single_forward: every call runs the language model (and
    the vision tower) exactly once, whatever the batch — what a sharding engine needs, whose every layer
    call is a collective that all processes must make alike (the shared-prefix path otherwise may split
    a batch into two forwards, by its row lengths).
    """

    def __init__(self, model: torch.nn.Module, adapter, *, average: bool = False, impl: str | None = None,
                 shared_prefix: str = "auto", single_forward: bool = False):
        super().__init__()
        self.model, self.adapter, self.average, self.impl = model, adapter, average, impl
        self.shared_prefix, self.single_forward = shared_prefix, single_forward
        self.shares_prefix = _shared.resolve(shared_prefix, adapter, model)
        fuse_lm_head(model, adapter)  # found again at each call, not registered twice as a submodule here

    def forward(self, batch: dict) -> torch.Tensor:
        head = self.adapter.lm_head_module(self.model)
        packed = (_shared.scoring_inputs(self.model, self.adapter, batch, single_forward=self.single_forward)
                  if self.shares_prefix else None)
        if packed is not None:  # hidden[r, s] predicts labels[r, s]: no shift
            hidden, labels = packed
            return head(hidden, labels, shift=False, average=self.average, impl=self.impl)
        hidden = self.adapter.hidden_states(self.model, batch)
        return head(hidden, batch["labels"], average=self.average, impl=self.impl)

    def reference_context(self):
        """The frozen reference: the same model with its LoRA adapters switched off.

        Without adapters (full fine-tuning) the model itself is returned unchanged: that is only the
        reference before the first update (the cached pass); live training passes a separate copy.
        """
        disable = getattr(self.model, "disable_adapter", None)
        return disable() if disable is not None else contextlib.nullcontext()


@torch.no_grad()
def reference_logps(scorer: SequenceScorer, batch: dict, reference_model: torch.nn.Module | None = None) -> torch.Tensor:
    """Reference log-probs of a batch, forward only: the policy with its adapters disabled, or a separate
    frozen model — given as a model (scored like the policy) or as its own scorer (a SequenceScorer,
    possibly wrapped by a distributed engine: `mdpo.distributed.Engine.prepare_reference`)."""
    if reference_model is not None:
        if isinstance(reference_model, SequenceScorer) or isinstance(getattr(reference_model, "module", None), SequenceScorer):
            return reference_model(batch)
        return SequenceScorer(reference_model, scorer.adapter, average=scorer.average, impl=scorer.impl,
                              shared_prefix=scorer.shared_prefix, single_forward=scorer.single_forward)(batch)
    with scorer.reference_context():
        return scorer(batch)


def move_batch(batch: dict, device: torch.device) -> dict:
    """Tensors to `device`; other entries (sample ids, counts) untouched."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
