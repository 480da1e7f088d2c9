"""Reference log-probs computed once before training and kept on disk.

The reference policy is frozen, so ρ for every record's branches is a constant of the run: one
forward-only pass computes it (for the corrupted branch, once per epoch's corrupted image, or once
when the corruption is the same every epoch) and training then reads it from a table instead of
running a second model forward every step.

The file stores a fingerprint of everything ρ depends on: the model's weights and settings, the
dataset file, the corruption settings, the processor, the objective's branches. A cache whose
fingerprint differs from the run's is refused with the list of differing fields.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MdpoError

CACHE_VERSION = 1


class StaleCacheError(MdpoError, RuntimeError):
    """The cache on disk was computed for a different model, dataset or setting."""


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def weights_digest(model: torch.nn.Module) -> str:
    """A digest of the base model's weights (LoRA parameters excluded): name, shape, Σw and Σ|w|.

    Two float64 reductions per tensor — seconds for a 7B model — enough to notice changed weights.
    """
    h = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if "lora_" in name:
            continue
        p = param.detach()
        h.update(f"{name}:{tuple(p.shape)}:{p.double().sum().item():.10e}:{p.double().abs().sum().item():.10e}".encode())
    return h.hexdigest()


def describe_difference(cached: dict, current: dict) -> list[str]:
    keys = sorted(set(cached) | set(current))
    return [f"{k}: cache has {cached.get(k)!r}, this run has {current.get(k)!r}" for k in keys if cached.get(k) != current.get(k)]


@dataclass
class ReferenceCache:
    """ρ per sample id: chosen and rejected once, corrupted once per corruption epoch."""

    fingerprint: dict
    sample_ids: list[str]
    chosen: torch.Tensor  # (N,) fp32
    rejected: torch.Tensor  # (N,) fp32
    corrupted: torch.Tensor | None  # (E, N) fp32, E = corruption epochs; None without a corrupted branch

    def __post_init__(self):
        self._index = {sid: i for i, sid in enumerate(self.sample_ids)}

    def lookup(self, sample_ids: list[str], corruption_epoch: int) -> torch.Tensor:
        """(n_branches·B,) in the batch layout [chosen | rejected (| corrupted)]."""
        missing = [s for s in sample_ids if s not in self._index]
        if missing:
            raise StaleCacheError(f"reference cache has no entry for sample id(s) {missing[:5]}")
        idx = torch.tensor([self._index[s] for s in sample_ids])
        parts = [self.chosen[idx], self.rejected[idx]]
        if self.corrupted is not None:
            if corruption_epoch >= self.corrupted.shape[0]:
                raise StaleCacheError(
                    f"reference cache holds {self.corrupted.shape[0]} corruption epoch(s); epoch {corruption_epoch} was asked for"
                )
            parts.append(self.corrupted[corruption_epoch, idx])
        return torch.cat(parts)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(
            {"version": CACHE_VERSION, "fingerprint": self.fingerprint, "sample_ids": self.sample_ids,
             "chosen": self.chosen, "rejected": self.rejected, "corrupted": self.corrupted},
            tmp,
        )
        tmp.replace(path)  # never leave a half-written cache behind

    @classmethod
    def merge(cls, parts: list["ReferenceCache"]) -> "ReferenceCache":
        """One cache from the parts several processes computed over disjoint shards of the records."""
        fingerprint = parts[0].fingerprint
        for i, part in enumerate(parts[1:], start=1):
            diff = describe_difference(fingerprint, part.fingerprint)
            if diff:
                raise StaleCacheError(f"reference cache part {i} has another fingerprint than part 0: " + "; ".join(diff))
        sample_ids = [sid for part in parts for sid in part.sample_ids]
        if len(set(sample_ids)) != len(sample_ids):
            raise StaleCacheError("reference cache parts overlap: a sample id appears in more than one part")
        corrupted = None if parts[0].corrupted is None else torch.cat([part.corrupted for part in parts], dim=1)
        return cls(fingerprint, sample_ids, torch.cat([part.chosen for part in parts]),
                   torch.cat([part.rejected for part in parts]), corrupted)

    @classmethod
    def load(cls, path: str | Path, expected_fingerprint: dict) -> "ReferenceCache":
        """Load and check the fingerprint; raise StaleCacheError saying what differs."""
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 — a corrupt file is a stale cache
            raise StaleCacheError(f"reference cache {path} cannot be read ({exc}); delete it to recompute") from exc
        if blob.get("version") != CACHE_VERSION:
            raise StaleCacheError(f"reference cache {path} has format version {blob.get('version')}, expected {CACHE_VERSION}")
        diff = describe_difference(blob["fingerprint"], expected_fingerprint)
        if diff:
            raise StaleCacheError(
                f"reference cache {path} was computed for a different setting:\n  " + "\n  ".join(diff)
                + "\nDelete the file (or point reference.cache_path elsewhere) to recompute it."
            )
        return cls(blob["fingerprint"], blob["sample_ids"], blob["chosen"], blob["rejected"], blob["corrupted"])


def canonical(fingerprint: dict) -> dict:
    """JSON round trip, so tuples and lists compare equal after a save/load."""
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
