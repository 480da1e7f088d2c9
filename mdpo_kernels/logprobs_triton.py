"""Triton backend of `sequence_logprobs`: online log-sum-exp forward, softmax-gradient backward.

Backend interface (the same as `logprobs_torch` / `logprobs_native`):
  forward(logits (R,T,V), target (R,T) int64 aligned, ignore_index) -> (logps fp32 (R,), lse fp32 (R,T))
  backward(grad_logps fp32 (R,), logits, target, lse, ignore_index, inplace) -> grad_logits (R,T,V) in logits.dtype

One program per (row, position); one launch covers every row of the [chosen | rejected | corrupted]
batch. Rows and positions may have any stride (stride(-1) == 1); offsets are int64. fp32 maths for
fp32 / bf16 / fp16 loads. Neither launcher synchronises with the host.

Only imported when impl == "triton" (see `dispatch`): on a CPU machine set TRITON_INTERPRET=1 before
importing it, otherwise only CUDA tensors can run.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# ------------------------------------------------------------------------------- constants / heuristics
# Interpreted kernels (TRITON_INTERPRET=1) cost ~ programs × vocabulary blocks in Python/numpy, so take
# one big block there; compiled kernels want a block that fits registers: BLOCK_V · 4 bytes over
# num_warps · 32 threads, e.g. 8192 fp32 over 16 warps = 16 values per thread.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRET_MAX_BLOCK_V = 65536
FORWARD_MAX_BLOCK_V = 8192
BACKWARD_MAX_BLOCK_V = 4096
# Tests set this (monkeypatch) to force several vocabulary blocks, e.g. 16384 with V = 70000 -> 5 blocks.
FORCE_BLOCK_V: int | None = None


def _block_and_warps(vocab: int, max_block: int, *, interpreting: bool = INTERPRETING) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of `vocab` entries; the last block is masked.

    `interpreting` defaults to this process's mode; tests pass False to get the compiled-GPU choice.
    """
    if FORCE_BLOCK_V is not None:
        block = FORCE_BLOCK_V
    else:
        block = min(triton.next_power_of_2(vocab), INTERPRET_MAX_BLOCK_V if interpreting else max_block)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return block, num_warps


