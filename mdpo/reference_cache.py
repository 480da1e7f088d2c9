"""Reference log-probs computed once before training and kept on disk.

The reference policy is frozen, so ρ for every record's branches is a constant of the run: one
forward-only pass computes it (for the corrupted branch, once per epoch's corrupted image, or once
when the corruption is the same every epoch) and training then reads it from a table instead of
running a second model forward every step.

The file stores a fingerprint of everything ρ depends on: the model's weights and settings, the
dataset file, the corruption settings, the processor, the objective's branches. A cache whose
fingerprint differs from the run's is refused with the list of differing fields. Beside the
fingerprint it stores a checksum of its values (`values_checksum`): a file whose values were edited,
permuted between ids, bit-flipped or cut off is refused too, naming the file. The table may be
partial (a short run scores only the entries it reaches): it says which entries it holds, and a
lookup of one it lacks is refused.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.fingerprint import canonical  # noqa: F401 — imported from here too
from .errors import MdpoError

CACHE_VERSION = 3  # 2: entries may be partial (pair_held, corrupted_held); 3: a checksum of the values


class StaleCacheError(MdpoError, RuntimeError):
    """The cache on disk was computed for a different model, dataset or setting."""


DIGEST_CHUNK = 1 << 22  # 16-bit words per reduction: 48 MB of int32 + int64 workspace, whatever the tensor's size
_DIGEST_WEIGHTS: dict[str, torch.Tensor] = {}  # per device: DIGEST_CHUNK pseudo-random int32 weights in [1, 2^15)


def _digest_weights(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _DIGEST_WEIGHTS:  # drawn on the CPU from a fixed seed: the same numbers on every device
        gen = torch.Generator().manual_seed(0x6D64706F)
        _DIGEST_WEIGHTS[key] = torch.randint(1, 1 << 15, (DIGEST_CHUNK,), generator=gen, dtype=torch.int32).to(device)
    return _DIGEST_WEIGHTS[key]


@torch.no_grad()
def tensor_checksum(tensor: torch.Tensor, workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(chunks, 2) int64 on the tensor's device: per chunk of the raw bits read as 16-bit words w_i
    (bytes for 1-byte dtypes), Σ w_i and Σ m_i·w_i with fixed pseudo-random m_i ∈ [1, 2^15).

    Exact integer sums (|m_i·w_i| < 2^30 in int32, sums in int64): a change of any single weight
    changes Σ m_i·w_i by m_i·δ ≠ 0, so it always changes the checksum; several changes cancel only by
    an integer coincidence. Costs a few bandwidth-bound passes over the tensor on its own device
    (no host copy); the only temporaries are the `workspace` buffers (int32 and int64, DIGEST_CHUNK
    each; made here when not given), reused for every chunk. Identical on CPU and GPU.
    """
    flat = tensor.detach().reshape(-1)
    words = flat.view(torch.uint8) if flat.element_size() == 1 else flat.view(torch.int16)
    weights = _digest_weights(words.device)
    if workspace is None:
        workspace = (torch.empty(DIGEST_CHUNK, dtype=torch.int32, device=words.device),
                     torch.empty(DIGEST_CHUNK, dtype=torch.int64, device=words.device))
    product, wide = workspace
    n_chunks = -(-words.numel() // DIGEST_CHUNK)
    sums = torch.zeros(n_chunks, 2, dtype=torch.int64, device=words.device)
    for i in range(n_chunks):
        chunk = words[i * DIGEST_CHUNK : (i + 1) * DIGEST_CHUNK]
        n = chunk.numel()
        wide[:n].copy_(chunk)
        sums[i, 0] = wide[:n].sum()
        torch.mul(chunk, weights[:n], out=product[:n])
        wide[:n].copy_(product[:n])
        sums[i, 1] = wide[:n].sum()
    return sums


@torch.no_grad()
def weights_digest(model: torch.nn.Module) -> str:
    """A digest of the base model's weights (LoRA parameters excluded): per tensor its name, shape,
    dtype and `tensor_checksum`, hashed with sha256.

    Reads each weight where it lives (bandwidth-bound on a GPU; on one shared CPU core about 0.7 s per
    100M fp32 parameters, 0.4 s bf16, vs 2.0 s for the former float64 sums), with 48 MB of workspace
    per device and one host sync per tensor. Any single changed weight changes it.
    """
    h = hashlib.sha256()
    workspaces: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if "lora_" in name:
            continue
        key = str(param.device)
        if key not in workspaces:
            workspaces[key] = (torch.empty(DIGEST_CHUNK, dtype=torch.int32, device=param.device),
                               torch.empty(DIGEST_CHUNK, dtype=torch.int64, device=param.device))
        h.update(f"{name}:{tuple(param.shape)}:{param.dtype}:".encode())
        h.update(tensor_checksum(param, workspaces[key]).cpu().numpy().tobytes())
    return h.hexdigest()


def values_checksum(sample_ids: list[str], *tensors: torch.Tensor | None) -> str:
    """sha256 of the ids in order and of every table's dtype, shape and bytes: any edit of a value, any
    permutation of values between ids, any flipped bit changes it. Costs one pass over N·(3 + 2E) numbers."""
    h = hashlib.sha256(json.dumps(list(sample_ids), ensure_ascii=False).encode("utf-8"))
    for tensor in tensors:
        if tensor is None:
            h.update(b"none")
            continue
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


CACHE_FIELDS = ("sample_ids", "chosen", "rejected", "corrupted", "pair_held", "corrupted_held")  # checksummed, in this order


def describe_difference(cached: dict, current: dict) -> list[str]:
    keys = sorted(set(cached) | set(current))
    return [f"{k}: cache has {cached.get(k)!r}, this run has {current.get(k)!r}" for k in keys if cached.get(k) != current.get(k)]


@dataclass
class ReferenceCache:
    """ρ per sample id: chosen and rejected once, corrupted once per corruption epoch.

    A cache need not hold every entry: a run scores only the (record, corruption epoch) pairs it will
    train on. `pair_held[i]` says whether chosen/rejected of sample_ids[i] are held,
    `corrupted_held[e, i]` whether its corrupted row at corruption epoch e is (default: all held).
    Values of entries not held are 0 and never read: `lookup` refuses them.
    """

    fingerprint: dict
    sample_ids: list[str]
    chosen: torch.Tensor  # (N,) fp32
    rejected: torch.Tensor  # (N,) fp32
    corrupted: torch.Tensor | None  # (E, N) fp32, E = corruption epochs; None without a corrupted branch
    pair_held: torch.Tensor | None = None  # (N,) bool; None: all held
    corrupted_held: torch.Tensor | None = None  # (E, N) bool; None: all held

    def __post_init__(self):
        self._index = {sid: i for i, sid in enumerate(self.sample_ids)}
        n = len(self.sample_ids)
        if self.pair_held is None:
            self.pair_held = torch.ones(n, dtype=torch.bool)
        if self.corrupted is not None and self.corrupted_held is None:
            self.corrupted_held = torch.ones(self.corrupted.shape, dtype=torch.bool)

    @property
    def n_entries(self) -> int:
        """Entries held: one per record's (chosen, rejected) and one per (record, epoch) corrupted row."""
        return int(self.pair_held.sum()) + (0 if self.corrupted_held is None else int(self.corrupted_held.sum()))

    def holds_pair(self, sample_id: str) -> bool:
        i = self._index.get(sample_id)
        return i is not None and bool(self.pair_held[i])

    def holds_corrupted(self, sample_id: str, corruption_epoch: int) -> bool:
        i = self._index.get(sample_id)
        return (i is not None and self.corrupted_held is not None and corruption_epoch < self.corrupted_held.shape[0]
                and bool(self.corrupted_held[corruption_epoch, i]))

    def lookup(self, sample_ids: list[str], corruption_epoch: int) -> torch.Tensor:
        """(n_branches·B,) in the batch layout [chosen | rejected (| corrupted)]."""
        missing = [s for s in sample_ids if not self.holds_pair(s)]
        if missing:
            raise StaleCacheError(f"reference cache has no entry for sample id(s) {missing[:5]}")
        idx = torch.tensor([self._index[s] for s in sample_ids])
        parts = [self.chosen[idx], self.rejected[idx]]
        if self.corrupted is not None:
            if corruption_epoch >= self.corrupted.shape[0]:
                raise StaleCacheError(
                    f"reference cache holds {self.corrupted.shape[0]} corruption epoch(s); epoch {corruption_epoch} was asked for"
                )
            missing = [s for s in sample_ids if not self.holds_corrupted(s, corruption_epoch)]
            if missing:
                raise StaleCacheError(f"reference cache has no corrupted-image entry at corruption epoch {corruption_epoch} "
                                      f"for sample id(s) {missing[:5]} (it was computed for a shorter run)")
            parts.append(self.corrupted[corruption_epoch, idx])
        return torch.cat(parts)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        values = {"sample_ids": self.sample_ids, "chosen": self.chosen, "rejected": self.rejected, "corrupted": self.corrupted,
                  "pair_held": self.pair_held, "corrupted_held": self.corrupted_held}
        checksum = values_checksum(*(values[k] for k in CACHE_FIELDS))
        torch.save({"version": CACHE_VERSION, "fingerprint": self.fingerprint, "checksum": checksum, **values}, tmp)
        tmp.replace(path)  # never leave a half-written cache behind

    @classmethod
    def merge(cls, parts: list["ReferenceCache"]) -> "ReferenceCache":
        """One cache from parts holding disjoint entries: shards several processes computed, or a cache
        and the entries a later run added to it. A sample id may appear in several parts as long as
        no entry (its pair, or its corrupted row at one epoch) is held by two."""
        fingerprint = parts[0].fingerprint
        for i, part in enumerate(parts[1:], start=1):
            diff = describe_difference(fingerprint, part.fingerprint)
            if diff:
                raise StaleCacheError(f"reference cache part {i} has another fingerprint than part 0: " + "; ".join(diff))
        sample_ids = list(dict.fromkeys(sid for part in parts for sid in part.sample_ids))
        index = {sid: i for i, sid in enumerate(sample_ids)}
        n = len(sample_ids)
        chosen, rejected, pair_held = torch.zeros(n), torch.zeros(n), torch.zeros(n, dtype=torch.bool)
        with_corrupted = parts[0].corrupted is not None
        epochs = max(part.corrupted.shape[0] for part in parts) if with_corrupted else 0
        corrupted = torch.zeros(epochs, n) if with_corrupted else None
        corrupted_held = torch.zeros(epochs, n, dtype=torch.bool) if with_corrupted else None
        for part in parts:
            idx = torch.tensor([index[sid] for sid in part.sample_ids], dtype=torch.long)
            if bool((pair_held[idx] & part.pair_held).any()) or (
                    with_corrupted and bool((corrupted_held[: part.corrupted.shape[0], idx] & part.corrupted_held).any())):
                raise StaleCacheError("reference cache parts overlap: an entry of a sample id appears in more than one part")
            take = idx[part.pair_held]
            chosen[take], rejected[take] = part.chosen[part.pair_held], part.rejected[part.pair_held]
            pair_held[take] = True
            if with_corrupted:
                for e in range(part.corrupted.shape[0]):
                    held = part.corrupted_held[e]
                    corrupted[e, idx[held]] = part.corrupted[e, held]
                    corrupted_held[e, idx[held]] = True
        return cls(fingerprint, sample_ids, chosen, rejected, corrupted, pair_held, corrupted_held)

    @classmethod
    def load(cls, path: str | Path, expected_fingerprint: dict) -> "ReferenceCache":
        """Load and check the fingerprint and the values' checksum; raise StaleCacheError saying what differs
        (a file that is not a cache, or whose values do not match their checksum, names the file)."""
        from .checkpoints import torch_load_problem

        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 — a corrupt file is a stale cache
            raise StaleCacheError(f"reference cache {path} cannot be read ({torch_load_problem(exc)}); delete it to recompute") from None
        if not isinstance(blob, dict) or not isinstance(blob.get("fingerprint"), dict):
            what = f"a {type(blob).__name__}" if not isinstance(blob, dict) else "a mapping without a fingerprint"
            raise StaleCacheError(f"reference cache {path} is not a reference cache ({what}); delete it, or point "
                                  "reference.cache_path elsewhere, to recompute")
        if blob.get("version") != CACHE_VERSION:
            raise StaleCacheError(f"reference cache {path} has format version {blob.get('version')}, expected {CACHE_VERSION}; "
                                  "delete it to recompute")
        diff = describe_difference(blob["fingerprint"], expected_fingerprint)
        if diff:
            raise StaleCacheError(f"reference cache {path} was computed for a different setting ({'; '.join(diff)}); delete "
                                  "the file (or point reference.cache_path elsewhere) to recompute it")
        try:
            values = {k: blob[k] for k in CACHE_FIELDS}
            intact = blob.get("checksum") == values_checksum(*(values[k] for k in CACHE_FIELDS))
        except (KeyError, TypeError, AttributeError, RuntimeError):  # a field missing or of another type
            intact = False
        if not intact:
            raise StaleCacheError(f"reference cache {path}: its values do not match their checksum (edited, permuted or "
                                  "damaged since they were computed); delete it to recompute")
        return cls(blob["fingerprint"], *(values[k] for k in CACHE_FIELDS))
