"""The cached reference pass: the fingerprint of what ρ depends on, and the one forward-only pass over
the records that fills a `ReferenceCache` (sharded over processes, merged by the main process).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .config import TrainConfig
from .loss import get_objective
from .reference_cache import ReferenceCache, canonical, file_digest, weights_digest
from .scoring import move_batch, reference_logps


def run_fingerprint(cfg: TrainConfig, loaded, n_records: int, n_corruption_epochs: int, data_path: str | None = None,
                    weights: str | None = None) -> dict:
    """Everything the reference log-probs of the records in `data_path` (default: data.path) depend on.

    `weights`: the base model's `weights_digest`, when already computed (it reads every weight).
    """
    spec = get_objective(cfg.objective)
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    base = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
    return canonical({
        "model.source": loaded.source, "model.family": loaded.family, "model.dtype": str(next(base.parameters()).dtype),
        "model.weights": weights or weights_digest(base),
        "processor": f"{type(loaded.processor).__name__}:{len(tokenizer)}",
        "data.sha256": file_digest(data_path or cfg.data.path), "data.image_root": cfg.data.image_root, "data.records": n_records,
        "data.max_length": cfg.data.max_length, "data.on_bad_record": cfg.data.on_bad_record,
        "corruption": [cfg.data.corruption, list(cfg.data.crop_area), cfg.data.corruption_seed, cfg.data.same_corruption_every_epoch],
        "corruption.epochs": n_corruption_epochs,
        "objective.branches": list(spec.branches), "objective.images": cfg.objective != "dpo_no_image",
        "loss.average_logprobs": cfg.loss.average_logprobs,
    })


@torch.no_grad()
def compute_reference_cache(scorer, records, collator, fingerprint, n_corruption_epochs, micro, device, reference_model, show_bar):
    """One forward-only pass: ρ of every record's branches, and of each corruption epoch's image.

    Epoch 0 gives chosen, rejected and corrupted; each further corruption epoch recomputes the batch
    and keeps only its corrupted rows (chosen/rejected do not change).
    """
    from tqdm.auto import tqdm

    n, ids = len(records), [r.sample_id for r in records]
    chosen, rejected = torch.zeros(n), torch.zeros(n)
    has_corrupted = fingerprint["objective.branches"][-1] == "corrupted"
    corrupted = torch.zeros(n_corruption_epochs, n) if has_corrupted else None
    total = n_corruption_epochs * math.ceil(n / micro)
    with tqdm(total=total, desc="reference log-probs", disable=not show_bar) as bar:
        for epoch in range(n_corruption_epochs):
            collator.set_epoch(epoch)
            for start in range(0, n, micro):
                chunk = records[start : start + micro]
                b = len(chunk)
                logps = reference_logps(scorer, move_batch(collator(chunk), device), reference_model).float().cpu()
                if epoch == 0:
                    chosen[start : start + b], rejected[start : start + b] = logps[:b], logps[b : 2 * b]
                if has_corrupted:
                    corrupted[epoch, start : start + b] = logps[2 * b : 3 * b]
                bar.update(1)
    return ReferenceCache(fingerprint, ids, chosen, rejected, corrupted)


def reference_cache_paths(cfg: TrainConfig) -> tuple[Path, Path]:
    """(training records' cache, held-out records' cache): reference.cache_path and a "-eval" sibling."""
    train_path = Path(cfg.reference.cache_path or Path(cfg.output_dir) / "reference_logps.pt")
    return train_path, train_path.with_name(f"{train_path.stem}-eval{train_path.suffix}")


def prepare_reference_cache(path: Path, cfg, accelerator, scorer, records, collator, fingerprint, n_corruption_epochs, reference_model):
    """Load the cache at `path` if it matches this run, else compute it and save it there.

    Every process computes its shard records[rank::world] and writes it beside `path`; the main
    process merges the parts into `path`; then every process loads it.
    """
    if path.exists():
        cache = ReferenceCache.load(path, fingerprint)  # raises StaleCacheError listing what differs
        accelerator.print(f"reference log-probs: reusing {path}")
        return cache
    rank, world = accelerator.process_index, accelerator.num_processes
    scorer.eval()  # dropout off: ρ is the frozen model's
    start = time.perf_counter()
    part = compute_reference_cache(
        accelerator.unwrap_model(scorer), records[rank::world], collator, fingerprint, n_corruption_epochs,
        cfg.micro_batch_size, accelerator.device, reference_model, cfg.progress_bar and accelerator.is_main_process,
    )
    scorer.train()
    part_paths = [path.with_name(f"{path.name}.part{r}-of-{world}") for r in range(world)]
    if world == 1:
        part.save(path)
    else:
        part.save(part_paths[rank])
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            ReferenceCache.merge([ReferenceCache.load(p, fingerprint) for p in part_paths]).save(path)
            for p in part_paths:
                p.unlink()
    accelerator.wait_for_everyone()
    accelerator.print(f"reference log-probs: computed in {time.perf_counter() - start:.1f} s over {world} process(es) -> {path}")
    return ReferenceCache.load(path, fingerprint)
