"""Chunked plain-torch backend of `sequence_logprobs` (any device; the CPU fallback).

Backend interface (shared by `logprobs_triton` and `logprobs_native`):
  forward(logits (R,T,V), target (R,T) int64 aligned, ignore_index) -> (logps fp32 (R,), lse fp32 (R,T))
  backward(grad_logps fp32 (R,), logits, target, lse, ignore_index, inplace) -> grad_logits (R,T,V)
`target` is already shifted (see `_checks.aligned_targets`); ignored positions get a zero gradient.

Memory: the fp32 temporaries are bounded by one chunk of `CHUNK_BYTES`, never (R·T·V).
"""
from __future__ import annotations

import torch

# 16 MiB of fp32 per chunk: positions_per_chunk = CHUNK_BYTES // (4 · V), e.g. 131 positions at V = 32000.
# Small enough that malloc reuses the block between chunks instead of mapping fresh pages each time.
CHUNK_BYTES = 16 * 2**20


def _chunks(logits: torch.Tensor):
    """Yield (row, t0, t1) blocks of positions, each at most CHUNK_BYTES of fp32 logits."""
    rows, positions, vocab = logits.shape
    step = max(1, CHUNK_BYTES // (4 * vocab))
    for r in range(rows):
        for t0 in range(0, positions, step):
            yield r, t0, min(positions, t0 + step)


def forward(logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    rows, positions, _ = logits.shape
    token_logps = torch.zeros(rows, positions, dtype=torch.float32, device=logits.device)
    lse = torch.zeros(rows, positions, dtype=torch.float32, device=logits.device)
    for r, t0, t1 in _chunks(logits):
        x = logits[r, t0:t1].float()
        tgt = target[r, t0:t1]
        mask = tgt != ignore_index
        chunk_lse = torch.logsumexp(x, dim=-1)
        picked = x.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        lse[r, t0:t1] = chunk_lse
        token_logps[r, t0:t1] = torch.where(mask, picked - chunk_lse, torch.zeros_like(chunk_lse))
    # Fixed-order reduction over positions: deterministic.
    return token_logps.sum(-1), lse


def backward(grad_logps, logits, target, lse, ignore_index: int, inplace: bool):
    grad = logits if inplace else torch.empty_like(logits)
    for r, t0, t1 in _chunks(logits):
        tgt = target[r, t0:t1]
        keep = (tgt != ignore_index).to(torch.float32) * grad_logps[r]  # g_r at supervised positions, else 0
        # d logp / d logits = g · (onehot(target) − softmax); one fp32 buffer, updated in place.
        g = logits[r, t0:t1].to(torch.float32, copy=True)  # one chunk-sized fp32 buffer
        g.sub_(lse[r, t0:t1].unsqueeze(-1)).exp_().mul_(-keep.unsqueeze(-1))
        g.scatter_add_(-1, tgt.clamp(min=0).unsqueeze(-1), keep.unsqueeze(-1))
        grad[r, t0:t1] = g
    return grad
