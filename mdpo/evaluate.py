"""Held-out evaluation: the mDPO loss terms and reward statistics on pairs the policy does not train on.

Every held-out pair's rows [chosen | rejected | corrupted] are scored by the policy with dropout off
and no gradients, against reference log-probs from a cache or computed live, and the loss's metrics
(`MDPOLoss`: loss terms, rewards, margins, accuracies) are averaged over pairs. The corrupted image is
the corruption of epoch 0 at every evaluation, so evaluations at different steps see the same inputs.
`mdpo-train` runs it with `data.eval_path` (and `eval_every`) set; `mdpo-eval CHECKPOINT [--data FILE]`
scores a saved checkpoint.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
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
    equal_forwards: bool = False,
) -> dict[str, float]:
    """-> {metric: mean over the held-out pairs, ..., "pairs": number of pairs}.

    scorer: the (unwrapped) `SequenceScorer` of the policy; its train/eval mode is restored after.
    criterion: the `MDPOLoss` of the run. records/collator: the held-out records and a collator of
    their own (its epoch is set to EVAL_CORRUPTION_EPOCH). reference: a `ReferenceCache` holding these
    records, or None for live reference log-probs (adapters disabled, or `reference_model`).
    With several processes each scores records[rank::world] and `reduce_sum` sums a tensor over them;
    equal_forwards: every process runs as many forwards as the busiest one (a sharding engine's
    forwards are collectives), the extra ones on a held-out record whose results are dropped.
    One host sync at the end.
    """
    if len(records) < world:
        raise ValueError(f"{len(records)} held-out record(s) cannot be shared by {world} processes")
    was_training = scorer.training
    scorer.eval()
    collator.set_epoch(EVAL_CORRUPTION_EPOCH)
    mine = list(records)[rank::world]
    busiest = -(-len(records) // world)  # records of the process with the most
    n_forwards = -(-(busiest if equal_forwards else len(mine)) // micro_batch_size)
    keys, sums = None, None
    try:
        for i in range(n_forwards):
            chunk = mine[i * micro_batch_size : (i + 1) * micro_batch_size]
            if not chunk:  # padding: a forward the other processes need; its results are dropped
                batch = move_batch(collator(list(records[:1])), device)
                if reference is None:
                    reference_logps(scorer, batch, reference_model)
                scorer(batch)
                continue
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


# ------------------------------------------------------------------------------------------- CLI
def evaluate_checkpoint(checkpoint: str | Path, data_path: str | None = None, overrides: Sequence[str] = ()) -> dict:
    """Score a checkpoint of `mdpo-train` on held-out records: the run's own model, objective and loss
    settings (its config.json), the checkpoint's trained parameters, the reference live (adapters
    disabled; for full fine-tuning the initial weights). -> {"checkpoint", "step", "data", metrics...}."""
    from .config import ConfigError, load_config
    from .checkpoints import read_position
    from .distributed import load_trained_weights
    from .components import build_model, load_processor, make_collator, make_corruption, make_criterion, read_records

    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise ConfigError(f"checkpoint={checkpoint}: no config.json (give a folder under <output_dir>/checkpoints/)")
    cfg = load_config(checkpoint / "config.json", list(overrides))  # JSON is YAML
    source = "--data" if data_path else "data.eval_path (from the checkpoint's config.json)"
    data_path = data_path or cfg.data.eval_path
    if data_path is None:
        raise ConfigError(f"checkpoint={checkpoint}: its run had no data.eval_path; name the records with --data")
    if not Path(data_path).exists():
        raise ConfigError(f"{source} {data_path}: no such file of held-out records (relative paths start in this folder)")
    # mmap: only the position is read, not the optimizer state (two copies of the weights for full fine-tuning);
    # weights_only=True: a shared checkpoint cannot run code. Read first: a damaged state.pt is named before any work.
    position = read_position(checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prepared = load_processor(cfg)  # the records are read and checked with the run's settings before any weight loads
    records = read_records(cfg, data_path, prepared, what=source).records
    loaded, _ = build_model(cfg, device, prepared)
    reference_model = None
    if cfg.model.finetune in ("full", "all"):  # the reference is the initial model: keep a copy before loading
        reference_model = copy.deepcopy(loaded.model).eval().requires_grad_(False).to(device)
    load_trained_weights(loaded.model, checkpoint, "checkpoint", cast=True)  # floating dtypes may differ (a CPU run evaluated in bf16)
    loaded.model.to(device)
    corruption = make_corruption(cfg)
    scorer = SequenceScorer(loaded.model, loaded.adapter, average=cfg.loss.average_logprobs, impl=cfg.kernel_impl,
                            shared_prefix=cfg.model.shared_prefix)
    metrics = evaluate(scorer, make_criterion(cfg), records, make_collator(cfg, loaded, corruption, records),
                       micro_batch_size=cfg.micro_batch_size, device=device, reference_model=reference_model)
    return {"checkpoint": str(checkpoint), "step": position["global_step"], "data": str(data_path), **metrics}


def preference_main(argv: list[str]) -> int:
    """`mdpo-eval [preference] CHECKPOINT ...` (the command is `mdpo.eval.cli.main`)."""
    import argparse

    from .errors import MdpoError

    parser = argparse.ArgumentParser(
        prog="mdpo-eval [preference]",
        description="Score an mdpo-train checkpoint on held-out preference pairs (loss terms, rewards, accuracies). "
                    "`mdpo-eval hallucination --help`: generate answers and score object hallucination (CHAIR); "
                    "`mdpo-eval pope --help`, `amber --help`, `suite --help`: POPE, AMBER, all three.",
        epilog="e.g. mdpo-eval outputs/tiny-cpu/checkpoints/step-000100 --data sample_data/eval.json")
    parser.add_argument("checkpoint", help="a folder under <output_dir>/checkpoints/")
    parser.add_argument("--data", help="held-out records (default: the run's data.eval_path)")
    parser.add_argument("--out", help="JSON file for the figures (default: <checkpoint>/eval-<data file stem>.json)")
    parser.add_argument("overrides", nargs="*", help="key=value changes to the run's config, e.g. micro_batch_size=8; "
                        "model.quantization=none | nf4 | int8 picks the base a LoRA checkpoint is scored on (default: the run's)")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow --data
    try:
        result = evaluate_checkpoint(args.checkpoint, args.data, args.overrides)
    except (MdpoError, ValueError) as exc:
        print(f"mdpo-eval: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or Path(args.checkpoint) / f"eval-{Path(result['data']).stem}.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"{result['checkpoint']} (step {result['step']}) on {result['data']}: {result['pairs']} pairs")
    for key, value in result.items():
        if "/" in key:
            print(f"  {key:32s} {value: .4f}")
    print(f"  written to {out}")
    return 0


