"""Shared-prefix forward: the chosen and rejected rows of a pair share (image, prompt); compute it once.

The collator's batch has rows [chosen | rejected | corrupted] (B pairs → 3B rows; 2B without the
corrupted branch). Chosen row c = (m_w, q, y_w) and rejected row r = (m_w, q, y_l) begin with the same
prefix — BOS, ~576 image tokens (LLaVA-1.5), the prompt — so the unshared forward computes that
prefix, and runs the vision tower on its image, twice. Here each pair becomes one packed row

    [prefix | y_w | y_l]        y_l attends to the prefix and to itself, never to y_w; its position ids
                                are the ones the unshared rejected row has (they continue from the
                                prefix as if y_w were absent)
    [prefix' | y_w]             the corrupted branch (another image: nothing to share)

so the language model processes P + |y_w| + |y_l| tokens per pair instead of 2P + |y_w| + |y_l|, and
the vision tower runs once per distinct image. y_l's first token is scored from the prefix's last
state. `scoring_inputs` returns hidden states gathered back into the usual row order, so the LM head,
`MDPOLoss`, the reference cache and the metrics see exactly the rows they always did.

Mechanism: an additive float 4-D attention mask (0 where a query may attend, finfo(dtype).min
elsewhere; transformers passes a 4-D mask through unchanged) plus explicit position ids copied from
the unshared rows. Chosen over a prefix forward whose key/value cache feeds both continuations
because it is one ordinary forward: it works under gradient checkpointing (which drops the cache),
with SDPA, eager and flex attention on every device, and the family-specific code is three small
hooks below (position ids, pixel layout, PaliGemma's bidirectional prefix). A boolean mask would be
silently wrong: eager and flex attention *add* the mask. flash_attention_2 cannot express the mask;
such models take the unshared path.

Position ids are never re-derived for the packed layout: the family's own rule is applied to the
unshared batch (Qwen2-VL / Qwen2.5-VL: `get_rope_index`, three M-RoPE streams; PaliGemma: 1-based;
others: 0, 1, 2, …) and each packed token takes the position of the unshared token it stands for. For
Qwen that is the same as running get_rope_index on the packed row and shifting y_l's three streams
back by |y_w|, without relying on how get_rope_index treats a packed row.

Exactness: every query attends to the same set of keys, with the same positions, as in the unshared
forward; masked keys get weight exp(min − max) = 0. Only summation order differs (~1e-6 in fp32).
A pair whose prefixes differ (e.g. truncation cut the prompt for the longer response only, or a
hand-made batch with different images) is packed as two unshared rows; a batch that does not have
the collator's layout (no `num_pairs`, left padding, videos, `inputs_embeds`) goes the unshared way
whole. Cost of the plan: one copy of labels / attention_mask / token ids to the host (a CPU–GPU sync
point, R·T integers) and one comparison of each pair's pixel inputs.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Mapping

import torch

logger = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
# Families whose layout the mechanism covers (tests/test_shared_prefix.py checks each one's tiny preset).
SUPPORTED_FAMILIES = ("llava", "qwen2-vl", "qwen2.5-vl", "idefics3", "paligemma")
# Attention implementations that take an arbitrary additive 4-D mask.
_MASK_ATTENTION = ("sdpa", "eager", "flex_attention")
_QWEN = ("qwen2-vl", "qwen2.5-vl")
_VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")

# Packed pairs and unshared rows (the corrupted branch) in separate forwards when that saves padding.
SEPARATE_FORWARDS = True
_WARNED: set[str] = set()
# Segment ids of a packed token.
_PAD, _PREFIX = -1, 0


def attn_implementation(adapter, model) -> str:
    """The language model's attention implementation ("sdpa", "eager", "flash_attention_2", …)."""
    config = adapter.unwrap(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return str(getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None) or "sdpa")


def unsupported_reason(adapter, model) -> str | None:
    """Why this model cannot share prefixes (None: it can)."""
    if adapter.family not in SUPPORTED_FAMILIES:
        return f"family {adapter.family!r} is not covered (covered: {', '.join(SUPPORTED_FAMILIES)})"
    attn = attn_implementation(adapter, model)
    if attn not in _MASK_ATTENTION:
        return f"attention implementation {attn!r} cannot take a 4-D mask (needs one of {', '.join(_MASK_ATTENTION)})"
    return None


