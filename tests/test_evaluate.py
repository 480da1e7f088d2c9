"""Held-out evaluation (`mdpo.evaluate` and `data.eval_path` in mdpo-train) on a tiny random LLaVA."""
import json
import math
from pathlib import Path

import pytest
import torch

from mdpo.config import ConfigError, load_config
from mdpo.data import CorruptionConfig, PreferenceCollator, load_records, make_sample
from mdpo.evaluate import evaluate
from mdpo.loss import MDPOLoss
from mdpo.models import apply_lora, build_preset
from mdpo.reference_cache import StaleCacheError
from mdpo.scoring import SequenceScorer
from mdpo.reference_pass import compute_reference_cache
from mdpo.train import main, train

CPU = torch.device("cpu")
BRANCHES = {"objective.branches": ["chosen", "rejected", "corrupted"]}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    make_sample(out, n=12, seed=5, n_eval=5)
    return out / "data.json", out / "eval.json"


@pytest.fixture(scope="module")
def policy(sample):
    """(scorer, collator, held-out records) with LoRA B drawn away from zero: policy ≠ reference."""
    loaded = build_preset("tiny-llava", seed=0)
    loaded.model = apply_lora(loaded.model, loaded.family, r=8, alpha=16, dropout=0.1)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    records = load_records(sample[1], processor=loaded.processor, max_length=256).records
    collator = PreferenceCollator(loaded.processor, max_length=256, corruption=CorruptionConfig(), family=loaded.family)
    return SequenceScorer(loaded.model, loaded.adapter), collator, records


def _evaluate(policy, **kwargs):
    scorer, collator, records = policy
    kwargs.setdefault("micro_batch_size", 2)
    return evaluate(scorer, MDPOLoss(), records, collator, device=CPU, **kwargs)


def test_cached_and_live_reference_give_the_same_figures(policy):
    scorer, collator, records = policy
    cache = compute_reference_cache(scorer, records, collator, BRANCHES, 1, 2, CPU, None, False)
    cached, live = _evaluate(policy, reference=cache), _evaluate(policy)
    assert cached["pairs"] == live["pairs"] == 5
    assert cached.keys() == live.keys()
    for key in cached:
        assert cached[key] == pytest.approx(live[key], abs=1e-4), key
    assert cached["rewards/chosen"] != 0  # the policy is not the reference


def test_means_are_over_pairs_whatever_the_micro_batch(policy):
    """5 pairs in micro-batches of 2 (2 + 2 + 1) or 3 (3 + 2) or 5: the same per-pair means."""
    by_micro = [_evaluate(policy, micro_batch_size=m) for m in (2, 3, 5)]
    for key in by_micro[0]:
        values = [r[key] for r in by_micro]
        assert values == pytest.approx([values[-1]] * 3, rel=1e-5, abs=1e-5), key  # fp32 sums of ~-90


def test_shards_over_processes_add_up_to_one_process(policy):
    whole = _evaluate(policy)
    shard_totals = {}

    def keep(totals):  # process 1 of 2: remember its sums
        shard_totals[1] = totals.clone()
        return totals

    _evaluate(policy, rank=1, world=2, reduce_sum=keep)
    both = _evaluate(policy, rank=0, world=2, reduce_sum=lambda totals: totals + shard_totals[1])
    assert both["pairs"] == 5
    for key in whole:
        assert both[key] == pytest.approx(whole[key], abs=1e-5), key


def test_evaluation_changes_nothing_and_restores_the_mode(policy):
    scorer = policy[0]
    before = {n: p.detach().clone() for n, p in scorer.named_parameters()}
    scorer.train()
    rng = torch.get_rng_state()
    first = _evaluate(policy)
    assert scorer.training and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in scorer.parameters())
    assert all(torch.equal(p, before[n]) for n, p in scorer.named_parameters())
    scorer.eval()
    assert _evaluate(policy) == first  # dropout is off inside: the same figures in either mode
    assert not scorer.training
    scorer.train()


def test_more_processes_than_pairs_is_refused(policy):
    with pytest.raises(ValueError, match="5 held-out record"):
        _evaluate(policy, rank=0, world=8)


# ------------------------------------------------------------------------------- in mdpo-train
def _overrides(sample, out, *extra):
    return [f"data.path={sample[0]}", f"output_dir={out}", "model.preset=tiny-llava", "micro_batch_size=2",
            "effective_batch_size=4", "epochs=2", "lr=1e-3", "model.lora_r=8", "model.lora_alpha=16",
            "progress_bar=false", "tensorboard=false", "plots=false", "data.max_length=256", "model.dtype=float32", *extra]


