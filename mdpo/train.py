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

import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from .checkpoints import checkpoints_dir, load_checkpoint, save_checkpoint
from .components import (build_model, check_report_to, load_processor, make_collator, make_corruption, make_criterion,
                         make_metrics_writer, out_of_memory_message, read_records, seed_everything)
from .config import ConfigError, TrainConfig, config_to_yaml, load_config, to_dict
from .data.records import identical_pairs_note
from .errors import MdpoError, TrainingOutOfMemoryError
from .loss import get_objective
from .optim import make_optimizer
from .reference_pass import prepare_reference_cache, reference_cache_paths, run_fingerprint
from .run_dir import claim_output_dir
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


def reached_entries(n_records: int, seed: int, steps_per_epoch: int, total_steps: int, per_step: int,
                    n_corruption_epochs: int) -> dict[int, list[int]]:
    """{corruption epoch: sorted record indices} a run of `total_steps` optimizer steps trains on:
    the first steps·per_step records of each epoch's `epoch_order` (what `micro_batches` hands out,
    over all processes). With one corruption epoch every epoch's records fall under epoch 0."""
    reached: dict[int, set[int]] = {}
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
        used = epoch_order(n_records, seed, epoch)[: steps * per_step]
        reached.setdefault(0 if n_corruption_epochs == 1 else epoch, set()).update(used)
    return {e: sorted(idx) for e, idx in sorted(reached.items())}


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
    if cfg.data.eval_path is None:
        return [], None
    result = read_records(cfg, cfg.data.eval_path, loaded, what="data.eval_path")
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
def keep_rows_up_to(path: Path, step: int) -> None:
    """Drop the metrics rows after `step` from a JSON-lines file (a resumed run logs them again)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))


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
        if not any(key in r for r in rows for key in keys):  # e.g. sft has no rewards
            continue
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
    """Run one training from a config; returns the summary (also written to output_dir/summary.json).

    An accelerator out-of-memory error anywhere in the run is raised as TrainingOutOfMemoryError,
    whose message gives the run's micro_batch_size, data.max_length and gradient-checkpointing
    settings and what to change.
    """
    try:
        return _train(cfg)
    except torch.OutOfMemoryError as exc:
        raise TrainingOutOfMemoryError(out_of_memory_message(cfg, exc)) from exc


def _train(cfg: TrainConfig) -> dict:
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    # cpu=True on a machine without CUDA lets `accelerate launch` / torchrun run several CPU processes (gloo).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    if not Path(cfg.data.path).exists():  # a file, or a `datasets` save_to_disk folder
        raise ConfigError(f"data.path={cfg.data.path}: no such dataset file or folder (`mdpo-data make-sample DIR` writes DIR/data.json, and with --scenes the main job's DIR/scenes/)")
    if cfg.data.eval_path is not None and not Path(cfg.data.eval_path).exists():
        raise ConfigError(f"data.eval_path={cfg.data.eval_path}: no such file of held-out records "
                          "(`mdpo-data make-sample DIR` writes DIR/eval.json)")
    if cfg.model.path is not None and not Path(cfg.model.path).is_dir():
        raise ConfigError(f"model.path={cfg.model.path}: no such model folder")
    resume = claim_output_dir(cfg, accelerator)  # another run's folder, or a checkpoint of other settings: refused (run_dir.py)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))

    # --- processor and data first: the records are read and checked before any weight loads
    check_report_to(cfg)
    loaded = load_processor(cfg)  # processor + family adapter; model=None until build_model
    spec = get_objective(cfg.objective)
    result = read_records(cfg, cfg.data.path, loaded)
    records, skipped = result.records, result.skipped
    for index, sample_id, reason in skipped:
        accelerator.print(f"skipped record {index} (id {sample_id}): {reason}")
    if (note := identical_pairs_note(records, cfg.data.path, cfg.objective)) is not None:  # chosen == rejected
        accelerator.print(note)
    corruption = make_corruption(cfg)
    collator = make_collator(cfg, loaded, corruption, records)
    accelerator.print(collator.describe_prompts(records))
    eval_records, eval_collator = load_eval_records(cfg, loaded, corruption, world, accelerator, {r.sample_id for r in records})

    # --- schedule: effective batch = micro · accumulation · processes
    if cfg.effective_batch_size % (cfg.micro_batch_size * world):
        raise ConfigError(f"effective_batch_size={cfg.effective_batch_size} is not a multiple of micro_batch_size·processes = {cfg.micro_batch_size * world}")
    accum = cfg.effective_batch_size // (cfg.micro_batch_size * world)
    # accelerator.accumulate() then skips the gradient sync (DDP) or the engine step (DeepSpeed) on all
    # but every accum-th micro-batch, whatever the backend; set before prepare (DeepSpeed reads it there).
    accelerator.gradient_accumulation_steps = accum
    deepspeed = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed is not None and deepspeed.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size  # no prepared DataLoader to read it from
    steps_per_epoch = len(records) // cfg.effective_batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"data.path={cfg.data.path}: {len(records)} usable record(s) are fewer than one effective batch of {cfg.effective_batch_size} pairs")
    total_steps = steps_per_epoch * cfg.epochs if cfg.max_steps < 0 else min(cfg.max_steps, steps_per_epoch * cfg.epochs)

    # --- model weights, once the data and the schedule are known to be usable
    loaded, reference_model = build_model(cfg, device, loaded)
    loaded.model.to(device)
    if reference_model is not None:
        reference_model.to(device)
    trainable = [p for p in loaded.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)  # fp32 master weights over bf16
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    # sft trains on the mean token NLL: the scorer returns length-averaged log-probs for it
    scorer = SequenceScorer(loaded.model, loaded.adapter, average=cfg.loss.average_logprobs or spec.sft, impl=cfg.kernel_impl,
                            shared_prefix=cfg.model.shared_prefix)
    # The scheduler stays out of accelerate: its wrapper steps a scheduler once per process per call,
    # for schedules counted in one process's batches, and total_steps already counts optimizer steps.
    scorer, optimizer = accelerator.prepare(scorer, optimizer)
    if accelerator.gradient_accumulation_steps != accum:  # a DeepSpeed config with a number of its own
        raise ConfigError(f"the accelerate/DeepSpeed config sets gradient_accumulation_steps={accelerator.gradient_accumulation_steps}, "
                          f"but effective_batch_size / (micro_batch_size·processes) = {accum}: set it to auto (or {accum})")
    criterion = make_criterion(cfg)

    # --- reference log-probs
    n_corruption_epochs = 1 if (cfg.data.same_corruption_every_epoch or not spec.has_corrupted) else cfg.epochs
    cache = eval_cache = None
    if cfg.reference.mode == "cached" and spec.needs_reference:  # sft has no reference
        cache_path, eval_cache_path = reference_cache_paths(cfg)
        fingerprint = run_fingerprint(cfg, loaded, len(records), n_corruption_epochs)
        needed = reached_entries(len(records), cfg.seed, steps_per_epoch, total_steps, cfg.effective_batch_size, n_corruption_epochs)
        cache = prepare_reference_cache(cache_path, cfg, accelerator, scorer, records, collator, fingerprint, n_corruption_epochs,
                                        reference_model, needed=needed)
        if eval_records:  # held-out pairs are always scored with epoch 0's corrupted image
            eval_fingerprint = run_fingerprint(cfg, loaded, len(eval_records), 1, data_path=cfg.data.eval_path,
                                               weights=fingerprint["model.weights"])
            eval_cache = prepare_reference_cache(eval_cache_path, cfg, accelerator, scorer, eval_records, eval_collator,
                                                 eval_fingerprint, 1, reference_model)

    # --- resume
    position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    if resume is not None:
        position = load_checkpoint(resume, accelerator, scorer, optimizer, scheduler, seed=cfg.seed)
        accelerator.print(f"resumed from {resume} at step {position['global_step']}")
        if accelerator.is_main_process:  # rows a killed run logged after this checkpoint are redone
            for name in ("metrics.jsonl", "eval_metrics.jsonl"):
                keep_rows_up_to(out / name, position["global_step"])
    elif cfg.resume_from == "latest":
        accelerator.print(f"resume_from=latest: no complete checkpoint in {checkpoints_dir(out)} yet; starting at step 0")

    # --- loop
    metrics_path = out / "metrics.jsonl"
    writer = None
    if accelerator.is_main_process:
        writer = make_metrics_writer(cfg, out)  # report_to: TensorBoard, wandb or None
    log_file = open(metrics_path, "a" if resume is not None else "w") if accelerator.is_main_process else None
    bar = tqdm(total=total_steps, initial=position["global_step"], desc=cfg.objective, disable=not (cfg.progress_bar and accelerator.is_main_process))
    eval_metrics_path, eval_history = out / "eval_metrics.jsonl", []
    eval_file = open(eval_metrics_path, "a" if resume is not None else "w") if (accelerator.is_main_process and eval_records) else None

    def run_evaluation(at_step: int) -> None:
        """Score the held-out pairs; one row in eval_metrics.jsonl (and TensorBoard under eval/)."""
        from .evaluate import evaluate

        metrics = evaluate(accelerator.unwrap_model(scorer), criterion, eval_records, eval_collator,
                           micro_batch_size=cfg.micro_batch_size, device=device, reference=eval_cache,
                           reference_model=reference_model, rank=rank, world=world,
                           reduce_sum=lambda t: accelerator.reduce(t, reduction="sum"))
        if cfg.eval_generate_every and world == 1 and (at_step % cfg.eval_generate_every == 0 or at_step == total_steps):
            from .eval.hallucination import training_generation_metrics  # CHAIR of greedy held-out answers

            metrics.update(training_generation_metrics(cfg, loaded, accelerator.unwrap_model(scorer).model, device))
        row = {"step": at_step, **metrics}
        eval_history.append(row)
        write_row(eval_file, writer, row, tag_prefix="eval/")
        line = f"held-out @ step {at_step} ({metrics['pairs']} pairs): loss {metrics['loss/total']:.4f}"
        if "rewards/accuracies" in metrics:
            line += f", accuracy {metrics['rewards/accuracies']:.3f}"
        if "rewards/conditional_accuracies" in metrics:
            line += f", conditional accuracy {metrics['rewards/conditional_accuracies']:.3f}"
        if "generate/recall" in metrics:
            line += f", generated: CHAIR_s {metrics['generate/chair_s']:.3f}, recall {metrics['generate/recall']:.3f}"
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
                elif not spec.needs_reference:
                    ref = None
                else:
                    ref = reference_logps(accelerator.unwrap_model(scorer), batch, reference_model)
                with accelerator.accumulate(scorer):  # gradients sync on the last micro-batch only
                    loss, metrics = criterion(policy_logps=scorer(batch), ref_logps=ref)
                    accelerator.backward(loss)  # accelerate divides by gradient_accumulation_steps
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
            postfix = {"loss": f"{row['loss/total']:.4f}"}
            if "rewards/accuracies" in row:  # sft has no rewards
                postfix["acc"] = f"{row['rewards/accuracies']:.2f}"
            bar.set_postfix(postfix)
            bar.update(1)
            at_epoch_end = step_in_epoch + 1 == steps_per_epoch
            next_pos = {"epoch": epoch + 1, "step_in_epoch": 0} if at_epoch_end else {"epoch": epoch, "step_in_epoch": step_in_epoch + 1}
            next_pos["global_step"] = step
            if eval_records and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
                run_evaluation(step)
            if (cfg.save_every and step % cfg.save_every == 0) or at_epoch_end or step == total_steps:
                save_checkpoint(out, accelerator, scorer, optimizer, scheduler, next_pos, cfg, keep=resume)
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
        "objective": cfg.objective, "steps": step, "epochs": cfg.epochs, "pairs_per_step": cfg.effective_batch_size, "records": len(records),
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
    print(f"\n{summary.get('objective', 'mdpo')} run finished: {summary['steps']} optimizer steps on {summary['records']} records "
          f"({summary['pairs_per_step']} pairs/step, {summary['processes']} process(es)) in {summary['seconds']} s")
    if first and last:
        for key in ("loss/total", "loss/dpo", "loss/conditional", "loss/anchor", "rewards/accuracies", "rewards/conditional_accuracies"):
            if key in last:
                print(f"  {key:32s} step 1 {first[key]: .4f}   mean of the last {last['steps']} steps {last[key]: .4f}")
    held_out = summary.get("eval")
    if held_out:
        first_eval, last_eval = held_out["first"], held_out["last"]
        print(f"  held-out ({held_out['pairs']} pairs from {held_out['path']}):")
        for key in ("loss/total", "rewards/accuracies", "rewards/conditional_accuracies", "rewards/margins",
                    "generate/chair_s", "generate/chair_i", "generate/recall", "generate/objects_per_answer"):
            if key in last_eval and key in first_eval and last_eval[key] is not None and first_eval[key] is not None:
                print(f"    {key:30s} step {first_eval['step']} {first_eval[key]: .4f}   step {last_eval['step']} {last_eval[key]: .4f}")
    if summary["skipped_records"]:
        print(f"  skipped {len(summary['skipped_records'])} bad record(s): see summary.json")
    print(f"  outputs: {summary['output_dir']} (metrics.jsonl{', eval_metrics.jsonl' if held_out else ''}, tensorboard/, plots/, final/)")


USAGE = """usage: mdpo-train [CONFIG.yaml] [key=value ...] [--print-config] [--help]
  e.g. mdpo-train configs/tiny-cpu.yaml max_steps=5
  --print-config  print the effective configuration (every key, defaults filled in) as YAML and exit
  --help          this text and every config key (with CONFIG: also the values that config sets)"""


def main(argv: list[str] | None = None) -> int:
    """The `mdpo-train` command. Any error of the library's own (MdpoError) prints one line and returns 2."""
    from .config import config_help

    argv = list(sys.argv[1:] if argv is None else argv)
    want_help = any(a in ("-h", "--help") for a in argv)
    print_only = "--print-config" in argv
    argv = [a for a in argv if a not in ("--print-config", "-h", "--help")]
    config_path = argv.pop(0) if argv and "=" not in argv[0] else None
    try:
        if want_help:
            cfg = load_config(config_path, argv) if (config_path or argv) else None
            print(__doc__)
            print(USAGE)
            print(f"\nconfig keys{f' (values set by {config_path} shown as [this config: …])' if cfg else ''}:\n")
            print(config_help(cfg))
            return 0
        cfg = load_config(config_path, argv)
        if print_only:
            print(config_to_yaml(cfg), end="")
            return 0
        train(cfg)
    except MdpoError as exc:
        print(f"mdpo-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
