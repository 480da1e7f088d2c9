"""The cached reference pass: the fingerprint of what ρ depends on, and the one forward-only pass over
the records that fills a `ReferenceCache` (sharded over processes, merged by the main process).

The pass scores each record's [chosen | rejected] rows once and its corrupted row once per corruption
epoch, and only the (record, epoch) entries the run will train on (`mdpo.train.reached_entries`);
a later run with the same fingerprint that reaches further computes just the entries the cache
lacks and adds them to the file.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from .config import TrainConfig
from .loss import get_objective
from .data.digests import dataset_digest
from .data.fingerprint import DATA_KEYS_OF_ROWS, canonical, processor_fingerprint  # noqa: F401 — imported from here too
from .data.records import sample_ids_of
from .reference_cache import ReferenceCache, StaleCacheError, weights_digest
from .scoring import move_batch, reference_logps


def run_fingerprint(cfg: TrainConfig, loaded, n_records: int, n_corruption_epochs: int, data_path: str | None = None,
                    weights: str | None = None, images: str | None = None) -> dict:
    """Everything the reference log-probs of the records in `data_path` (default: data.path) depend on.

    `weights`: the base model's `weights_digest`, when already computed (it reads every weight).
    `images`: the `image_files_digest` value of the image files the records name (`data.images`: a
    re-saved image makes the cache stale; the whole cache, as a changed data file does). Records whose
    images are all embedded in the data file have no such field (data.sha256 covers them).
    A quantised base (model.quantization) adds `model.quantization` (method, double quantisation,
    compute dtype): a cache of the unquantised base is refused for it and the other way round. An
    unquantised base has no such field, so caches written before it existed stay valid.
    """
    import transformers

    from . import __version__
    from .models.quantization import quantization_of

    spec = get_objective(cfg.objective)
    base = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
    quantization = quantization_of(base)
    return canonical({
        **({"model.quantization": quantization} if quantization else {}),
        "model.source": loaded.source, "model.family": loaded.family, "model.dtype": str(next(base.parameters()).dtype),
        "model.weights": weights or weights_digest(base),
        **processor_fingerprint(loaded.processor),
        "versions.transformers": transformers.__version__, "versions.mdpo": __version__,
        **{f"data.{name}": getattr(cfg.data, name, None) for name in DATA_KEYS_OF_ROWS},
        "data.sha256": dataset_digest(data_path or cfg.data.path, getattr(cfg.data, "cache_dir", None)), "data.image_root": cfg.data.image_root, "data.records": n_records,
        **({"data.images": images} if images is not None else {}),
        "data.on_bad_record": cfg.data.on_bad_record,
        "corruption": [cfg.data.corruption, list(cfg.data.crop_area), cfg.data.corruption_seed, cfg.data.same_corruption_every_epoch],
        "corruption.epochs": n_corruption_epochs,
        "objective.branches": list(spec.branches), "objective.images": cfg.objective != "dpo_no_image",
        "loss.average_logprobs": cfg.loss.average_logprobs,
    })


@torch.no_grad()
def compute_reference_cache(scorer, records, collator, fingerprint, n_corruption_epochs, micro, device, reference_model, show_bar,
                            needed: dict[int, Sequence[int]] | None = None, pairs: Sequence[int] | None = None,
                            min_forwards: int = 0) -> ReferenceCache:
    """One forward-only pass: ρ of records' chosen and rejected rows once, and of their corrupted row
    once per corruption epoch — 2 + E row forwards per record, not 3·E.

    needed: {corruption epoch: indices into `records` whose corrupted row to score}; default every
    record at every one of the `n_corruption_epochs`. pairs: indices whose chosen and rejected rows
    to score; default the union of `needed`. Forwards hold at most 3·micro rows (a training
    micro-batch's rows): ⌈1.5·micro⌉ records of [chosen | rejected], 3·micro records of [corrupted].
    min_forwards: run at least this many forwards, the extra ones on records[0] with their results
    dropped (a sharding engine needs the same number of forwards on every process; `forward_count`).
    """
    from tqdm.auto import tqdm

    n, ids = len(records), list(sample_ids_of(records))
    has_corrupted = fingerprint["objective.branches"][-1] == "corrupted"
    if needed is None:
        needed = {e: range(n) for e in range(n_corruption_epochs)}
    pairs = sorted(set(pairs) if pairs is not None else {i for idx in needed.values() for i in idx})
    needed = {e: sorted(set(idx)) for e, idx in needed.items() if has_corrupted and len(idx)}
    pair_chunk, corrupted_chunk = max(1, (3 * micro + 1) // 2), 3 * micro
    chunks = [(None, pairs[s : s + pair_chunk]) for s in range(0, len(pairs), pair_chunk)]
    chunks += [(e, idx[s : s + corrupted_chunk]) for e, idx in sorted(needed.items()) for s in range(0, len(idx), corrupted_chunk)]
    chunks += [("pad", [0])] * max(0, min_forwards - len(chunks))
    chosen, rejected, pair_held = torch.zeros(n), torch.zeros(n), torch.zeros(n, dtype=torch.bool)
    corrupted = torch.zeros(n_corruption_epochs, n) if has_corrupted else None
    corrupted_held = torch.zeros(n_corruption_epochs, n, dtype=torch.bool) if has_corrupted else None
    with tqdm(total=len(chunks), desc="reference log-probs", disable=not show_bar) as bar:
        for epoch, chunk in chunks:
            collator.set_epoch(0 if epoch in (None, "pad") else epoch)
            branches = ("chosen", "rejected") if epoch in (None, "pad") else ("corrupted",)
            batch = move_batch(collator([records[i] for i in chunk], branches=branches), device)
            logps = reference_logps(scorer, batch, reference_model).float().cpu()
            idx, b = torch.tensor(chunk, dtype=torch.long), len(chunk)
            if epoch == "pad":  # a forward only the other processes needed: nothing is kept
                pass
            elif epoch is None:
                chosen[idx], rejected[idx], pair_held[idx] = logps[:b], logps[b : 2 * b], True
            else:
                corrupted[epoch, idx], corrupted_held[epoch, idx] = logps, True
            bar.update(1)
    return ReferenceCache(fingerprint, ids, chosen, rejected, corrupted, pair_held, corrupted_held)


def forward_count(pairs: Sequence[int], corrupted: dict[int, Sequence[int]], micro: int, rank: int, world: int) -> int:
    """Forwards `compute_reference_cache` runs on process `rank` for its [rank::world] share of the
    missing entries (the same chunking)."""
    pair_chunk, corrupted_chunk = max(1, (3 * micro + 1) // 2), 3 * micro
    mine = -(-len(pairs[rank::world]) // pair_chunk)
    return mine + sum(-(-len(idx[rank::world]) // corrupted_chunk) for idx in corrupted.values() if len(idx[rank::world]))


def missing_entries(cache: ReferenceCache | None, records, needed: dict[int, Sequence[int]], has_corrupted: bool):
    """(record indices whose pair the cache lacks, {corruption epoch: indices whose corrupted row it lacks})."""
    wanted_pairs = sorted({i for idx in needed.values() for i in idx})
    if cache is None:
        return wanted_pairs, ({e: sorted(set(idx)) for e, idx in needed.items()} if has_corrupted else {})
    ids = sample_ids_of(records)
    pairs = [i for i in wanted_pairs if not cache.holds_pair(ids[i])]
    corrupted = {}
    if has_corrupted:
        for e, idx in needed.items():
            lacking = sorted(i for i in set(idx) if not cache.holds_corrupted(ids[i], e))
            if lacking:
                corrupted[e] = lacking
    return pairs, corrupted


def reference_cache_paths(cfg: TrainConfig) -> tuple[Path, Path]:
    """(training records' cache, held-out records' cache): reference.cache_path and a "-eval" sibling."""
    train_path = Path(cfg.reference.cache_path or Path(cfg.output_dir) / "reference_logps.pt")
    return train_path, train_path.with_name(f"{train_path.stem}-eval{train_path.suffix}")


def replaces_stale_cache(cfg, path: Path) -> bool:
    """A stale cache is recomputed instead of refused only for a run that overwrites its output_dir
    (`overwrite_output_dir: true`, `mdpo.run_dir`) and only when the cache lies in that folder: one
    elsewhere (reference.cache_path) may be shared, and its refusal stands."""
    if not getattr(cfg, "overwrite_output_dir", False):
        return False
    return Path(cfg.output_dir).resolve() in Path(path).resolve().parents


def prepare_reference_cache(path: Path, cfg, engine, scorer, records, collator, fingerprint, n_corruption_epochs, reference_model,
                            needed: dict[int, Sequence[int]] | None = None):
    """The cache at `path` holding every entry this run reads: loaded if it holds them all, else the
    missing entries are computed, added to it and saved there (a later, longer run extends the cache
    of a shorter one; a different setting is refused, StaleCacheError listing what differs).

    needed: {corruption epoch: indices into `records` the run trains on in it} (see
    `mdpo.train.reached_entries`); default every record at every corruption epoch. Every process
    computes its share [rank::world] of the missing entries and writes it beside `path`; the main
    process merges the parts into `path`; then every process loads it. engine: the run's
    `mdpo.distributed.Engine`; when it shards weights, every process runs as many forwards as the
    busiest one.
    """
    if needed is None:
        needed = {e: range(len(records)) for e in range(n_corruption_epochs)}
    has_corrupted = fingerprint["objective.branches"][-1] == "corrupted"
    cached = None
    if path.exists():
        try:
            cached = ReferenceCache.load(path, fingerprint)  # StaleCacheError listing what differs
        except StaleCacheError as err:
            if not replaces_stale_cache(cfg, path):
                raise
            reason = str(err).split("; delete")[0]  # its advice (delete the file) is what happens here
            engine.print(f"reference log-probs: {reason}; recomputing it in place (overwrite_output_dir: true)")
    pairs, corrupted = missing_entries(cached, records, needed, has_corrupted)
    if not pairs and not corrupted:
        engine.print(f"reference log-probs: reusing {path}")
        return cached
    rank, world = engine.rank, engine.world
    scorer.eval()  # dropout off: ρ is the frozen model's
    start = time.perf_counter()
    busiest = max(forward_count(pairs, corrupted, cfg.micro_batch_size, r, world) for r in range(world))
    part = compute_reference_cache(
        engine.unwrap(scorer), records, collator, fingerprint, n_corruption_epochs,
        cfg.micro_batch_size, engine.device, reference_model, cfg.progress_bar and engine.is_main,
        needed={e: idx[rank::world] for e, idx in corrupted.items()}, pairs=pairs[rank::world],
        min_forwards=busiest if engine.shards_weights else 0,
    )
    scorer.train()
    part_paths = [path.with_name(f"{path.name}.part{r}-of-{world}") for r in range(world)]
    if world == 1:
        ReferenceCache.merge([c for c in (cached, part) if c is not None]).save(path)
    else:
        part.save(part_paths[rank])
        engine.barrier()
        if engine.is_main:
            parts = [ReferenceCache.load(p, fingerprint) for p in part_paths]
            ReferenceCache.merge([c for c in (cached, *parts) if c is not None]).save(path)
            for p in part_paths:
                p.unlink()
    engine.barrier()
    n_new = len(pairs) + sum(len(idx) for idx in corrupted.values())
    kept = "" if cached is None else f" (added to the {cached.n_entries} it held)"
    engine.print(f"reference log-probs: {n_new} entries ({len(pairs)} chosen+rejected pairs, "
                      f"{n_new - len(pairs)} corrupted rows) computed in {time.perf_counter() - start:.1f} s over {world} "
                      f"process(es){kept} -> {path}")
    return ReferenceCache.load(path, fingerprint)
