"""mDPO training: `mdpo-train CONFIG.yaml [key=value ...]` or `accelerate launch -m mdpo.train ...`.

One readable file: setup -> reference pass -> train -> save. Each micro-batch is ONE policy forward
over its 3B rows [chosen | rejected | corrupted]; the language model's last hidden states go through
the fused LM head (`linear_sequence_logprobs`), so only response tokens reach the vocabulary and no
logits are built; the reference log-probs come from a cache computed once before training
(`reference.mode: cached`) or from a forward with the LoRA adapters disabled (`live`). With
`data.eval_path`, held-out pairs are scored before step 1, every `eval_every` steps and after the last
(`mdpo.evaluate`).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from .checkpoints import load_checkpoint, save_checkpoint
from .components import build_model, make_collator, make_corruption, make_criterion, seed_everything
from .config import ConfigError, TrainConfig, config_to_yaml, load_config, to_dict
from .loss import get_objective
from .reference_cache import StaleCacheError
from .reference_pass import prepare_reference_cache, reference_cache_paths, run_fingerprint
from .scoring import SequenceScorer, move_batch, reference_logps

PLOT_GROUPS = {
    "losses": ["loss/total", "loss/dpo", "loss/conditional", "loss/anchor"],
    "rewards": ["rewards/chosen", "rewards/rejected", "rewards/corrupted"],
    "margins": ["rewards/margins", "rewards/conditional_margins"],
    "accuracies": ["rewards/accuracies", "rewards/conditional_accuracies"],
}


# ----------------------------------------------------------------------------------------- setup
def epoch_order(n_records: int, seed: int, epoch: int) -> list[int]:
    """The order of records in an epoch: a permutation that depends only on (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_records, generator=gen).tolist()


def micro_batches(order: list[int], micro: int, rank: int, world: int, steps: int, accum: int) -> list[list[int]]:
    """This process's micro-batches of an epoch: `steps · accum` lists of `micro` record indices."""
    per_step = micro * accum * world
    batches = []
    for step in range(steps):
        block = order[step * per_step : (step + 1) * per_step]
        mine = block[rank::world]  # each process takes every world-th record of the step's block
        batches.extend(mine[i * micro : (i + 1) * micro] for i in range(accum))
    return batches


class CollateRecords:
    """Record indices -> collated batch; a picklable callable, so DataLoader workers can run it."""

    def __init__(self, records, collator):
        self.records, self.collator = records, collator

    def __call__(self, indices: list[int]) -> dict:
        return self.collator([self.records[i] for i in indices])


def collated_batches(index_lists: list[list[int]], records, collator, num_workers: int, pin_memory: bool = False):
    """The collated micro-batches, in order: here (num_workers = 0) or collated ahead by worker processes.

    Workers copy the collator when the iterator starts, so set its epoch first. Collation draws from
    no global RNG (corruption is a function of seed, sample id and epoch), so workers change nothing
    in the run but where the collating happens.
    """
    collate = CollateRecords(records, collator)
    if num_workers == 0:
        return map(collate, index_lists)
    from torch.utils.data import DataLoader

    # A generator of its own: the loader draws its workers' seed from it instead of the global RNG,
    # which LoRA dropout uses (a draw there would change the run).
    return iter(DataLoader(index_lists, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=collate,
                           pin_memory=pin_memory, generator=torch.Generator().manual_seed(0)))


def load_eval_records(cfg: TrainConfig, loaded, corruption, world: int, accelerator, train_ids: set[str]):
    """(held-out records, their own collator) from data.eval_path, or ([], None) without one.

    Read like the training records (same image_root, bad-record policy and max_length). Ids shared
    with the training records are reported: those pairs are not held out.
    """
    from .data import load_records

    if cfg.data.eval_path is None:
        return [], None
    result = load_records(cfg.data.eval_path, image_root=cfg.data.image_root, on_bad_record=cfg.data.on_bad_record,
                          processor=loaded.processor, max_length=cfg.data.max_length)
    for index, sample_id, reason in result.skipped:
        accelerator.print(f"skipped held-out record {index} (id {sample_id}): {reason}")
    records = result.records
    if len(records) < world:
        raise ConfigError(f"data.eval_path={cfg.data.eval_path}: {len(records)} usable record(s), fewer than the {world} processes")
    shared = [r.sample_id for r in records if r.sample_id in train_ids]
    if shared:
        accelerator.print(f"warning: {len(shared)} held-out record id(s) are also training records, e.g. {shared[:3]}")
    return records, make_collator(cfg, loaded, corruption, records)


