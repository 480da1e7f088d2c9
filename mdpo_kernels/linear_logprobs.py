"""`linear_sequence_logprobs`: sequence log-probs straight from hidden states, without the logits.

In a vision-language preference batch most positions are image and prompt tokens. Only the
supervised positions (target ≠ ignore_index after the shift) are gathered and projected through the
LM head, chunk by chunk; the full (R, T, V) logits never exist, and at most one chunk of fp32 logits
lives at any moment. Per chunk of n supervised tokens with hidden rows h (n, H) and targets y:

    L = h Wᵀ + b                                  (n, V) fp32          GEMM, 2·n·V·H FLOPs
    lse, logp_tok = L[y] − lse(L)                 dispatched backend   reads n·V once
    D = onehot(y) − softmax(L)                    backend backward with unit upstream gradient,
                                                  written in place into L (no second buffer)
    ∂/∂h = g_tok · (D W)      ∂/∂W = Dᵀ (g_tok · h)      ∂/∂b = Dᵀ g_tok

where g_tok = g[row(tok)] is the upstream gradient of the token's row. D does not depend on g, so it
can be formed before g is known; the scaling by g is applied to the (n, H) operands, never to the
(n, V) chunk.

Strategies and their GEMM count (one "GEMM" = 2·N·V·H FLOPs over all N supervised tokens):
- no grad (the reference pass): 1 GEMM; nothing kept.
- frozen head (only `hidden` needs a gradient — the LoRA case): the forward forms D and D W per chunk
  and keeps D W (N, H) fp32; the backward only scales its rows by g_tok. 2 GEMMs, the minimum.
- head trained (`weight` or `bias` needs a gradient): ∂/∂W needs D and g together, so D must either be
  kept (N·V floats: the logits we refuse to store) or recomputed. The forward keeps lse (N floats);
  the backward recomputes L per chunk (lse reused, no second log-sum-exp) and does D W and Dᵀ h:
  4 GEMMs. The last chunk's D, still in the buffer when the forward ends, is kept for the backward
  instead of recomputed: 4 − 1/k GEMMs for k chunks, 3 when all tokens fit one chunk.
Computing ∂/∂W in the forward (Liger's way) is not an option: the output is one value per row and
∂/∂W = Σ_r g_r · (…)_r cannot be rescaled afterwards without R partial (V, H) gradients.

Precision: logits and D are fp32 for every input dtype. fp32 weights use fp32 GEMMs. bf16/fp16 on
CUDA use cuBLAS with fp32 output (`torch.mm(..., out_dtype=torch.float32)`, torch ≥ 2.8); elsewhere
(CPU) the weight is cast to fp32 one block of rows at a time (WEIGHT_BLOCK_BYTES) and fp32 GEMMs run
on the blocks — no full fp32 copy of the weight. The weight and bias gradients are accumulated in
fp32 buffers across chunks and cast to the parameter dtype once at the end.

Host syncs: one per call — the number of supervised tokens (and, with `check_labels`, the count of
out-of-range labels in the same transfer).
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch

from . import dispatch
from ._checks import SUPPORTED_DTYPES, aligned_targets, check_label_range, check_labels_tensor
from .reference import linear_sequence_logprobs_ref

# ---------------------------------------------------------------------------------------- chunk sizes
# Chunk-size arithmetic. One chunk holds n supervised tokens' logits in fp32, n·V·4 bytes, reused in
# place for D. On CUDA with bf16/fp16 weights the GEMMs with D need a low-precision copy of it (n·V·2
# more bytes). So
#     n = CHUNK_BYTES // (V · bytes_per_logit),   bytes_per_logit = 4 (+ 2 for the CUDA bf16 copy),
# clamped to [MIN_CHUNK_TOKENS, N]; the N tokens are then split into ceil(N / n) equal chunks so the
# last one is not a sliver. CPU, 160 MiB: V = 32000 → 1310 tokens (3072 → 3 chunks of 1024);
# V = 51200 → 819 (the 768 response tokens of a 6-row VLM batch → one chunk, 150 MiB, about what
# Cut Cross-Entropy's logits take). CUDA, CUDA_CHUNK_BYTES = 1 GiB: V = 151936 in bf16 → 1177 tokens.
# Why not smaller: every chunk re-reads the whole weight, and on 2 CPU cores the fp32 projection ran
# 14 % slower as 2 × 384 tokens than as 1 × 768 (5 % for D W); a trained head also recomputes every
# chunk but the last (4 − 1/k GEMMs), so fewer chunks are faster.
# The chunked torch backend (the CPU fallback) allocates up to three temporaries of
# min(chunk, its own 64 MiB) while forming D; the C++ and Triton backends work in place.
CHUNK_BYTES = 160 * 2**20
CUDA_CHUNK_BYTES = 2**30
MIN_CHUNK_TOKENS = 16
# Rows of a bf16/fp16 weight cast to fp32 at a time on the block-cast path (CPU): 32 MiB of fp32,
# e.g. 3276 rows at H = 2560. Each block is read once per GEMM pass: V·H·2 bytes read, V·H·4 written
# to a reused buffer, against 2·n·V·H FLOPs of GEMM.
WEIGHT_BLOCK_BYTES = 32 * 2**20


def chunk_tokens_for(n_tokens: int, vocab: int, device: torch.device, dtype: torch.dtype, budget_bytes: int | None = None) -> int:
    """Supervised tokens per chunk for a budget of fp32 logits (see the arithmetic above)."""
    if n_tokens == 0:
        return 0
    low_precision_cuda = device.type == "cuda" and dtype != torch.float32
    if budget_bytes is None:
        budget_bytes = CUDA_CHUNK_BYTES if device.type == "cuda" else CHUNK_BYTES
    bytes_per_token = vocab * (4 + (2 if low_precision_cuda else 0))
    per_chunk = max(MIN_CHUNK_TOKENS, budget_bytes // bytes_per_token)
    n_chunks = math.ceil(n_tokens / per_chunk)
    return math.ceil(n_tokens / n_chunks)


# -------------------------------------------------------------------------------------- the LM head
@functools.lru_cache(maxsize=None)
def _cuda_mm_has_out_dtype(device_index: int, dtype: torch.dtype) -> bool:
    """Whether `torch.mm(a, b, out_dtype=torch.float32)` works for `dtype` on this GPU (torch ≥ 2.8)."""
    try:
        a = torch.zeros(16, 16, dtype=dtype, device=torch.device("cuda", device_index))
        torch.mm(a, a, out_dtype=torch.float32, out=torch.empty(16, 16, device=a.device))
        return True
    except (TypeError, RuntimeError, NotImplementedError):
        warnings.warn(
            "linear_sequence_logprobs: torch.mm(out_dtype=float32) is not available for "
            f"{dtype} on CUDA in torch {torch.__version__}; using fp32 GEMMs on weight blocks (slow)",
            stacklevel=3,
        )
        return False


def _mm_out_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b of two bf16/fp16 matrices with fp32 output (cuBLAS accumulates in fp32): the "out_dtype" mode."""
    return torch.mm(a, b, out_dtype=torch.float32, out=out)


