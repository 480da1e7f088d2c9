"""mDPO training: `mdpo-train CONFIG.yaml [key=value ...]`, or on several processes
`torchrun --nproc_per_node N -m mdpo.train CONFIG.yaml distributed.engine=ddp|fsdp2|zero2|zero3 ...`
(`accelerate launch -m mdpo.train ...` and `deepspeed -m mdpo.train ...` work too).

One readable recipe: `setup` (engine, data, model, reference pass, resume) -> `train_loop` -> `finish`
(final weights, plots, summary); everything engine-specific is in `mdpo.distributed`. Each micro-batch is ONE policy forward
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoints import check_same_data, checkpoints_dir, load_checkpoint, save_checkpoint
from .components import (build_model, check_report_to, load_processor, make_collator, make_corruption, make_criterion,
                         make_metrics_writer, out_of_memory_message, read_records, seed_everything)
from .config import ConfigError, TrainConfig, config_to_yaml, load_config, to_dict
from .distributed import Engine, describe, make_engine
from .data.digests import dataset_identity, records_images_digest
from .data.records import identical_pairs_note, sample_ids_of
from .errors import MdpoError, TrainingOutOfMemoryError
from .loss import get_objective
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


def load_eval_records(cfg: TrainConfig, loaded, corruption, engine, train_ids: set[str]):
    """(held-out records, their own collator) from data.eval_path, or ([], None) without one.

    Read like the training records (same image_root, bad-record policy and max_length). Ids shared
    with the training records are reported: those pairs are not held out.
    """
    if cfg.data.eval_path is None:
        return [], None
    result = read_records(cfg, cfg.data.eval_path, loaded, what="data.eval_path", log=engine.print)
    for index, sample_id, reason in result.skipped:
        engine.print(f"skipped held-out record {index} (id {sample_id}): {reason}")
    records = result.records
    if len(records) < engine.world:
        raise ConfigError(f"data.eval_path={cfg.data.eval_path}: {len(records)} usable record(s), fewer than the {engine.world} processes")
    shared = [sample_id for sample_id in sample_ids_of(records) if sample_id in train_ids]
    if shared:
        engine.print(f"warning: {len(shared)} held-out record id(s) are also training records, e.g. {shared[:3]}")
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


# ------------------------------------------------------------------------------------------ setup
@dataclass
class Run:
    """Everything a training run holds between setup, the loop and the finish."""

    cfg: TrainConfig
    engine: Engine
    out: Path
    loaded: Any  # LoadedModel: processor, family adapter, model
    spec: Any  # the objective's ObjectiveSpec
    records: list
    skipped: list
    collator: Any
    eval_records: list
    eval_collator: Any
    accum: int  # micro-batches per optimizer step in each process
    steps_per_epoch: int
    total_steps: int
    n_corruption_epochs: int
    module: Any = None  # what the loop calls: the scorer as the engine wrapped it
    optimizer: Any = None
    scheduler: Any = None
    criterion: Any = None
    trainable: list = field(default_factory=list)
    reference: Any = None  # live reference of a full fine-tuning: a frozen scorer, placed by the engine
    fingerprint: dict | None = None  # what the cached reference log-probs depend on (taken before sharding)
    cache: Any = None  # ReferenceCache of the training records (reference.mode: cached)
    eval_cache: Any = None
    resume: Path | None = None
    data_identity: dict | None = None  # what the run trains on (dataset_identity), saved with each checkpoint
    position: dict = field(default_factory=lambda: {"epoch": 0, "step_in_epoch": 0, "global_step": 0})
    history: list = field(default_factory=list)
    eval_history: list = field(default_factory=list)

    @property
    def scorer(self) -> SequenceScorer:
        """The policy's SequenceScorer (for forwards without gradients: reference, evaluation)."""
        return self.engine.unwrap(self.module)


def check_paths(cfg: TrainConfig) -> None:
    """The data, held-out and model paths exist (before anything slow runs)."""
    if not Path(cfg.data.path).exists():  # a file, or a `datasets` save_to_disk folder
        raise ConfigError(f"data.path={cfg.data.path}: no such dataset file or folder (`mdpo-data make-sample DIR` writes DIR/data.json, and with --scenes the main job's DIR/scenes/)")
    if cfg.data.eval_path is not None and not Path(cfg.data.eval_path).exists():
        raise ConfigError(f"data.eval_path={cfg.data.eval_path}: no such file of held-out records "
                          "(`mdpo-data make-sample DIR` writes DIR/eval.json)")
    if cfg.model.path is not None and not Path(cfg.model.path).is_dir():
        raise ConfigError(f"model.path={cfg.model.path}: no such model folder")


