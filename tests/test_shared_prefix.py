"""Shared-prefix forward (mdpo.shared_prefix): per-sequence log-probs and LoRA gradients equal the
unshared forward's, for every family it covers, in fp32; the reference cache and a whole tiny training
run too; and the model.shared_prefix setting."""
import logging
import types

import pytest
import torch
from PIL import Image

from mdpo import shared_prefix as sp
from mdpo.config import ConfigError, load_config
from mdpo.data import CorruptionConfig, PreferenceCollator, make_sample
from mdpo.data.records import PreferenceRecord
from mdpo.models import apply_lora, build_preset, enable_gradient_checkpointing, get_adapter
from mdpo.models.adapters import LlavaAdapter
from mdpo.reference_pass import compute_reference_cache
from mdpo.tiny_processors import build_tiny_processor
from mdpo.scoring import SequenceScorer

PRESETS = ["tiny-llava", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-idefics3", "tiny-paligemma"]
LOGP_RTOL, GRAD_RTOL = 1e-5, 1e-4

# Pairs chosen on purpose: y_l longer than y_w, the reverse, prompts and images of different sizes
# (Qwen: different image token counts); `_cut_response` below makes one-token responses.
QUESTIONS = ["What is in the image?", "Describe the colours and the shapes you can see in this picture, please.",
             "Count?", "Where is the red circle, and how big is it compared with the blue square next to it?"]
CHOSEN = ["A red circle.", "Two blue squares at the top left and one green triangle below them.", "Three.",
          "Top left, about half the size of the square."]
REJECTED = ["Two blue squares at the top left of a big white field with a small dog.", "A cat.",
            "There are seven of them, all purple.", "Bottom right."]
SIZES = [(64, 64), (96, 48), (48, 80), (128, 40)]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    out = []
    for i, size in enumerate(SIZES):
        path = folder / f"{i}.png"
        Image.new("RGB", size, (60 * i, 200 - 40 * i, 90)).save(path)
        out.append(PreferenceRecord(index=i, sample_id=f"s{i}", image_path=str(path), chosen=CHOSEN[i],
                                    rejected=REJECTED[i], shape="plain", question=QUESTIONS[i]))
    return out


_POLICIES = {}


def _policy(preset):
    """A tiny fp32 model with LoRA (no dropout) whose B matrices are non-zero, built once per preset."""
    if preset not in _POLICIES:
        loaded = build_preset(preset, seed=0, dtype="float32")
        loaded.model = apply_lora(loaded.model, loaded.family, r=8, alpha=16, dropout=0.0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in loaded.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        _POLICIES[preset] = loaded
    return _POLICIES[preset]


def _collator(loaded, objective="mdpo", max_length=512):
    return PreferenceCollator(loaded.processor, objective=objective, max_length=max_length,
                              corruption=CorruptionConfig(), family=loaded.family)


def _cut_response(batch, row, keep):
    """Keep only the first `keep` response tokens of `row` (right padding, as the collator pads)."""
    start = int((batch["labels"][row] != -100).nonzero()[0])
    end = start + keep
    batch["labels"][row, end:] = -100
    batch["attention_mask"][row, end:] = 0
    batch["input_ids"][row, end:] = batch["input_ids"][row, end - 1]  # any id but an image token
    return batch


def _logps_and_grads(scorer, batch):
    scorer.model.zero_grad(set_to_none=True)
    logps = scorer(batch)
    upstream = torch.randn(logps.shape, generator=torch.Generator().manual_seed(7))  # random upstream gradient
    (logps * upstream).sum().backward()
    grads = {n: p.grad.clone() for n, p in scorer.model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def _assert_same(loaded, batch, **scorer_kwargs):
    """Shared and unshared scorers agree on log-probs (1e-5) and LoRA gradients (1e-4); returns token counts."""
    off = SequenceScorer(loaded.model, loaded.adapter, shared_prefix="off", **scorer_kwargs)
    on = SequenceScorer(loaded.model, loaded.adapter, shared_prefix="on", **scorer_kwargs)
    assert on.shares_prefix and not off.shares_prefix
    ref_logps, ref_grads = _logps_and_grads(off, batch)
    logps, grads = _logps_and_grads(on, batch)
    torch.testing.assert_close(logps, ref_logps, rtol=LOGP_RTOL, atol=0)
    assert ref_grads and grads.keys() == ref_grads.keys()
    assert all("lora_" in n for n in grads)
    for name, g in ref_grads.items():
        rel = ((grads[name] - g).norm() / g.norm()).item()
        assert rel < GRAD_RTOL, (name, rel)
    return sp.packed_token_counts(batch, loaded.model, loaded.adapter)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("pairs", [1, 3])
def test_shared_logps_and_lora_grads_equal_unshared(preset, pairs, records, monkeypatch):
    loaded = _policy(preset)
    if pairs == 1:  # packed pairs and corrupted rows padded into one forward (else: two forwards)
        monkeypatch.setattr(sp, "SEPARATE_FORWARDS", False)
    chunk = [records[2]] if pairs == 1 else [records[0], records[1], records[3]]
    batch = _collator(loaded)(chunk)
    rows = batch["labels"].shape[0]
    _cut_response(batch, 0, 1)  # a one-token y_w
    if pairs == 3:
        _cut_response(batch, pairs + 2, 1)  # a one-token y_l
    if loaded.family.startswith("qwen") and pairs == 3:  # dynamic resolution: images of different token counts
        assert len({tuple(g) for g in batch["image_grid_thw"].tolist()}) == 3
    assert bool((batch["attention_mask"] == 0).any())  # rows are padded
    groups = sp._plan(loaded.model, loaded.adapter, batch)[4]
    assert len(groups) == (1 if pairs == 1 else 2)
    unshared, shared = _assert_same(loaded, batch)
    assert rows == 3 * pairs and shared < unshared  # the packed forward was taken and saves tokens


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-qwen2-vl"])
@pytest.mark.parametrize("objective", ["dpo", "dpo_no_image"])
def test_two_branch_objectives_share_too(preset, objective, records):
    loaded = _policy(preset)
    batch = _collator(loaded, objective)(records[:2])
    assert batch["labels"].shape[0] == 4
    unshared, shared = _assert_same(loaded, batch)
    assert shared < unshared


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-qwen2-vl", "tiny-paligemma"])
def test_eager_attention(preset, records):
    """Eager attention adds the mask to the scores: an additive float mask is right there too."""
    loaded = build_preset(preset, seed=0, dtype="float32", attn_implementation="eager")
    loaded.model = apply_lora(loaded.model, loaded.family, r=8, alpha=16, dropout=0.0)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    assert sp.attn_implementation(loaded.adapter, loaded.model) == "eager"
    _assert_same(loaded, _collator(loaded)(records[:2]))


def test_llava_next_any_resolution(records):
    """LLaVA-NeXT: `pixel_values` (rows, tiles, C, H, W) + `image_sizes`; images of different aspect
    ratios get different tile grids and image token counts."""
    import transformers

    from mdpo.tiny_processors import _image_processor_class

    base = build_tiny_processor("llava")
    pins = [[28, 56], [56, 28], [56, 56]]
    image_processor = _image_processor_class("LlavaNextImageProcessor")(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=pins)
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=base.tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=base.chat_template)
    tok = base.tokenizer
    config = transformers.LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=28, patch_size=14, projection_dim=32, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pins, vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlavaNextForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                                            dtype=torch.float32).eval()
    model = apply_lora(model, "llava", r=8, alpha=16, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    loaded = types.SimpleNamespace(model=model, adapter=get_adapter("llava"))
    batch = PreferenceCollator(processor, objective="mdpo", max_length=512, family="llava")(records[1:4])
    assert batch["pixel_values"].dim() == 5 and "image_sizes" in batch
    image_tokens = (batch["input_ids"] == config.image_token_id).sum(1)
    assert len(set(image_tokens.tolist())) > 1
    unshared, shared = _assert_same(loaded, batch)
    assert shared < unshared


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-qwen2-vl"])
def test_the_vision_tower_sees_each_image_once(preset, records):
    loaded = _policy(preset)
    batch = _collator(loaded)(records[:2])  # 6 rows, 4 distinct images (2 originals, 2 corrupted)
    inner = loaded.adapter.inner_model(loaded.model)
    tower = inner.vision_tower if hasattr(inner, "vision_tower") else inner.visual
    seen = []
    hook = tower.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        (kwargs.get("pixel_values") if kwargs.get("pixel_values") is not None else args[0]).shape[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            SequenceScorer(loaded.model, loaded.adapter, shared_prefix="off")(batch)
            unshared, seen[:] = sum(seen), []
            SequenceScorer(loaded.model, loaded.adapter, shared_prefix="on")(batch)
    finally:
        hook.remove()
    if loaded.family == "llava":
        assert (unshared, sum(seen)) == (6, 4)
    else:  # flattened patches: the shared forward sends the chosen and corrupted images' patches only
        sizes = batch["image_grid_thw"].prod(-1)
        assert (unshared, sum(seen)) == (int(sizes.sum()), int(sizes[:2].sum() + sizes[4:].sum()))


def test_a_pair_whose_prefixes_differ_is_scored_unshared(records):
    loaded = _policy("tiny-llava")
    batch = _collator(loaded)(records[:2])
    last_prompt = int((batch["labels"][2] != -100).nonzero()[0]) - 1
    batch["input_ids"][2, last_prompt] = batch["input_ids"][0, -1] * 0 + 5  # rejected row of pair 0: another prompt token
    assert batch["input_ids"][0, last_prompt] != 5
    plan = sp._plan(loaded.model, loaded.adapter, batch)
    assert sum(len(row.segments) == 3 for row in plan[1]) == 1  # only pair 1 is packed
    _assert_same(loaded, batch)


def test_gradient_checkpointing_and_length_averaging(records):
    loaded = build_preset("tiny-llava", seed=0, dtype="float32")
    loaded.model = apply_lora(loaded.model, loaded.family, r=8, alpha=16, dropout=0.0)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    enable_gradient_checkpointing(loaded.model)
    loaded.model.train()
    _assert_same(loaded, _collator(loaded)(records[:2]), average=True)


def test_the_check_can_fail(records, monkeypatch):
    """The two silent mistakes the mechanism avoids change the numbers far beyond the tolerance:
    y_l attending to y_w, and y_l's positions continuing after y_w."""
    loaded = _policy("tiny-qwen2-vl")
    batch = _collator(loaded)(records[:2])
    off = SequenceScorer(loaded.model, loaded.adapter, shared_prefix="off")
    on = SequenceScorer(loaded.model, loaded.adapter, shared_prefix="on")

    def max_rel_error():
        with torch.no_grad():
            return ((on(batch) - expected) / expected).abs().max().item()

    with torch.no_grad():
        expected = off(batch)
    assert max_rel_error() < LOGP_RTOL
    real_mask, real_positions = sp._additive_mask, sp._unshared_positions
    monkeypatch.setattr(sp, "_additive_mask", lambda seg, **kw: real_mask(seg.clamp(max=1), **kw))  # y_l sees y_w
    assert max_rel_error() > 10 * LOGP_RTOL
    monkeypatch.setattr(sp, "_additive_mask", real_mask)
    supervised = batch["labels"] != -100

    def after_y_w(model, adapter, inputs):
        positions = real_positions(model, adapter, inputs).clone()
        for i in range(2):
            start = int(supervised[2 + i].nonzero()[0])
            positions[..., 2 + i, start:] += int(supervised[i].sum())
        return positions

    monkeypatch.setattr(sp, "_unshared_positions", after_y_w)
    assert max_rel_error() > 10 * LOGP_RTOL


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-qwen2-vl"])
def test_cached_reference_shared_equals_unshared(preset, records):
    loaded = _policy(preset)
    collator = _collator(loaded)
    fingerprint = {"objective.branches": ["chosen", "rejected", "corrupted"]}
    caches = [compute_reference_cache(SequenceScorer(loaded.model, loaded.adapter, shared_prefix=mode), records,
                                      collator, fingerprint, 2, 3, torch.device("cpu"), None, False) for mode in ("off", "on")]
    for name in ("chosen", "rejected", "corrupted"):
        torch.testing.assert_close(getattr(caches[1], name), getattr(caches[0], name), rtol=LOGP_RTOL, atol=0)


def test_a_tiny_training_run_matches_the_unshared_run(tmp_path):
    import json

    from mdpo.train import train

    sample = make_sample(tmp_path / "sample", n=8, seed=3)
    losses = {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        train(load_config(None, [f"data.path={sample}", f"output_dir={out}", "model.preset=tiny-llava", "max_steps=10",
                                 "micro_batch_size=2", "effective_batch_size=2", "epochs=3", "lr=1e-3", "model.lora_r=8",
                                 "model.lora_alpha=16", "model.lora_dropout=0", "progress_bar=false", "tensorboard=false",
                                 "plots=false", "data.max_length=256", "model.dtype=float32", f"model.shared_prefix={mode}"]))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = torch.tensor([row["loss/total"] for row in rows], dtype=torch.float64)
    assert len(losses["on"]) == 10
    assert bool((losses["on"][-1] != losses["on"][0]))  # the run learned something
    torch.testing.assert_close(losses["on"], losses["off"], rtol=1e-4, atol=1e-6)


class _OtherFamily(LlavaAdapter):
    family = "other"


def test_shared_prefix_setting(monkeypatch, caplog):
    loaded = _policy("tiny-llava")
    with pytest.raises(ConfigError, match="model.shared_prefix"):
        load_config(None, ["model.preset=tiny-llava", "model.shared_prefix=sometimes"])
    assert load_config(None, ["model.preset=tiny-llava", "model.shared_prefix=off"]).model.shared_prefix == "off"  # YAML reads off as false
    assert load_config(None, ["model.preset=tiny-llava", "model.shared_prefix=on"]).model.shared_prefix == "on"
    assert load_config(None, ["model.preset=tiny-llava"]).model.shared_prefix == "auto"
    assert SequenceScorer(loaded.model, loaded.adapter).shares_prefix  # auto: on where supported
    with pytest.raises(ConfigError, match="'other'"):
        SequenceScorer(loaded.model, _OtherFamily(), shared_prefix="on")
    monkeypatch.setattr(sp, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="mdpo.shared_prefix"):
        assert not SequenceScorer(loaded.model, _OtherFamily()).shares_prefix
    assert "'other'" in caplog.text and "unshared" in caplog.text
    monkeypatch.setattr(sp, "attn_implementation", lambda adapter, model: "flash_attention_2")
    with pytest.raises(ConfigError, match="flash_attention_2"):
        SequenceScorer(loaded.model, loaded.adapter, shared_prefix="on")
    assert not SequenceScorer(loaded.model, loaded.adapter).shares_prefix


def test_the_fingerprint_does_not_depend_on_the_setting(tmp_path):
    from mdpo.reference_pass import run_fingerprint

    sample = make_sample(tmp_path, n=2, seed=0)
    loaded = _policy("tiny-llava")
    prints = [run_fingerprint(load_config(None, [f"data.path={sample}", "model.preset=tiny-llava",
                                                 f"model.shared_prefix={mode}"]), loaded, 2, 1) for mode in ("on", "off")]
    assert prints[0] == prints[1]