def _head_mode(weight: torch.Tensor) -> str:
    """fp32 | out_dtype (low-precision weight on CUDA, fp32 GEMM output) | blocked (fp32 copies of weight blocks)."""
    if weight.dtype == torch.float32:
        return "fp32"
    if weight.is_cuda and _cuda_mm_has_out_dtype(weight.device.index or 0, weight.dtype):
        return "out_dtype"
    return "blocked"


class _Head:
    """The three GEMMs with the LM head, fp32 results for any weight dtype.

    project : L (n, V) fp32 = h Wᵀ + b
    back    : out (n, H) fp32 = D W
    weight_grad: acc (V, H) fp32 += Dᵀ hs        (hs = g_tok · h, already scaled)
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        self.vocab, self.hidden_size = weight.shape
        self.mode = _head_mode(weight)
        self.block_rows = max(1, WEIGHT_BLOCK_BYTES // (4 * self.hidden_size))
        self.bias32 = None if bias is None else bias.float()

    def _weight_blocks(self):
        """(v0, v1, fp32 copy of weight[v0:v1]) — one reused buffer, never the whole weight in fp32."""
        rows = min(self.block_rows, self.vocab)
        buffer = torch.empty(rows, self.hidden_size, dtype=torch.float32, device=self.weight.device)
        for v0 in range(0, self.vocab, rows):
            v1 = min(self.vocab, v0 + rows)
            block = buffer[: v1 - v0]
            block.copy_(self.weight[v0:v1])
            yield v0, v1, block

    def operand(self, h: torch.Tensor) -> torch.Tensor:
        """The hidden rows in the dtype the GEMMs take."""
        return h.float() if self.mode == "blocked" else h

    def project(self, h: torch.Tensor, out: torch.Tensor) -> None:
        if self.mode == "fp32":
            if self.bias is None:
                torch.mm(h, self.weight.t(), out=out)
            else:
                torch.addmm(self.bias, h, self.weight.t(), out=out)
        elif self.mode == "out_dtype":
            _mm_out_fp32(h, self.weight.t(), out=out)
            if self.bias32 is not None:
                out.add_(self.bias32)
        else:
            h32 = h.float()
            for v0, v1, block in self._weight_blocks():
                if self.bias32 is None:
                    torch.mm(h32, block.t(), out=out[:, v0:v1])
                else:
                    torch.addmm(self.bias32[v0:v1], h32, block.t(), out=out[:, v0:v1])

    def back(self, grad_logits: torch.Tensor, low: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        """out (n, H) fp32 := D W; `low` is D in the weight dtype (out_dtype mode only)."""
        if self.mode == "fp32":
            return torch.mm(grad_logits, self.weight, out=out)
        if self.mode == "out_dtype":
            return _mm_out_fp32(low, self.weight, out=out)
        out.zero_()
        for v0, v1, block in self._weight_blocks():
            out.addmm_(grad_logits[:, v0:v1], block)
        return out

    def weight_grad(
        self, acc: torch.Tensor, grad_logits: torch.Tensor, low: torch.Tensor | None, scaled_h: torch.Tensor, first: bool
    ) -> None:
        """acc (V, H) fp32 (+)= Dᵀ hs; `first` overwrites, so `acc` needs no zero-filling pass."""
        if self.mode == "out_dtype":  # in blocks of rows: no fp32 temporary beyond the block
            hs = scaled_h.to(self.weight.dtype)
            for v0 in range(0, self.vocab, self.block_rows):
                v1 = min(self.vocab, v0 + self.block_rows)
                if first:
                    _mm_out_fp32(low[:, v0:v1].t(), hs, out=acc[v0:v1])
                else:
                    acc[v0:v1].add_(_mm_out_fp32(low[:, v0:v1].t(), hs))
        elif first:  # fp32 GEMMs straight into the fp32 accumulator
            torch.mm(grad_logits.t(), scaled_h.float(), out=acc)
        else:
            acc.addmm_(grad_logits.t(), scaled_h.float())


# --------------------------------------------------------------------------- chunk log-softmax (backend)
def _log_softmax_chunk(backend, logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """Per-token log-probs and lse of one chunk (n, V) fp32, via the dispatched backend.

    The chunk is seen as one row of n positions, (1, n, V): the chunked torch backend then works on
    blocks of positions instead of looping over n one-position rows. The backend's row sum mixes
    tokens of different rows, so it is dropped and the target logit is gathered here (n reads).
    """
    _, lse = backend.forward(logits.unsqueeze(0), target.unsqueeze(0), ignore_index)
    lse = lse.squeeze(0)
    token_logps = logits.gather(1, target.unsqueeze(1)).squeeze(1) - lse
    return token_logps, lse


def _unit_grad_inplace(backend, logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """logits := onehot(target) − softmax(logits), in place (the backend backward with g = 1)."""
    ones = torch.ones(1, dtype=torch.float32, device=logits.device)
    backend.backward(ones, logits.unsqueeze(0), target.unsqueeze(0), lse.unsqueeze(0).contiguous(), ignore_index, True)
    return logits


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class _Plan:
    """Where the supervised tokens are. All index tensors are (N,) int64, token order = row-major."""

    rows: torch.Tensor  # row of each supervised token
    positions: torch.Tensor  # position of each supervised token
    target: torch.Tensor  # its aligned target id
    n_rows: int
    n_positions: int
    chunk: int  # tokens per chunk
    ignore_index: int
    impl: str

    @property
    def n_tokens(self) -> int:
        return self.rows.numel()

    def spans(self):
        for n0 in range(0, self.n_tokens, max(1, self.chunk)):
            yield n0, min(self.n_tokens, n0 + self.chunk)

    def row_sums(self, token_logps: torch.Tensor) -> torch.Tensor:
        """(R,) sums of token values, in a fixed order (deterministic on every device)."""
        dense = torch.zeros(self.n_rows, self.n_positions, dtype=torch.float32, device=token_logps.device)
        dense[self.rows, self.positions] = token_logps
        return dense.sum(-1)


def _nonzero_exact(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of True in a 1-D mask whose count is already known (no second sync where supported)."""
    try:
        return torch.nonzero_static(mask, size=count).squeeze(1)
    except (AttributeError, NotImplementedError, RuntimeError):
        return mask.nonzero().squeeze(1)