def _rows(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_evaluates_held_out_pairs_and_caches_their_reference(sample, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train(load_config(None, _overrides(sample, out, "max_steps=3", f"data.eval_path={sample[1]}", "eval_every=2")))
    rows = _rows(out / "eval_metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 3] and all(r["pairs"] == 5 for r in rows)
    assert rows[0]["loss/total"] == pytest.approx(3 * math.log(2), abs=1e-5)  # policy = reference before step 1
    assert rows[-1]["loss/total"] != rows[0]["loss/total"]
    assert summary["eval"]["first"] == rows[0] and summary["eval"]["last"] == rows[-1]
    assert (out / "reference_logps-eval.pt").is_file()
    assert "held-out @ step 2 (5 pairs)" in capsys.readouterr().out
    # A second run (over the first: overwrite_output_dir keeps the caches) reuses both caches; another
    # held-out file is refused, naming what differs.
    train(load_config(None, _overrides(sample, out, "max_steps=1", f"data.eval_path={sample[1]}", "overwrite_output_dir=true")))
    assert capsys.readouterr().out.count("reusing") == 2
    other = sample[1].parent / "other_eval.json"  # beside the images it names
    other.write_text(json.dumps(json.loads(sample[1].read_text())[:4]))
    with pytest.raises(StaleCacheError, match=r"reference_logps-eval.pt was computed for a different setting \(data.images.*; data.records.*; data.sha256"):
        train(load_config(None, _overrides(sample, tmp_path / "other", "max_steps=1", f"data.eval_path={other}",
                                           f"reference.cache_path={out / 'reference_logps.pt'}")))


def test_evaluation_leaves_training_bit_for_bit_unchanged(sample, tmp_path):
    plain, evaluated = tmp_path / "plain", tmp_path / "evaluated"
    train(load_config(None, _overrides(sample, plain, "max_steps=3")))
    train(load_config(None, _overrides(sample, evaluated, "max_steps=3", f"data.eval_path={sample[1]}", "eval_every=1")))
    with_eval, without = ([r["loss/total"] for r in _rows(d / "metrics.jsonl")] for d in (evaluated, plain))
    if torch.cuda.is_available():  # cuBLAS / SDPA kernels may differ between runs: equal to rounding
        assert with_eval == pytest.approx(without, rel=1e-5)
    else:
        assert with_eval == without
    assert len(_rows(evaluated / "eval_metrics.jsonl")) == 4  # steps 0, 1, 2, 3


def test_live_reference_run_evaluates_too(sample, tmp_path):
    out = tmp_path / "live"
    summary = train(load_config(None, _overrides(sample, out, "max_steps=1", "reference.mode=live", f"data.eval_path={sample[1]}")))
    assert summary["eval"]["first"]["loss/total"] == pytest.approx(3 * math.log(2), abs=1e-5)
    assert [r["step"] for r in _rows(out / "eval_metrics.jsonl")] == [0, 1]
    assert not (out / "reference_logps-eval.pt").exists()


def test_bad_evaluation_settings_are_named(sample, tmp_path, capsys):
    with pytest.raises(ConfigError, match="eval_every=5 needs data.eval_path"):
        load_config(None, _overrides(sample, tmp_path / "a", "eval_every=5"))
    with pytest.raises(ConfigError, match="eval_every must be ≥ 0"):
        load_config(None, _overrides(sample, tmp_path / "a", "eval_every=-1", f"data.eval_path={sample[1]}"))
    assert main(_overrides(sample, tmp_path / "b", f"data.eval_path={tmp_path / 'nope.json'}")) == 2
    assert f"data.eval_path={tmp_path / 'nope.json'}: no such file of held-out records" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ mdpo-eval
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_mdpo_eval_of_the_last_checkpoint_repeats_the_runs_last_evaluation(sample, tmp_path, finetune, capsys):
    """Same model state, same pairs: the CLI (live reference) gives the trainer's last held-out row."""
    from mdpo.eval.cli import main as eval_main

    out = tmp_path / finetune
    extra = ["model.finetune=full", "reference.mode=live", "lr=1e-4"] if finetune == "full" else []
    summary = train(load_config(None, _overrides(sample, out, "max_steps=2", f"data.eval_path={sample[1]}", *extra)))
    checkpoint = out / "checkpoints" / "step-000002"
    assert eval_main([str(checkpoint)]) == 0
    result = json.loads((checkpoint / "eval-eval.json").read_text())
    assert result["step"] == 2 and result["pairs"] == 5 and result["data"] == str(sample[1])
    last = summary["eval"]["last"]
    assert last["step"] == 2 and last["loss/total"] != pytest.approx(3 * math.log(2), abs=1e-3)  # it trained
    for key in last:
        if "/" in key:
            assert result[key] == pytest.approx(last[key], abs=2e-4), key
    assert "rewards/conditional_accuracies" in capsys.readouterr().out


def test_mdpo_eval_names_what_is_missing(sample, tmp_path, capsys):
    from mdpo.eval.cli import main as eval_main

    assert eval_main([str(tmp_path)]) == 2
    assert f"checkpoint={tmp_path}: no config.json" in capsys.readouterr().err
    out = tmp_path / "run"
    train(load_config(None, _overrides(sample, out, "max_steps=1")))
    checkpoint = out / "checkpoints" / "step-000001"
    assert eval_main([str(checkpoint)]) == 2
    assert "its run had no data.eval_path; name the records with --data" in capsys.readouterr().err
    assert eval_main([str(checkpoint), "--data", str(tmp_path / "nope.json")]) == 2
    assert f"--data {tmp_path / 'nope.json'}: no such file of held-out records" in capsys.readouterr().err
    assert eval_main([str(checkpoint), f"data.eval_path={tmp_path / 'gone.json'}"]) == 2
    assert f"data.eval_path (from the checkpoint's config.json) {tmp_path / 'gone.json'}: no such file" in capsys.readouterr().err
    (checkpoint / "trainable.pt").unlink()
    assert eval_main([str(checkpoint), "--data", str(sample[1])]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