def resolve(setting: str, adapter, model) -> bool:
    """model.shared_prefix → whether the scorer shares prefixes.

    auto: on where supported, else one log line and the unshared path; on: a ConfigError naming the
    family (or attention implementation) when unsupported; off: never.
    """
    from .config import ConfigError

    if setting not in MODES:
        raise ConfigError(f"model.shared_prefix={setting!r} is not one of {list(MODES)}")
    if setting == "off":
        return False
    reason = unsupported_reason(adapter, model)
    if reason is None:
        return True
    if setting == "on":
        raise ConfigError(f"model.shared_prefix=on: {reason}; use auto or off")
    if reason not in _WARNED:  # once per reason, not once per scorer (reference_logps builds one per batch)
        _WARNED.add(reason)
        logger.warning("shared prefix off: %s; chosen and rejected rows are scored unshared", reason)
    return False


# ------------------------------------------------------------------------------------ the plan
@dataclass
class _PackedRow:
    """One packed sequence: segments (source row, start, stop) laid end to end; segment 0 is the prefix."""

    segments: list[tuple[int, int, int]]
    pixel_row: int  # the unshared row whose pixel inputs (the prefix's image) this row takes

    @property
    def length(self) -> int:
        return sum(b - a for _, a, b in self.segments)


def scoring_inputs(model, adapter, batch: Mapping[str, Any], single_forward: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Hidden states and labels of every row of `batch`, from the shared-prefix forward.

    batch: the collator's dict (rows [chosen | rejected | corrupted], right padding, `num_pairs`).
    Returns (hidden (R, M, H), labels (R, M)) with M = the longest response: hidden[r, s] is the
    state that predicts labels[r, s] (score with shift=False) — the same states, row for row, as
    the unshared forward's; or None when the batch does not have the collator's layout (the caller
    runs the unshared forward). single_forward: the packed rows always go through the model in one
    forward (see `SequenceScorer`), never split by length.
    """
    plan = _plan(model, adapter, batch, single_forward)
    if plan is None:
        return None
    inputs, rows, prompt, length, groups, pixel_rows = plan
    labels = batch["labels"]
    device = labels.device
    n_rows = labels.shape[0]
    resp = [length[r] - prompt[r] for r in range(n_rows)]
    width = max(resp)
    labels_cpu = labels.cpu()
    out_labels = torch.full((n_rows, width), -100, dtype=labels.dtype)
    for r in range(n_rows):
        out_labels[r, : resp[r]] = labels_cpu[r, prompt[r] : length[r]]
    positions = _unshared_positions(model, adapter, inputs)
    dtype = adapter.inner_model(model).get_input_embeddings().weight.dtype  # the mask is added to scores of this dtype
    pieces, order = [], []
    for group in groups:
        packed, where = _pack(adapter, inputs, positions, pixel_rows, [rows[j] for j in group], dtype)
        hidden = adapter.hidden_states(model, packed)  # (N, L, H)
        n, seq, h = hidden.shape
        index = torch.zeros(len(where), width, dtype=torch.long)
        for i, (r, start_row, prefix_end, cont_start) in enumerate(where):
            base = start_row * seq
            index[i, 0] = base + prefix_end - 1  # the prefix's last state predicts the first response token
            if resp[r] > 1:
                index[i, 1 : resp[r]] = base + cont_start + torch.arange(resp[r] - 1)
        pieces.append(hidden.reshape(n * seq, h).index_select(0, index.flatten().to(device)).view(len(where), width, h))
        order += [r for r, *_ in where]
    hidden = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    inverse = torch.empty(n_rows, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(n_rows)
    if order != list(range(n_rows)):
        hidden = hidden.index_select(0, inverse.to(device))
    return hidden, out_labels.to(device)


def packed_token_counts(batch: Mapping[str, Any], model=None, adapter=None) -> tuple[int, int]:
    """(tokens the language model processes unshared, shared) for one batch, padding included.

    Unshared: R · T. Shared: the padded sizes of the packed forwards (what `scoring_inputs` runs).
    """
    rows, cols = batch["labels"].shape
    plan = _plan(model, adapter, batch) if adapter is not None else None
    if plan is None:
        return rows * cols, rows * cols
    _, packed_rows, _, _, groups, _ = plan
    shared = sum(len(g) * max(packed_rows[j].length for j in g) for g in groups)
    return rows * cols, shared


def _plan(model, adapter, batch, single_forward: bool = False):
    """(inputs, packed rows, prompt lengths, row lengths, forward groups, pixel slices), or None if the batch
    does not have the collator's layout."""
    pairs = batch.get("num_pairs")
    labels = batch.get("labels")
    if not isinstance(pairs, int) or labels is None or labels.dim() != 2:
        return None
    n_rows, seq = labels.shape
    if pairs < 1 or n_rows not in (2 * pairs, 3 * pairs):
        return None
    inputs = adapter.model_inputs(model, batch)
    mask = inputs.get("attention_mask")
    if "input_ids" not in inputs or "inputs_embeds" in inputs or mask is None or mask.shape != labels.shape:
        return None
    if any(k in inputs for k in _VIDEO_KEYS):
        return None
    mask_cpu, labels_cpu = mask.cpu().long(), labels.cpu()
    length = mask_cpu.sum(1)
    if not torch.equal(mask_cpu, (torch.arange(seq)[None] < length[:, None]).long()):
        return None  # not right-padded
    supervised = labels_cpu != -100
    if not bool(supervised.any(1).all()) or bool((supervised & (mask_cpu == 0)).any()):
        return None
    prompt = supervised.long().argmax(1)  # first supervised position
    if bool((prompt < 1).any()):
        return None
    length, prompt = length.tolist(), prompt.tolist()
    token_keys = [k for k, v in inputs.items()
                  if k != "attention_mask" and torch.is_tensor(v) and v.shape == labels.shape]
    tokens_cpu = {k: inputs[k].cpu() for k in token_keys}
    pixel_rows = _pixel_slicer(adapter, inputs, n_rows)
    if pixel_rows is None:
        return None
    if adapter.family == "paligemma" and "token_type_ids" in tokens_cpu:
        # the model's bidirectional block is token_type_ids == 0: it must be exactly the prompt
        tt = tokens_cpu["token_type_ids"]
        for r in range(n_rows):
            if bool((tt[r, : prompt[r]] != 0).any()) or bool((tt[r, prompt[r] : length[r]] == 0).any()):
                return None
    shared = [prompt[i] == prompt[pairs + i]
              and all(torch.equal(t[i, : prompt[i]], t[pairs + i, : prompt[i]]) for t in tokens_cpu.values())
              for i in range(pairs)]
    shared = _same_pixels(inputs, pixel_rows, pairs, shared)
    rows: list[_PackedRow] = []
    for i in range(pairs):
        c, r = i, pairs + i
        if shared[i]:
            rows.append(_PackedRow([(c, 0, prompt[c]), (c, prompt[c], length[c]), (r, prompt[r], length[r])], c))
    paired = list(range(len(rows)))
    for i in range(pairs):
        if not shared[i]:
            rows += [_PackedRow([(x, 0, prompt[x]), (x, prompt[x], length[x])], x) for x in (i, pairs + i)]
    rows += [_PackedRow([(k, 0, prompt[k]), (k, prompt[k], length[k])], k) for k in range(2 * pairs, n_rows)]
    single = list(range(len(paired), len(rows)))
    groups = [g for g in (paired, single) if g]
    # The two kinds of rows differ in length by a response: one forward would pad the shorter kind
    # (LLaVA-1.5 at 576 image tokens, 1 pair: 2 × 836 tokens instead of 836 + 736, 1.73 instead of 1.64
    # model TFLOP per step; benchmarks/RESULTS.md). Separate forwards unless that saves nothing.
    if len(groups) == 2:
        lengths = [row.length for row in rows]
        together = len(rows) * max(lengths)
        apart = sum(len(g) * max(lengths[j] for j in g) for g in groups)
        if apart >= together or not SEPARATE_FORWARDS or single_forward:
            groups = [paired + single]
    return inputs, rows, prompt, length, groups, pixel_rows


def _pixel_slicer(adapter, inputs, n_rows):
    """{pixel key: list of per-row index ranges along dim 0}; None when a key's layout is not one image per row."""
    keys = [k for k in adapter.pixel_keys if k in inputs and k not in ("mm_token_type_ids", "token_type_ids")]
    slices: dict[str, list[tuple[int, int]]] = {}
    if adapter.family in _QWEN and "image_grid_thw" in inputs:
        grid = inputs["image_grid_thw"]
        if grid.shape[0] != n_rows:
            return None
        sizes = grid.prod(-1).tolist()
        starts = [0]
        for s in sizes:
            starts.append(starts[-1] + s)
        if starts[-1] != inputs["pixel_values"].shape[0]:
            return None
        slices["pixel_values"] = [(starts[r], starts[r + 1]) for r in range(n_rows)]
        slices["image_grid_thw"] = [(r, r + 1) for r in range(n_rows)]
        keys = [k for k in keys if k not in slices]
    for k in keys:
        value = inputs[k]
        if not torch.is_tensor(value) or value.dim() == 0 or value.shape[0] != n_rows:
            return None
        slices[k] = [(r, r + 1) for r in range(n_rows)]
    return slices


def _same_pixels(inputs, pixel_rows, pairs, shared):
    """Keep only the pairs whose chosen and rejected rows carry identical pixel inputs."""
    out = list(shared)
    for key, ranges in pixel_rows.items():
        value = inputs[key]
        for i in range(pairs):
            if out[i]:
                (a, b), (c, d) = ranges[i], ranges[pairs + i]
                out[i] = (b - a) == (d - c) and torch.equal(value[a:b], value[c:d])
    return out


# ------------------------------------------------------------------------------- family hooks
def _unshared_positions(model, adapter, inputs) -> torch.Tensor:
    """Position ids of the unshared batch, as the family's forward computes them: (R, T) or (3, R, T)."""
    ids = inputs["input_ids"]
    if inputs.get("position_ids") is not None:
        return inputs["position_ids"]
    n_rows, seq = ids.shape
    arange = torch.arange(seq, device=ids.device)
    if adapter.family in _QWEN:
        if inputs.get("image_grid_thw") is None:  # text only: the language model's own 0, 1, 2, …
            return arange.view(1, 1, -1).expand(3, n_rows, -1)
        inner = adapter.inner_model(model)
        accepted = inspect.signature(inner.get_rope_index).parameters
        kwargs = {k: inputs.get(k) for k in ("mm_token_type_ids", "image_grid_thw", "attention_mask")
                  if k in accepted}
        positions, _ = inner.get_rope_index(ids, **kwargs)
        return positions
    if adapter.family == "paligemma":  # 1-based positions
        return (arange + 1).view(1, -1).expand(n_rows, -1)
    return arange.view(1, -1).expand(n_rows, -1)


def _pack(adapter, inputs, positions, pixel_rows, rows: list[_PackedRow], dtype: torch.dtype):
    """The inputs of one packed forward, and where each source row's states land.

    Returns (model inputs with a 4-D additive mask and explicit position ids,
    [(source row, packed row, prefix end, start of its continuation)]).
    """
    ids = inputs["input_ids"]
    device, seq = ids.device, ids.shape[1]
    width = max(row.length for row in rows)
    source = torch.zeros(len(rows), width, dtype=torch.long)  # flat index r * T + t into the unshared (R, T)
    segment = torch.full((len(rows), width), _PAD, dtype=torch.long)
    where = []
    for j, row in enumerate(rows):
        at = 0
        for s, (r, a, b) in enumerate(row.segments):
            source[j, at : at + b - a] = r * seq + torch.arange(a, b)
            segment[j, at : at + b - a] = s
            if s > 0:
                where.append((r, j, row.segments[0][2], at))
            at += b - a
        source[j, at:] = source[j, at - 1]  # padding repeats the last real token (never an image token)
    src = source.flatten().to(device)
    packed: dict[str, Any] = {}
    for key, value in inputs.items():
        if key == "attention_mask" or not torch.is_tensor(value) or value.shape != ids.shape:
            continue
        packed[key] = value.reshape(-1).index_select(0, src).view(len(rows), width)
    if positions.dim() == 3:  # M-RoPE: (3, R, T)
        packed["position_ids"] = positions.reshape(positions.shape[0], -1).index_select(1, src).view(-1, len(rows), width)
    else:
        packed["position_ids"] = positions.reshape(-1).index_select(0, src).view(len(rows), width)
    packed["attention_mask"] = _additive_mask(segment, bidirectional_prefix=adapter.family == "paligemma",
                                              dtype=dtype, device=device)
    for key, ranges in pixel_rows.items():
        value = inputs[key]
        parts = [value[slice(*ranges[row.pixel_row])] for row in rows]
        packed[key] = torch.cat(parts) if len(parts) > 1 else parts[0]
    return packed, where


def _additive_mask(segment: torch.Tensor, *, bidirectional_prefix: bool, dtype: torch.dtype, device) -> torch.Tensor:
    """(N, 1, L, L) additive mask: 0 where query q may attend to key k, finfo(dtype).min elsewhere.

    Allowed: k ≤ q, k not padding, and k in the prefix or in q's own segment (y_l never sees y_w);
    with a bidirectional prefix (PaliGemma) also every prefix key from a prefix query. A padding
    query attends to itself only (no all-masked rows).
    """
    seg = segment.to(device)
    width = seg.shape[1]
    idx = torch.arange(width, device=device)
    q, k = seg[:, :, None], seg[:, None, :]
    causal = idx[:, None] >= idx[None, :]
    allowed = (k != _PAD) & ((k == _PREFIX) | (k == q))
    if bidirectional_prefix:
        allowed = allowed & (causal | ((q == _PREFIX) & (k == _PREFIX)))
    else:
        allowed = allowed & causal
    allowed = allowed | torch.eye(width, dtype=torch.bool, device=device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)