def setup(cfg: TrainConfig, engine: Engine) -> Run:
    """Data, schedule, model, optimizer, reference log-probs and resume position of a run, in the order
    that fails fastest: paths, then the records (read and checked with the processor alone), then the
    schedule, then the weights."""
    check_paths(cfg)
    out = Path(cfg.output_dir)
    resume = claim_output_dir(cfg, engine)  # another run's folder, or a checkpoint of other settings: refused (run_dir.py)
    if engine.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    engine.print(describe(engine))

    # --- processor and data first: the records are read and checked before any weight loads
    check_report_to(cfg)
    loaded = load_processor(cfg)  # processor + family adapter; model=None until build_model
    spec = get_objective(cfg.objective)
    result = read_records(cfg, cfg.data.path, loaded, log=engine.print)
    for index, sample_id, reason in result.skipped:
        engine.print(f"skipped record {index} (id {sample_id}): {reason}")
    if (note := identical_pairs_note(result.records, cfg.data.path, cfg.objective)) is not None:  # chosen == rejected
        engine.print(note)
    identity = dataset_identity(result.records, cfg.data.path, cfg.data.cache_dir)  # saved with every checkpoint
    if resume is not None and (note := check_same_data(resume, identity)) is not None:  # other data: refused
        engine.print(note)
    corruption = make_corruption(cfg)
    collator = make_collator(cfg, loaded, corruption, result.records)
    engine.print(collator.describe_prompts(result.records))
    eval_records, eval_collator = load_eval_records(cfg, loaded, corruption, engine, set(sample_ids_of(result.records)))

    # --- schedule: effective batch = micro · accumulation · processes
    if cfg.effective_batch_size % (cfg.micro_batch_size * engine.world):
        raise ConfigError(f"effective_batch_size={cfg.effective_batch_size} is not a multiple of micro_batch_size·processes = {cfg.micro_batch_size * engine.world}")
    steps_per_epoch = len(result.records) // cfg.effective_batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"data.path={cfg.data.path}: {len(result.records)} usable record(s) are fewer than one effective batch of {cfg.effective_batch_size} pairs")
    run = Run(cfg=cfg, engine=engine, out=out, loaded=loaded, spec=spec, records=result.records, skipped=result.skipped,
              collator=collator, eval_records=eval_records, eval_collator=eval_collator,
              accum=cfg.effective_batch_size // (cfg.micro_batch_size * engine.world), steps_per_epoch=steps_per_epoch,
              total_steps=steps_per_epoch * cfg.epochs if cfg.max_steps < 0 else min(cfg.max_steps, steps_per_epoch * cfg.epochs),
              n_corruption_epochs=1 if (cfg.data.same_corruption_every_epoch or not spec.has_corrupted) else cfg.epochs,
              resume=resume, data_identity=identity)
    setup_model(run)
    setup_reference(run)
    setup_resume(run)
    return run


def setup_model(run: Run) -> None:
    """Weights (LoRA or full fine-tuning), the scorer, and the engine's wrapping of it with its optimizer.

    The reference fingerprint reads every weight, so it is taken here, before a sharding engine splits
    the weights over the processes.
    """
    from transformers import get_cosine_schedule_with_warmup

    cfg, engine = run.cfg, run.engine
    run.loaded, reference_model = build_model(cfg, engine.device, run.loaded)
    # sft trains on the mean token NLL: the scorer returns length-averaged log-probs for it
    options = dict(average=cfg.loss.average_logprobs or run.spec.sft, impl=cfg.kernel_impl, shared_prefix=cfg.model.shared_prefix,
                   single_forward=engine.shards_weights)
    scorer = SequenceScorer(run.loaded.model, run.loaded.adapter, **options)
    if cfg.reference.mode == "cached" and run.spec.needs_reference:  # sft has no reference
        run.fingerprint = run_fingerprint(cfg, run.loaded, len(run.records), run.n_corruption_epochs,
                                          images=records_images_digest(run.records, cfg.data.cache_dir))
    run.trainable = [p for p in scorer.parameters() if p.requires_grad]
    run.module, run.optimizer = engine.prepare(scorer, run.trainable, run.accum)
    # The scheduler counts optimizer steps; it is the run's own, on the torch optimizer every engine steps.
    run.scheduler = get_cosine_schedule_with_warmup(run.optimizer, math.ceil(cfg.warmup_ratio * run.total_steps), run.total_steps)
    run.criterion = make_criterion(cfg)
    if reference_model is not None:  # full fine-tuning, live reference: a frozen copy, placed (sharded) like the policy
        run.reference = engine.prepare_reference(SequenceScorer(reference_model, run.loaded.adapter, **options))


