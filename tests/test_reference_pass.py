"""The reference pass: what its fingerprint covers (a changed processor refuses the cache), which
(record, epoch) entries it scores, and how many forwards that costs."""
import json

import pytest
import torch

from mdpo.config import load_config
from mdpo.data import make_sample
from mdpo.models import save_preset
from mdpo.reference_cache import StaleCacheError
from mdpo.reference_pass import compute_reference_cache
from mdpo.train import train


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    make_sample(out, n=16, seed=3, n_eval=0)
    return out / "data.json"


def _overrides(sample, out, model_dir, *extra):
    return [f"data.path={sample}", f"output_dir={out}", f"model.path={model_dir}", "micro_batch_size=2",
            "effective_batch_size=4", "epochs=2", "model.lora_r=4", "model.lora_alpha=8", "progress_bar=false",
            "tensorboard=false", "plots=false", "data.max_length=256", "model.dtype=float32", "max_steps=1", *extra]


def test_a_changed_chat_template_or_image_mean_refuses_the_cache(sample, tmp_path):
    model_dir = save_preset("tiny-llava", tmp_path / "model")
    out = tmp_path / "run"
    train(load_config(None, _overrides(sample, out, model_dir)))
    assert (out / "reference_logps.pt").exists()
    template = model_dir / "chat_template.jinja"
    original = template.read_text()
    template.write_text(original + "{# edited #}")
    assert template.read_text() != original
    def again(name):  # a new run (its own output_dir) reading the first run's cache
        return load_config(None, _overrides(sample, tmp_path / name, model_dir, f"reference.cache_path={out / 'reference_logps.pt'}"))

    with pytest.raises(StaleCacheError, match=r"processor\.chat_template: cache has") as refused:
        train(again("template"))
    assert "image_processor" not in str(refused.value) and "tokenizer.vocab" not in str(refused.value)
    template.write_text(original)
    config_path = model_dir / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["image_processor"]["image_mean"] = [0.5, 0.5, 0.5]
    config_path.write_text(json.dumps(config))
    with pytest.raises(StaleCacheError, match=r"image_processor: cache has") as refused:
        train(again("image-mean"))
    assert "processor.chat_template" not in str(refused.value)


def _lora_policy(sample):
    from mdpo.data import CorruptionConfig, PreferenceCollator, load_records
    from mdpo.models import apply_lora, build_preset
    from mdpo.scoring import SequenceScorer

    loaded = build_preset("tiny-llava", seed=0)
    loaded.model = apply_lora(loaded.model, loaded.family, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # a policy that differs from the reference
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    records = load_records(sample, processor=loaded.processor, max_length=256).records
    collator = PreferenceCollator(loaded.processor, max_length=256, corruption=CorruptionConfig(), family=loaded.family)
    return SequenceScorer(loaded.model, loaded.adapter), collator, records


def test_the_pass_scores_chosen_and_rejected_once_and_corrupted_once_per_epoch(sample, monkeypatch):
    import mdpo.reference_pass as rp
    from mdpo.scoring import reference_logps

    scorer, collator, records = _lora_policy(sample)
    records = records[:5]
    rows = []

    def counting(scorer, batch, reference_model=None):
        rows.append(batch["labels"].shape[0])
        return reference_logps(scorer, batch, reference_model)

    monkeypatch.setattr(rp, "reference_logps", counting)
    fingerprint = {"objective.branches": ["chosen", "rejected", "corrupted"]}
    cache = rp.compute_reference_cache(scorer, records, collator, fingerprint, 3, 2, torch.device("cpu"), None, False)
    assert sum(rows) == 5 * (2 + 3) and max(rows) <= 3 * 2  # not 5 · 3 · 3 rows; no forward wider than training's
    for epoch in (0, 2):  # each entry equals the live reference of the full [chosen | rejected | corrupted] batch
        collator.set_epoch(epoch)
        live = reference_logps(scorer, collator(records[1:4]))
        torch.testing.assert_close(cache.lookup([r.sample_id for r in records[1:4]], epoch), live, rtol=1e-5, atol=1e-4)


def test_a_short_run_scores_only_what_it_reaches_and_a_longer_run_adds_the_rest(sample, tmp_path, capsys):
    from mdpo.train import epoch_order

    model_dir = save_preset("tiny-llava", tmp_path / "model")
    out = tmp_path / "run"
    ids = [r["id"] for r in json.loads(sample.read_text())]
    train(load_config(None, _overrides(sample, out, model_dir, "max_steps=2", "seed=5")))  # 2 steps of 4 pairs
    short = torch.load(out / "reference_logps.pt", weights_only=True)
    first = sorted(ids[i] for i in epoch_order(16, 5, 0)[:8])
    assert sorted(s for s, held in zip(short["sample_ids"], short["pair_held"].tolist()) if held) == first
    assert sorted(s for s, held in zip(short["sample_ids"], short["corrupted_held"][0].tolist()) if held) == first
    assert not short["corrupted_held"][1].any()  # epoch 1 is never reached
    capsys.readouterr()
    # 6 steps: all of epoch 0 and half of epoch 1; the 8 + 8 entries held are reused, the rest added. A new run
    # in the same output_dir overwrites the old run's files but keeps (and extends) its cache.
    train(load_config(None, _overrides(sample, out, model_dir, "max_steps=6", "seed=5", "overwrite_output_dir=true")))
    assert "8 chosen+rejected pairs, 16 corrupted rows) computed" in capsys.readouterr().out
    longer = torch.load(out / "reference_logps.pt", weights_only=True)
    assert longer["pair_held"].all() and longer["corrupted_held"][0].all()
    second = sorted(ids[i] for i in epoch_order(16, 5, 1)[:8])
    assert sorted(s for s, held in zip(longer["sample_ids"], longer["corrupted_held"][1].tolist()) if held) == second
    position = {s: i for i, s in enumerate(longer["sample_ids"])}
    for i, sid in enumerate(short["sample_ids"]):  # entries computed before are kept as they were
        if short["pair_held"][i]:
            assert longer["chosen"][position[sid]] == short["chosen"][i]
            assert longer["corrupted"][0, position[sid]] == short["corrupted"][0, i]


def test_without_a_corrupted_branch_the_pass_scores_the_pairs_only(sample):
    from mdpo.scoring import reference_logps

    scorer, collator, records = _lora_policy(sample)
    fingerprint = {"objective.branches": ["chosen", "rejected"]}
    cache = compute_reference_cache(scorer, records[:3], collator, fingerprint, 1, 2, torch.device("cpu"), None, False)
    assert cache.corrupted is None and cache.n_entries == 3
    live = reference_logps(scorer, collator(records[:3], branches=("chosen", "rejected")))
    torch.testing.assert_close(cache.lookup([r.sample_id for r in records[:3]], 0), live, rtol=1e-5, atol=1e-4)