# ------------------------------------------------------------------------------------- reporting
def write_row(file, writer, row: dict, tag_prefix: str = "") -> None:
    """One metrics row: a JSON line in `file` and its numbers in TensorBoard (main process: file is set)."""
    if file is None:
        return
    file.write(json.dumps(row) + "\n")
    file.flush()
    if writer is not None:
        for k, v in row.items():
            if k not in ("step", "epoch", "pairs"):
                writer.add_scalar(tag_prefix + k, v, row["step"])


def save_plots(metrics_path: Path, out_dir: Path, eval_metrics_path: Path | None = None) -> list[Path]:
    """PNG curves of the loss terms, branch rewards, margins and accuracies; held-out ones dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def read(path):
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path and path.exists() else []

    rows, eval_rows = read(metrics_path), read(eval_metrics_path)
    if not rows:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys in PLOT_GROUPS.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                (line,) = ax.plot(*zip(*pts), label=key.split("/")[-1])
                held_out = [(r["step"], r[key]) for r in eval_rows if key in r]
                if held_out:
                    ax.plot(*zip(*held_out), "--o", markersize=3, color=line.get_color(), label=f"{key.split('/')[-1]} (held-out)")
        ax.set_xlabel("optimizer step")
        ax.set_title(name)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / f"{name}.png")
    return written


# ------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig) -> dict:
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from .data import load_records

    # cpu=True on a machine without CUDA lets `accelerate launch` / torchrun run several CPU processes (gloo).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    if not Path(cfg.data.path).is_file():
        raise ConfigError(f"data.path={cfg.data.path}: no such dataset file (make one with `mdpo-data make-sample DIR`)")
    if cfg.data.eval_path is not None and not Path(cfg.data.eval_path).is_file():
        raise ConfigError(f"data.eval_path={cfg.data.eval_path}: no such file of held-out records "
                          "(`mdpo-data make-sample DIR` writes DIR/eval.json)")
    if cfg.model.path is not None and not Path(cfg.model.path).is_dir():
        raise ConfigError(f"model.path={cfg.model.path}: no such model folder")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))

    # --- model and data
    loaded, reference_model = build_model(cfg, device)
    loaded.model.to(device)
    if reference_model is not None:
        reference_model.to(device)
    spec = get_objective(cfg.objective)
    result = load_records(cfg.data.path, image_root=cfg.data.image_root, on_bad_record=cfg.data.on_bad_record,
                          processor=loaded.processor, max_length=cfg.data.max_length)
    records, skipped = result.records, result.skipped
    for index, sample_id, reason in skipped:
        accelerator.print(f"skipped record {index} (id {sample_id}): {reason}")
    corruption = make_corruption(cfg)
    collator = make_collator(cfg, loaded, corruption, records)
    eval_records, eval_collator = load_eval_records(cfg, loaded, corruption, world, accelerator, {r.sample_id for r in records})

    # --- schedule: effective batch = micro · accumulation · processes
    if cfg.effective_batch_size % (cfg.micro_batch_size * world):
        raise ConfigError(f"effective_batch_size={cfg.effective_batch_size} is not a multiple of micro_batch_size·processes = {cfg.micro_batch_size * world}")
    accum = cfg.effective_batch_size // (cfg.micro_batch_size * world)
    steps_per_epoch = len(records) // cfg.effective_batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(records)} records are fewer than one effective batch of {cfg.effective_batch_size} pairs")
    total_steps = steps_per_epoch * cfg.epochs if cfg.max_steps < 0 else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    trainable = [p for p in loaded.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    scorer = SequenceScorer(loaded.model, loaded.adapter, average=cfg.loss.average_logprobs, impl=cfg.kernel_impl)
    # The scheduler stays out of accelerate: its wrapper steps a scheduler once per process per call,
    # for schedules counted in one process's batches, and total_steps already counts optimizer steps.
    scorer, optimizer = accelerator.prepare(scorer, optimizer)
    criterion = make_criterion(cfg)

    # --- reference log-probs
    n_corruption_epochs = 1 if (cfg.data.same_corruption_every_epoch or not spec.has_corrupted) else cfg.epochs
    cache = eval_cache = None
    if cfg.reference.mode == "cached":
        cache_path, eval_cache_path = reference_cache_paths(cfg)
        fingerprint = run_fingerprint(cfg, loaded, len(records), n_corruption_epochs)
        cache = prepare_reference_cache(cache_path, cfg, accelerator, scorer, records, collator, fingerprint, n_corruption_epochs, reference_model)
        if eval_records:  # held-out pairs are always scored with epoch 0's corrupted image
            eval_fingerprint = run_fingerprint(cfg, loaded, len(eval_records), 1, data_path=cfg.data.eval_path,
                                               weights=fingerprint["model.weights"])
            eval_cache = prepare_reference_cache(eval_cache_path, cfg, accelerator, scorer, eval_records, eval_collator,
                                                 eval_fingerprint, 1, reference_model)

    # --- resume
    position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    if cfg.resume_from:
        position = load_checkpoint(Path(cfg.resume_from), accelerator, scorer, optimizer, scheduler)
        accelerator.print(f"resumed from {cfg.resume_from} at step {position['global_step']}")

    # --- loop
    metrics_path = out / "metrics.jsonl"
    writer = None
    if accelerator.is_main_process and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    log_file = open(metrics_path, "a" if cfg.resume_from else "w") if accelerator.is_main_process else None
    bar = tqdm(total=total_steps, initial=position["global_step"], desc="mDPO", disable=not (cfg.progress_bar and accelerator.is_main_process))
    eval_metrics_path, eval_history = out / "eval_metrics.jsonl", []
    eval_file = open(eval_metrics_path, "a" if cfg.resume_from else "w") if (accelerator.is_main_process and eval_records) else None

    def run_evaluation(at_step: int) -> None:
        """Score the held-out pairs; one row in eval_metrics.jsonl (and TensorBoard under eval/)."""
        from .evaluate import evaluate

        metrics = evaluate(accelerator.unwrap_model(scorer), criterion, eval_records, eval_collator,
                           micro_batch_size=cfg.micro_batch_size, device=device, reference=eval_cache,
                           reference_model=reference_model, rank=rank, world=world,
                           reduce_sum=lambda t: accelerator.reduce(t, reduction="sum"))
        row = {"step": at_step, **metrics}
        eval_history.append(row)
        write_row(eval_file, writer, row, tag_prefix="eval/")
        line = (f"held-out @ step {at_step} ({metrics['pairs']} pairs): loss {metrics['loss/total']:.4f}, "
                f"accuracy {metrics['rewards/accuracies']:.3f}")
        if "rewards/conditional_accuracies" in metrics:
            line += f", conditional accuracy {metrics['rewards/conditional_accuracies']:.3f}"
        if accelerator.is_main_process:
            bar.write(line)

    step, history, started = position["global_step"], [], time.perf_counter()
    if eval_records and step == 0:
        run_evaluation(0)
    scorer.train()
    for epoch in range(position["epoch"], cfg.epochs):
        if step >= total_steps:
            break
        collator.set_epoch(epoch)
        corruption_epoch = 0 if n_corruption_epochs == 1 else epoch
        batches = micro_batches(epoch_order(len(records), cfg.seed, epoch), cfg.micro_batch_size, rank, world, steps_per_epoch, accum)
        first = position["step_in_epoch"] if epoch == position["epoch"] else 0
        stream = collated_batches(batches[first * accum :], records, collator, cfg.data.num_workers, pin_memory=device.type == "cuda")
        for step_in_epoch in range(first, steps_per_epoch):
            if step >= total_steps:
                break
            step_metrics = []
            for micro in range(accum):
                batch = move_batch(next(stream), device)
                if cache is not None:
                    ref = cache.lookup(batch["sample_ids"], corruption_epoch).to(device)
                else:
                    ref = reference_logps(accelerator.unwrap_model(scorer), batch, reference_model)
                sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(scorer)
                with sync:
                    loss, metrics = criterion(policy_logps=scorer(batch), ref_logps=ref)
                    accelerator.backward(loss / accum)
                step_metrics.append(metrics)
            grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # One host sync per optimizer step: mean over micro-batches, then over processes.
            keys = step_metrics[0].keys()
            stacked = torch.stack([torch.stack([m[k] for m in step_metrics]).mean() for k in keys])
            stacked = accelerator.reduce(stacked, reduction="mean")
            row = {"step": step, "epoch": epoch, **dict(zip(keys, stacked.tolist())),
                   "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
            history.append(row)
            write_row(log_file, writer, row)
            bar.set_postfix(loss=f"{row['loss/total']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
            bar.update(1)
            at_epoch_end = step_in_epoch + 1 == steps_per_epoch
            next_pos = {"epoch": epoch + 1, "step_in_epoch": 0} if at_epoch_end else {"epoch": epoch, "step_in_epoch": step_in_epoch + 1}
            next_pos["global_step"] = step
            if eval_records and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
                run_evaluation(step)
            if (cfg.save_every and step % cfg.save_every == 0) or at_epoch_end or step == total_steps:
                save_checkpoint(out, accelerator, scorer, optimizer, scheduler, next_pos, cfg)
    bar.close()
    for file in (log_file, eval_file):
        if file is not None:
            file.close()
    if writer is not None:
        writer.close()

    # --- save the final weights
    model = accelerator.unwrap_model(scorer).model
    final_dir = out / "final"
    if accelerator.is_main_process:
        model.save_pretrained(final_dir)  # peft adapter format for LoRA, full weights otherwise
        loaded.processor.save_pretrained(final_dir)
        if cfg.save_merged and hasattr(model, "merge_and_unload"):
            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(out / "merged")
            loaded.processor.save_pretrained(out / "merged")
    accelerator.wait_for_everyone()
    plots = save_plots(metrics_path, out / "plots", eval_metrics_path if eval_records else None) if (cfg.plots and accelerator.is_main_process) else []
    summary = {
        "steps": step, "epochs": cfg.epochs, "pairs_per_step": cfg.effective_batch_size, "records": len(records),
        "skipped_records": [{"index": i, "id": s, "reason": r} for i, s, r in skipped],
        "first": history[0] if history else None, "last": history[-1] if history else None,
        "last_mean": mean_of_last(history),
        "eval": {"path": cfg.data.eval_path, "pairs": len(eval_records), "first": eval_history[0], "last": eval_history[-1]}
        if eval_history else None,
        "seconds": round(time.perf_counter() - started, 2), "processes": world,
        "output_dir": str(out), "final": str(final_dir), "plots": [str(p) for p in plots],
    }
    if accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary)
    return summary


def mean_of_last(history: list[dict], fraction: float = 0.1) -> dict | None:
    """Each metric averaged over the last 10 % of the steps (at least one): steadier than the last step."""
    if not history:
        return None
    tail = history[-max(1, int(len(history) * fraction)):]
    return {k: sum(row[k] for row in tail) / len(tail) for k in tail[0] if isinstance(tail[0][k], (int, float))} | {"steps": len(tail)}


def print_summary(summary: dict) -> None:
    first, last = summary["first"], summary["last_mean"]
    print(f"\nmDPO run finished: {summary['steps']} optimizer steps on {summary['records']} records "
          f"({summary['pairs_per_step']} pairs/step, {summary['processes']} process(es)) in {summary['seconds']} s")
    if first and last:
        for key in ("loss/total", "loss/dpo", "loss/conditional", "loss/anchor", "rewards/accuracies", "rewards/conditional_accuracies"):
            if key in last:
                print(f"  {key:32s} step 1 {first[key]: .4f}   mean of the last {last['steps']} steps {last[key]: .4f}")
    held_out = summary.get("eval")
    if held_out:
        first_eval, last_eval = held_out["first"], held_out["last"]
        print(f"  held-out ({held_out['pairs']} pairs from {held_out['path']}):")
        for key in ("loss/total", "rewards/accuracies", "rewards/conditional_accuracies", "rewards/margins"):
            if key in last_eval:
                print(f"    {key:30s} step {first_eval['step']} {first_eval[key]: .4f}   step {last_eval['step']} {last_eval[key]: .4f}")
    if summary["skipped_records"]:
        print(f"  skipped {len(summary['skipped_records'])} bad record(s): see summary.json")
    print(f"  outputs: {summary['output_dir']} (metrics.jsonl{', eval_metrics.jsonl' if held_out else ''}, tensorboard/, plots/, final/)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("usage: mdpo-train [CONFIG.yaml] [key=value ...] [--print-config]   e.g. mdpo-train configs/tiny-cpu.yaml max_steps=5\n"
              "  --print-config  print the effective configuration (every key, defaults filled in) as YAML and exit")
        return 0
    print_only = "--print-config" in argv
    argv = [a for a in argv if a != "--print-config"]
    config_path = argv.pop(0) if argv and "=" not in argv[0] else None
    try:
        cfg = load_config(config_path, argv)
        if print_only:
            print(config_to_yaml(cfg), end="")
            return 0
        train(cfg)
    except (ConfigError, StaleCacheError) as exc:
        print(f"mdpo-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