def setup_reference(run: Run) -> None:
    """reference.mode cached: the cache of the entries this run reaches (and of the held-out records)."""
    cfg, engine = run.cfg, run.engine
    if not (cfg.reference.mode == "cached" and run.spec.needs_reference):
        return
    cache_path, eval_cache_path = reference_cache_paths(cfg)
    needed = reached_entries(len(run.records), cfg.seed, run.steps_per_epoch, run.total_steps, cfg.effective_batch_size,
                             run.n_corruption_epochs)
    run.cache = prepare_reference_cache(cache_path, cfg, engine, run.module, run.records, run.collator, run.fingerprint,
                                        run.n_corruption_epochs, run.reference, needed=needed)
    if run.eval_records:  # held-out pairs are always scored with epoch 0's corrupted image
        eval_fingerprint = run_fingerprint(cfg, run.loaded, len(run.eval_records), 1, data_path=cfg.data.eval_path,
                                           weights=run.fingerprint["model.weights"],
                                           images=records_images_digest(run.eval_records, cfg.data.cache_dir))
        run.eval_cache = prepare_reference_cache(eval_cache_path, cfg, engine, run.module, run.eval_records, run.eval_collator,
                                                 eval_fingerprint, 1, run.reference)


def setup_resume(run: Run) -> None:
    """resume_from: load the checkpoint and drop the metrics rows a killed run logged after it."""
    cfg, engine = run.cfg, run.engine
    if run.resume is not None:  # claimed by claim_output_dir: same training settings, a readable position
        run.position = load_checkpoint(run.resume, engine, run.module, run.optimizer, run.scheduler, seed=cfg.seed)
        engine.print(f"resumed from {run.resume} at step {run.position['global_step']}")
        if engine.is_main:
            for name in ("metrics.jsonl", "eval_metrics.jsonl"):
                keep_rows_up_to(run.out / name, run.position["global_step"])
    elif cfg.resume_from == "latest":
        engine.print(f"resume_from=latest: no complete checkpoint in {checkpoints_dir(run.out)} yet; starting at step 0")


# ------------------------------------------------------------------------------------------- loop
class Reporter:
    """Where a run's rows go: metrics.jsonl, eval_metrics.jsonl, TensorBoard / wandb and the progress bar
    (the main process writes; the others hold None)."""

    def __init__(self, run: Run):
        from tqdm.auto import tqdm

        main, resumed, cfg = run.engine.is_main, run.resume is not None, run.cfg
        self.metrics_path, self.eval_metrics_path = run.out / "metrics.jsonl", run.out / "eval_metrics.jsonl"
        self.writer = make_metrics_writer(cfg, run.out) if main else None  # report_to: TensorBoard, wandb or None
        self.log_file = open(self.metrics_path, "a" if resumed else "w") if main else None
        self.eval_file = open(self.eval_metrics_path, "a" if resumed else "w") if (main and run.eval_records) else None
        self.bar = tqdm(total=run.total_steps, initial=run.position["global_step"], desc=cfg.objective,
                        disable=not (cfg.progress_bar and main))
        self.main = main

    def step(self, row: dict) -> None:
        write_row(self.log_file, self.writer, row)
        postfix = {"loss": f"{row['loss/total']:.4f}"}
        if "rewards/accuracies" in row:  # sft has no rewards
            postfix["acc"] = f"{row['rewards/accuracies']:.2f}"
        self.bar.set_postfix(postfix)
        self.bar.update(1)

    def evaluation(self, row: dict) -> None:
        write_row(self.eval_file, self.writer, row, tag_prefix="eval/")
        line = f"held-out @ step {row['step']} ({row['pairs']} pairs): loss {row['loss/total']:.4f}"
        if "rewards/accuracies" in row:
            line += f", accuracy {row['rewards/accuracies']:.3f}"
        if "rewards/conditional_accuracies" in row:
            line += f", conditional accuracy {row['rewards/conditional_accuracies']:.3f}"
        if "generate/recall" in row:
            line += f", generated: CHAIR_s {row['generate/chair_s']:.3f}, recall {row['generate/recall']:.3f}"
        if self.main:
            self.bar.write(line)

    def close(self) -> None:
        self.bar.close()
        for file in (self.log_file, self.eval_file):
            if file is not None:
                file.close()
        if self.writer is not None:
            self.writer.close()


