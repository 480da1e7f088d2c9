"""Fused log-prob kernels for (multimodal) preference optimisation.

    from mdpo_kernels import sequence_logprobs, linear_sequence_logprobs

`sequence_logprobs(logits, labels)` -> (R,) fp32 sums of label log-probs (Triton / C++ / torch).
`linear_sequence_logprobs(hidden, weight, labels)` -> the same from hidden states, without logits.
`*_ref` are the plain fp32 references. `dispatch` says which implementation runs where.
"""
from .linear_logprobs import linear_sequence_logprobs
from .logprobs import sequence_logprobs
from .reference import linear_sequence_logprobs_ref, sequence_logprobs_ref

__all__ = ["sequence_logprobs", "sequence_logprobs_ref", "linear_sequence_logprobs", "linear_sequence_logprobs_ref"]
