"""C++ CPU backend of `sequence_logprobs`: thin wrappers over torch.ops.mdpo.* (csrc/logprobs_cpu.cpp).

Backend interface (shared with `logprobs_torch` and `logprobs_triton`):
  forward(logits (R,T,V), target (R,T) int64 aligned, ignore_index) -> (logps fp32 (R,), lse fp32 (R,T))
  backward(grad_logps fp32 (R,), logits, target, lse, ignore_index, inplace) -> grad_logits (R,T,V)

The operators are registered by the extension (`TORCH_LIBRARY(mdpo, ...)`, CPU kernels); their fake
implementations below give shapes to FakeTensor / torch.compile, which can then trace through them.
Kernels: online log-sum-exp per position over the vocabulary (fp32 math for fp32/bf16/fp16
storage), AVX2 / AVX-512 chosen at run time, parallel over supervised positions, sums per sequence
in a fixed order (deterministic). Memory: R·T floats beyond the inputs; the backward allocates only
the gradient, or none with `inplace=True`. The fresh gradient gets no transparent-huge-page advice
by default (measured: by median over fresh gradients, the advice loses on a THP defrag=madvise VM;
see csrc/logprobs_cpu.cpp); MDPO_HUGEPAGES=1 opts in, `_C.huge_pages()` says which is in force.
"""
from __future__ import annotations

import torch

from . import native_loader


def is_available() -> bool:
    """True when the extension loaded (its fakes are then registered). Warns once if it did not;
    raises if MDPO_REQUIRE_NATIVE=1 and it did not."""
    if native_loader.load() is None:
        return False
    _register_fakes()
    return True


def forward(logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """logits (R,T,V) fp32/bf16/fp16 on CPU, target (R,T) int64 -> (logps (R,) fp32, lse (R,T) fp32)."""
    return torch.ops.mdpo.logprobs_forward(logits, target, ignore_index)


def backward(grad_logps, logits, target, lse, ignore_index: int, inplace: bool):
    """grad_logps (R,) fp32 -> grad_logits (R,T,V) in logits.dtype; written over `logits` if `inplace`."""
    if inplace:
        torch.ops.mdpo.logprobs_backward_(grad_logps, logits, target, lse, ignore_index)
        return logits
    return torch.ops.mdpo.logprobs_backward(grad_logps, logits, target, lse, ignore_index)


_fakes_registered = False


def _register_fakes() -> None:
    """Shape functions of the operators, for FakeTensor / meta / torch.compile (registered once)."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("mdpo::logprobs_forward")
    def _forward_fake(logits, target, ignore_index):
        rows, positions, _ = logits.shape
        return logits.new_empty((rows,), dtype=torch.float32), logits.new_empty((rows, positions), dtype=torch.float32)

    @torch.library.register_fake("mdpo::logprobs_backward")
    def _backward_fake(grad_logps, logits, target, lse, ignore_index):
        return logits.new_empty(logits.shape)  # contiguous, logits.dtype, like the CPU kernel

    @torch.library.register_fake("mdpo::logprobs_backward_")
    def _backward_inplace_fake(grad_logps, logits, target, lse, ignore_index):
        return None