# ------------------------------------------------------------------------------------ forward passes
def _forward_only(hidden, weight, bias, plan: _Plan) -> torch.Tensor:
    """No autograd: 1 GEMM per chunk, one reused chunk buffer, nothing kept."""
    backend = dispatch.backend(plan.impl)
    head = _Head(weight, bias)
    token_logps = torch.empty(plan.n_tokens, dtype=torch.float32, device=hidden.device)
    buffer = torch.empty(plan.chunk, head.vocab, dtype=torch.float32, device=hidden.device)
    for n0, n1 in plan.spans():
        logits = buffer[: n1 - n0]
        head.project(head.operand(hidden[plan.rows[n0:n1], plan.positions[n0:n1]]), logits)
        token_logps[n0:n1], _ = _log_softmax_chunk(backend, logits, plan.target[n0:n1], plan.ignore_index)
    return plan.row_sums(token_logps)


class LinearSequenceLogprobsFunction(torch.autograd.Function):
    """(hidden, weight, bias) -> (R,) fp32 row sums of supervised token log-probs; see the module doc."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: _Plan):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        recompute = need_weight or need_bias  # head trained: D is needed again, with g, in the backward
        backend = dispatch.backend(plan.impl)
        head = _Head(weight, bias)
        device = hidden.device
        token_logps = torch.empty(plan.n_tokens, dtype=torch.float32, device=device)
        lse = torch.empty(plan.n_tokens, dtype=torch.float32, device=device)
        buffer = torch.empty(plan.chunk, head.vocab, dtype=torch.float32, device=device)
        # Frozen head: D W per token, (N, H) fp32, formed here; the backward only scales it by g_tok.
        # Allocated after the first projection, once that chunk's gathered hidden rows are freed, so
        # the two (·, H) blocks never add to the chunk at the same time.
        frozen = need_hidden and not recompute
        back_unscaled = torch.empty(0, head.hidden_size, dtype=torch.float32, device=device)
        for n0, n1 in plan.spans():
            logits, target = buffer[: n1 - n0], plan.target[n0:n1]
            head.project(head.operand(hidden[plan.rows[n0:n1], plan.positions[n0:n1]]), logits)
            token_logps[n0:n1], lse[n0:n1] = _log_softmax_chunk(backend, logits, target, plan.ignore_index)
            last = n1 == plan.n_tokens
            if frozen or (recompute and last):
                grad_logits = _unit_grad_inplace(backend, logits, target, lse[n0:n1], plan.ignore_index)
            if frozen:
                if n0 == 0:
                    back_unscaled = torch.empty(plan.n_tokens, head.hidden_size, dtype=torch.float32, device=device)
                low = grad_logits.to(weight.dtype) if head.mode == "out_dtype" else None
                head.back(grad_logits, low, out=back_unscaled[n0:n1])
        ctx.plan = plan
        ctx.hidden_like = (hidden.shape, hidden.dtype, hidden.device)
        if recompute:
            # The last chunk's D is the one chunk still alive: keep it for the backward instead of
            # recomputing it (1 GEMM of that chunk saved; all of them when everything is one chunk).
            # It lives on ctx, not in save_for_backward, so the backward can drop it once used; a
            # second backward (retain_graph=True) finds None and recomputes that chunk too.
            last_span = (plan.n_tokens - (plan.n_tokens - 1) % plan.chunk - 1, plan.n_tokens) if plan.n_tokens else None
            ctx.kept = (last_span, buffer[: last_span[1] - last_span[0]]) if last_span else None
            ctx.save_for_backward(hidden, weight, bias, lse)
        else:
            ctx.save_for_backward(back_unscaled)
        return plan.row_sums(token_logps)

    @staticmethod
    def backward(ctx, grad_rows):
        plan: _Plan = ctx.plan
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        g_tok = grad_rows.float()[plan.rows]  # (N,) upstream gradient of each token's row
        shape, dtype, device = ctx.hidden_like
        if not (need_weight or need_bias):  # frozen head: D W is ready, no GEMM left
            (back_unscaled,) = ctx.saved_tensors
            grad_hidden = torch.zeros(shape, dtype=dtype, device=device)
            grad_hidden[plan.rows, plan.positions] = (back_unscaled * g_tok.unsqueeze(1)).to(dtype)
            return grad_hidden, None, None, None

        hidden, weight, bias, lse = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None
        backend = dispatch.backend(plan.impl)
        head = _Head(weight, bias)
        weight_acc = torch.empty(weight.shape, dtype=torch.float32, device=device) if need_weight else None
        bias_acc = torch.zeros(head.vocab, dtype=torch.float32, device=device) if need_bias else None
        hidden_sup = None  # (N, H) fp32 ∂/∂h of the supervised rows, allocated once h is freed
        # The last chunk first (it is the kept one, freed before any recompute), then the others; the
        # same order with or without a kept chunk, so the accumulation order never changes.
        spans = list(plan.spans())
        spans = spans[-1:] + spans[:-1]
        buffer = None
        for n0, n1 in spans:
            rows, positions, g = plan.rows[n0:n1], plan.positions[n0:n1], g_tok[n0:n1]
            h = head.operand(hidden[rows, positions])
            if kept is not None and kept[0] == (n0, n1):
                grad_logits = kept[1]
            else:  # recompute L (GEMM) and D in place; lse comes from the forward
                kept = None
                if buffer is None:
                    buffer = torch.empty(plan.chunk, head.vocab, dtype=torch.float32, device=device)
                grad_logits = buffer[: n1 - n0]
                head.project(h, grad_logits)
                _unit_grad_inplace(backend, grad_logits, plan.target[n0:n1], lse[n0:n1], plan.ignore_index)
            low = grad_logits.to(weight.dtype) if head.mode == "out_dtype" else None
            if need_weight:  # h is a fresh gather (n, H): scaled in place
                head.weight_grad(weight_acc, grad_logits, low, h.float().mul_(g.unsqueeze(1)), first=(n0, n1) == spans[0])
            del h
            if need_hidden:
                if hidden_sup is None:
                    hidden_sup = torch.empty(plan.n_tokens, head.hidden_size, dtype=torch.float32, device=device)
                head.back(grad_logits, low, out=hidden_sup[n0:n1]).mul_(g.unsqueeze(1))
            if need_bias:
                bias_acc.addmv_(grad_logits.t(), g)
            del grad_logits, low
        del kept, buffer  # no chunk is alive any more when the (R, T, H) gradient is allocated
        if need_weight and not spans:  # nothing supervised: the accumulator was never written
            weight_acc.zero_()
        grad_hidden = None
        if need_hidden:
            grad_hidden = torch.zeros(shape, dtype=dtype, device=device)
            if hidden_sup is not None:  # None when nothing is supervised
                grad_hidden[plan.rows, plan.positions] = hidden_sup.to(dtype)
        grad_weight = weight_acc.to(weight.dtype) if need_weight else None  # one cast at the end
        grad_bias = bias_acc.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None


# ------------------------------------------------------------------------------------------- public
def _check_inputs(hidden, weight, labels, bias) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be a 3-D tensor (R, T, H); got shape {tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor (V, H); got shape {tuple(getattr(weight, 'shape', ()))}")
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16; got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"weight shape {tuple(weight.shape)} does not match hidden size H = {hidden.shape[2]} (expected (V, {hidden.shape[2]}))"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"bias must be a 1-D tensor of size V = {weight.shape[0]}; got shape {tuple(getattr(bias, 'shape', ()))}"
            )
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {bias.dtype} does not match weight dtype {weight.dtype}")
        if bias.device != weight.device:
            raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")
    check_labels_tensor(labels, hidden.shape[:2], hidden.device, name="hidden")


def linear_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
    *,
    check_labels: bool = True,
    impl: str | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Per-sequence sum (or mean) of label log-probs under logits = hidden @ weightᵀ + bias.

    Same value as `sequence_logprobs(hidden @ weight.T + bias, labels, ...)`, but only supervised
    positions go through the LM head, in chunks; the (R, T, V) logits never exist.

    hidden: (R, T, H) float32 / bfloat16 / float16, any strides.
    weight: (V, H) the LM head, same dtype and device as hidden.
    labels: (R, T) integer; `shift=True` is the Hugging Face convention (labels[r, t + 1] is scored by
        position t). Positions equal to `ignore_index` cost nothing and get a zero gradient.
    bias: (V,) or None, same dtype as weight.
    average: divide each row by its number of supervised positions (rows with none give 0).
    check_labels: raise on a label outside [0, V) (folded into the call's one host sync).
    impl: backend for the per-chunk log-softmax: "triton", "native", "torch" or "reference" (the
        plain full-logits reference); default from `dispatch`.
    chunk_tokens: supervised tokens per chunk; default from CHUNK_BYTES (see `chunk_tokens_for`).
    returns: (R,) float32. Gradients flow to hidden, weight and bias (weight/bias in fp32, cast once).
    Under torch.no_grad() (or with nothing requiring grad) nothing is kept for a backward.
    """
    _check_inputs(hidden, weight, labels, bias)
    vocab = weight.shape[0]
    impl = dispatch.resolve_impl(hidden.device, impl)
    if impl == "reference":
        if check_labels:
            check_label_range(labels, vocab, ignore_index, shift)
        return linear_sequence_logprobs_ref(hidden, weight, labels, bias, ignore_index=ignore_index, shift=shift, average=average)
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int; got {chunk_tokens!r}")

    target = aligned_targets(labels, ignore_index, shift)  # (R, T) int64
    supervised = target != ignore_index
    if check_labels:
        bad = supervised & ((target < 0) | (target >= vocab))
        # CPU–GPU sync point (the one per call): the token count, and the bad-label count with it.
        n_tokens, n_bad = torch.stack([supervised.sum(), bad.sum()]).tolist()
        if n_bad:
            check_label_range(labels, vocab, ignore_index, shift)  # raises, naming the first bad label
        del bad
    else:
        n_tokens = int(supervised.sum())  # CPU–GPU sync point (the one per call)
    flat = _nonzero_exact(supervised.view(-1), n_tokens)
    n_positions = hidden.shape[1]
    needs_grad = hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    with_autograd = torch.is_grad_enabled() and needs_grad
    plan = _Plan(
        rows=flat // n_positions,
        positions=flat % n_positions,
        target=target.view(-1)[flat],
        n_rows=hidden.shape[0],
        n_positions=n_positions,
        chunk=min(chunk_tokens, n_tokens) if chunk_tokens else chunk_tokens_for(n_tokens, vocab, hidden.device, hidden.dtype),
        ignore_index=ignore_index,
        impl=impl,
    )
    counts = supervised.sum(-1).clamp(min=1) if average else None
    del target, supervised, flat  # (R, T) temporaries: dead before the chunk buffer is allocated
    if with_autograd:
        logps = LinearSequenceLogprobsFunction.apply(hidden, weight, bias, plan)
    else:  # forward only (the reference pass): nothing is kept for a backward
        logps = _forward_only(hidden, weight, bias, plan)
    if average:
        logps = logps / counts
    return logps
