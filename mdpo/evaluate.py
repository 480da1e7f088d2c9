"""Held-out evaluation: the mDPO loss terms and reward statistics on pairs the policy does not train on.

Every held-out pair's rows [chosen | rejected | corrupted] are scored by the policy with dropout off
and no gradients, against reference log-probs from a cache or computed live, and the loss's metrics
(`MDPOLoss`: loss terms, rewards, margins, accuracies) are averaged over pairs. The corrupted image is
the corruption of epoch 0 at every evaluation, so evaluations at different steps see the same inputs.
`mdpo-train` runs it with `data.eval_path` (and `eval_every`) set.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .scoring import SequenceScorer, move_batch, reference_logps

EVAL_CORRUPTION_EPOCH = 0


@torch.no_grad()
def evaluate(
    scorer: SequenceScorer,
    criterion: torch.nn.Module,
    records: Sequence,
    collator,
    *,
    micro_batch_size: int,
    device: torch.device | str,
    reference=None,
    reference_model: torch.nn.Module | None = None,
    rank: int = 0,
    world: int = 1,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """-> {metric: mean over the held-out pairs, ..., "pairs": number of pairs}.

    scorer: the (unwrapped) `SequenceScorer` of the policy; its train/eval mode is restored after.
    criterion: the `MDPOLoss` of the run. records/collator: the held-out records and a collator of
    their own (its epoch is set to EVAL_CORRUPTION_EPOCH). reference: a `ReferenceCache` holding these
    records, or None for live reference log-probs (adapters disabled, or `reference_model`).
    With several processes each scores records[rank::world] and `reduce_sum` sums a tensor over them.
    One host sync at the end.
    """
    if len(records) < world:
        raise ValueError(f"{len(records)} held-out record(s) cannot be shared by {world} processes")
    was_training = scorer.training
    scorer.eval()
    collator.set_epoch(EVAL_CORRUPTION_EPOCH)
    mine = list(records)[rank::world]
    keys, sums = None, None
    try:
        for start in range(0, len(mine), micro_batch_size):
            chunk = mine[start : start + micro_batch_size]
            batch = move_batch(collator(chunk), device)
            if reference is not None:
                ref = reference.lookup([r.sample_id for r in chunk], EVAL_CORRUPTION_EPOCH).to(device)
            else:
                ref = reference_logps(scorer, batch, reference_model)
            _, metrics = criterion(policy_logps=scorer(batch), ref_logps=ref)
            keys = keys or list(metrics)
            weighted = torch.stack([metrics[k].detach().float() for k in keys]) * len(chunk)  # means -> sums over pairs
            sums = weighted if sums is None else sums + weighted
    finally:
        scorer.train(was_training)
    totals = torch.cat([sums, torch.tensor([float(len(mine))], device=sums.device)])
    if reduce_sum is not None:
        totals = reduce_sum(totals)
    values = totals.tolist()
    pairs = values[-1]
    return {k: v / pairs for k, v in zip(keys, values[:-1])} | {"pairs": int(pairs)}