def run_evaluation(run: Run, reporter: Reporter, at_step: int) -> None:
    """Score the held-out pairs (and, at eval_generate_every, generate and score answers); one row."""
    from .evaluate import evaluate

    cfg, engine = run.cfg, run.engine
    metrics = evaluate(run.scorer, run.criterion, run.eval_records, run.eval_collator, micro_batch_size=cfg.micro_batch_size,
                       device=engine.device, reference=run.eval_cache, reference_model=run.reference, rank=engine.rank,
                       world=engine.world, reduce_sum=lambda t: engine.reduce(t, "sum"), equal_forwards=engine.shards_weights)
    if cfg.eval_generate_every and (at_step % cfg.eval_generate_every == 0 or at_step == run.total_steps):
        from .eval.hallucination import training_generation_metrics  # CHAIR of greedy held-out answers, sharded

        with engine.generation_context(run.module):
            metrics.update(training_generation_metrics(cfg, run.loaded, run.scorer.model, engine.device,
                                                       synced_gpus=engine.synced_gpus))
    row = {"step": at_step, **metrics}
    run.eval_history.append(row)
    reporter.evaluation(row)


def train_loop(run: Run, reporter: Reporter) -> None:
    """The optimizer steps from the run's position to total_steps: each one `accum` micro-batches per
    process, one backward each, then the engine's step; held-out evaluation and checkpoints on schedule."""
    cfg, engine, module, criterion = run.cfg, run.engine, run.module, run.criterion
    step = run.position["global_step"]
    if run.eval_records and step == 0:
        run_evaluation(run, reporter, 0)
    module.train()
    for epoch in range(run.position["epoch"], cfg.epochs):
        if step >= run.total_steps:
            break
        run.collator.set_epoch(epoch)
        corruption_epoch = 0 if run.n_corruption_epochs == 1 else epoch
        batches = micro_batches(epoch_order(len(run.records), cfg.seed, epoch), cfg.micro_batch_size, engine.rank, engine.world,
                                run.steps_per_epoch, run.accum)
        first = run.position["step_in_epoch"] if epoch == run.position["epoch"] else 0
        stream = collated_batches(batches[first * run.accum :], run.records, run.collator, cfg.data.num_workers,
                                  pin_memory=engine.device.type == "cuda")
        for step_in_epoch in range(first, run.steps_per_epoch):
            if step >= run.total_steps:
                break
            step_metrics = []
            for micro in range(run.accum):
                batch = move_batch(next(stream), engine.device)
                if run.cache is not None:
                    ref = run.cache.lookup(batch["sample_ids"], corruption_epoch).to(engine.device)
                elif not run.spec.needs_reference:
                    ref = None
                else:
                    ref = reference_logps(run.scorer, batch, run.reference)
                with engine.accumulate(module, last=micro == run.accum - 1):  # DDP syncs gradients on the last only
                    loss, metrics = criterion(policy_logps=module(batch), ref_logps=ref)
                    engine.backward(loss)
                step_metrics.append(metrics)
            grad_norm = engine.step(run.trainable)
            run.scheduler.step()
            step += 1

            # One host sync per optimizer step: mean over micro-batches, then over processes.
            keys = step_metrics[0].keys()
            stacked = engine.reduce(torch.stack([torch.stack([m[k] for m in step_metrics]).mean() for k in keys]), "mean")
            row = {"step": step, "epoch": epoch, **dict(zip(keys, stacked.tolist())),
                   "lr": run.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
            run.history.append(row)
            reporter.step(row)
            at_epoch_end = step_in_epoch + 1 == run.steps_per_epoch
            next_pos = {"epoch": epoch + 1, "step_in_epoch": 0} if at_epoch_end else {"epoch": epoch, "step_in_epoch": step_in_epoch + 1}
            next_pos["global_step"] = step
            if run.eval_records and ((cfg.eval_every and step % cfg.eval_every == 0) or step == run.total_steps):
                run_evaluation(run, reporter, step)
            if (cfg.save_every and step % cfg.save_every == 0) or at_epoch_end or step == run.total_steps:
                save_checkpoint(run.out, engine, module, run.optimizer, run.scheduler, {**next_pos, "data": run.data_identity},
                                cfg, keep=run.resume)


# ----------------------------------------------------------------------------------------- finish
def save_final(run: Run) -> Path:
    """final/: the peft adapter (LoRA) or the whole model's weights (full fine-tuning), consolidated
    from the shards where the engine shards them, readable by transformers and mdpo-eval."""
    cfg, engine = run.cfg, run.engine
    model = run.scorer.model
    final_dir = run.out / "final"
    lora = hasattr(model, "peft_config")
    weights = engine.gather_weights(model, trainable_only=lora) if engine.shards_weights else None
    if engine.is_main:
        model.save_pretrained(final_dir, state_dict=weights)  # None: the model's own (whole) weights
        run.loaded.processor.save_pretrained(final_dir)
        if cfg.save_merged and hasattr(model, "merge_and_unload"):
            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(run.out / "merged")
            run.loaded.processor.save_pretrained(run.out / "merged")
    engine.barrier()
    return final_dir


def finish(run: Run, reporter: Reporter, started: float) -> dict:
    """Close the writers, write final/, the plots and summary.json; -> the summary."""
    cfg, engine = run.cfg, run.engine
    reporter.close()
    final_dir = save_final(run)
    plots = []
    if cfg.plots and engine.is_main:
        plots = save_plots(reporter.metrics_path, run.out / "plots", reporter.eval_metrics_path if run.eval_records else None)
    history, eval_history = run.history, run.eval_history
    summary = {
        "objective": cfg.objective, "steps": run.history[-1]["step"] if history else run.position["global_step"],
        "epochs": cfg.epochs, "pairs_per_step": cfg.effective_batch_size, "records": len(run.records),
        "skipped_records": [{"index": i, "id": s, "reason": r} for i, s, r in run.skipped],
        "first": history[0] if history else None, "last": history[-1] if history else None,
        "last_mean": mean_of_last(history),
        "eval": {"path": cfg.data.eval_path, "pairs": len(run.eval_records), "first": eval_history[0], "last": eval_history[-1]}
        if eval_history else None,
        "seconds": round(time.perf_counter() - started, 2), "processes": engine.world, "engine": engine.name,
        "output_dir": str(run.out), "final": str(final_dir), "plots": [str(p) for p in plots],
    }
    if engine.is_main:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary)
    return summary


def train(cfg: TrainConfig) -> dict:
    """Run one training from a config; returns the summary (also written to output_dir/summary.json).

    The recipe: `setup` (engine, data, model, reference, resume) → `train_loop` → `finish` (final/,
    plots, summary); the same for every distributed engine. An accelerator out-of-memory error anywhere
    in the run is raised as TrainingOutOfMemoryError, whose message gives the run's micro_batch_size,
    data.max_length and gradient-checkpointing settings and what to change.
    """
    engine = make_engine(cfg)
    try:
        seed_everything(cfg.seed)
        run = setup(cfg, engine)
        reporter, started = Reporter(run), time.perf_counter()
        train_loop(run, reporter)
        return finish(run, reporter, started)
    except torch.OutOfMemoryError as exc:
        raise TrainingOutOfMemoryError(out_of_memory_message(cfg, exc)) from exc
    finally:
        engine.close()


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


def _drop_launcher_args(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher passes --local_rank=N (also in the environment, where the engine reads it)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """The `mdpo-train` command. Any error of the library's own (MdpoError) prints one line and returns 2."""
    from .config import config_help

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = _drop_launcher_args(argv)
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