# ------------------------------------------------------------------------------- kernels
@triton.jit
def _logprobs_forward_kernel(
    logits_ptr,  # (R, T, V) fp32/bf16/fp16, strides (stride_r, stride_t, 1)
    target_ptr,  # (R, T) int64 contiguous, aligned targets (ignore_index where unsupervised)
    token_logp_ptr,  # (R, T) fp32 contiguous, out: logp of the target at each position (0 when ignored)
    lse_ptr,  # (R, T) fp32 contiguous, out: log Σ_v exp(x_v) (0 when ignored: never read back)
    positions,  # T
    vocab,  # V
    stride_r,
    stride_t,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    """logp[r, t] = x[y] − lse(x) with x = logits[r, t, :], y = target[r, t].

    constexpr: BLOCK_V — vocabulary entries per loop step (power of two; the last block is masked).
    Memory traffic: reads V elements once per supervised position (ignored positions read nothing),
    writes 2 floats per position.
    """
    pid = tl.program_id(0)  # = r · T + t over the contiguous (R, T) buffers
    row = pid // positions
    pos = pid % positions
    target = tl.load(target_ptr + pid)
    logits_row = logits_ptr + row.to(tl.int64) * stride_r + pos.to(tl.int64) * stride_t
    offsets = tl.arange(0, BLOCK_V)
    if target != ignore_index:
        # Online log-sum-exp (Milakov & Gimelshein 2018): after each block,
        #   m' = max(m, max_b x),  s' = s · exp(m − m') + Σ_b exp(x − m')
        # so that s · exp(m) = Σ_{v seen} exp(x_v) without a second pass. Masked lanes load −inf → exp = 0.
        running_max = tl.full((), float("-inf"), tl.float32)
        running_sum = tl.full((), 0.0, tl.float32)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offsets
            x = tl.load(logits_row + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        # Gather x[y]; a label outside [0, V) (possible only with check_labels=False) is never loaded
        # out of bounds: it reads NaN and poisons that row's result instead.
        in_vocab = (target >= 0) & (target < vocab)
        target_logit = tl.load(logits_row + target, mask=in_vocab, other=float("nan")).to(tl.float32)
        token_logp = target_logit - lse
    else:
        lse = tl.full((), 0.0, tl.float32)
        token_logp = tl.full((), 0.0, tl.float32)
    tl.store(lse_ptr + pid, lse)
    tl.store(token_logp_ptr + pid, token_logp)


@triton.jit
def _logprobs_backward_kernel(
    logits_ptr,  # (R, T, V) in, strides (stride_r, stride_t, 1)
    grad_ptr,  # (R, T, V) out, logits' dtype, strides (grad_stride_r, grad_stride_t, 1); may alias logits
    target_ptr,  # (R, T) int64 contiguous
    lse_ptr,  # (R, T) fp32 contiguous, from the forward
    grad_logp_ptr,  # (R,) fp32 contiguous, upstream gradient g_r
    positions,
    vocab,
    stride_r,
    stride_t,
    grad_stride_r,
    grad_stride_t,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    """grad[r, t, v] = g_r · (1[v = y] − exp(x_v − lse)) at supervised positions, 0 elsewhere.

    constexpr: BLOCK_V — vocabulary entries per loop step (power of two; the last block is masked).
    Memory traffic: reads V elements and writes V elements per supervised position; ignored positions
    only write zeros. In place (grad_ptr == logits_ptr) is safe: each element is read before it is
    written, by the same program, and no other program touches it.
    """
    pid = tl.program_id(0)
    row = pid // positions
    pos = pid % positions
    target = tl.load(target_ptr + pid)
    logits_row = logits_ptr + row.to(tl.int64) * stride_r + pos.to(tl.int64) * stride_t
    grad_row = grad_ptr + row.to(tl.int64) * grad_stride_r + pos.to(tl.int64) * grad_stride_t
    offsets = tl.arange(0, BLOCK_V)
    if target != ignore_index:
        g = tl.load(grad_logp_ptr + row)
        lse = tl.load(lse_ptr + pid)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offsets
            in_vocab = cols < vocab
            x = tl.load(logits_row + cols, mask=in_vocab, other=0.0).to(tl.float32)
            softmax = tl.exp(x - lse)
            onehot = tl.where(cols == target, 1.0, 0.0)
            grad = g * (onehot - softmax)
            tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_vocab)
    else:
        zeros = tl.zeros((BLOCK_V,), dtype=grad_ptr.dtype.element_ty)
        for start in range(0, vocab, BLOCK_V):
            cols = start + offsets
            tl.store(grad_row + cols, zeros, mask=cols < vocab)


# ------------------------------------------------------------------------------- launchers
def _check_runnable(logits: torch.Tensor) -> None:
    if logits.device.type != "cuda" and not INTERPRETING:
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors (got {logits.device}); to run it on the CPU set "
            "TRITON_INTERPRET=1 before importing mdpo_kernels, or use impl='native' / 'torch'"
        )


def forward(logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """logits (R, T, V), target (R, T) int64 aligned -> (logps fp32 (R,), lse fp32 (R, T)).

    Reads R·T·V elements once (supervised positions only), writes 2·R·T floats; the per-row sum is a
    fixed-order torch reduction over T, so results are bitwise deterministic.
    """
    _check_runnable(logits)
    rows, positions, vocab = logits.shape
    target = target.contiguous()
    token_logps = torch.empty((rows, positions), dtype=torch.float32, device=logits.device)
    lse = torch.empty((rows, positions), dtype=torch.float32, device=logits.device)
    if rows * positions > 0 and vocab > 0:
        block, num_warps = _block_and_warps(vocab, FORWARD_MAX_BLOCK_V)
        _logprobs_forward_kernel[(rows * positions,)](
            logits, target, token_logps, lse,
            positions, vocab, logits.stride(0), logits.stride(1), ignore_index,
            BLOCK_V=block, num_warps=num_warps,
        )
    else:
        token_logps.zero_()
        lse.zero_()
    return token_logps.sum(-1), lse


def backward(grad_logps, logits, target, lse, ignore_index: int, inplace: bool):
    """-> grad_logits (R, T, V) in logits.dtype: written into `logits` when `inplace`, else a new tensor.

    Reads R·T·V elements once and writes R·T·V once (ignored positions: write zeros only).
    """
    _check_runnable(logits)
    rows, positions, vocab = logits.shape
    grad = logits if inplace else torch.empty((rows, positions, vocab), dtype=logits.dtype, device=logits.device)
    if rows * positions > 0 and vocab > 0:
        block, num_warps = _block_and_warps(vocab, BACKWARD_MAX_BLOCK_V)
        _logprobs_backward_kernel[(rows * positions,)](
            logits, grad, target.contiguous(), lse.contiguous(), grad_logps.float().contiguous(),
            positions, vocab, logits.stride(0), logits.stride(1), grad.stride(0), grad.stride(1), ignore_index,
            BLOCK_V=block, num_warps=num_warps,
        )
    return grad
