"""The SFT objective (`objective: sft`): chosen rows only, no reference, the mean token NLL; through
the trainer its loss falls and the chosen answers' log-prob rises; `model.finetune: all` trains the
vision tower too."""
import json

import pytest
import torch

from mdpo.components import build_model
from mdpo.config import ConfigError, load_config
from mdpo.data import PreferenceCollator, load_records, make_sample
from mdpo.loss import MDPOLoss, get_objective, mdpo_loss, sft_loss
from mdpo.models import build_preset
from mdpo.train import train


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-sample")
    make_sample(out, n=8, seed=7, n_eval=0)
    return out / "data.json"


def test_sft_loss_is_the_mean_of_the_rows_mean_token_nll():
    logps = torch.tensor([-0.5, -1.5, -4.0])  # length-averaged log-probs of 3 chosen rows
    loss, metrics = sft_loss(logps)
    assert loss.item() == pytest.approx(2.0)
    assert metrics["loss/total"].item() == pytest.approx(2.0) and metrics["logps/chosen"].item() == pytest.approx(-2.0)
    # the same through mdpo_loss / MDPOLoss, which ignore the reference for sft
    assert mdpo_loss(logps, None, objective="sft")[0].item() == pytest.approx(2.0)
    assert MDPOLoss(objective="sft")(policy_logps=logps, ref_logps=None)[0].item() == pytest.approx(2.0)
    spec = get_objective("sft")
    assert spec.branches == ("chosen",) and not spec.needs_reference and get_objective("mdpo").needs_reference
    with pytest.raises(ValueError, match="1-D"):
        sft_loss(torch.zeros(2, 2))


def test_sft_collator_builds_the_chosen_rows_only(sample):
    loaded = build_preset("tiny-llava", seed=0)
    records = load_records(sample, processor=loaded.processor, max_length=256).records
    sft = PreferenceCollator(loaded.processor, objective="sft", max_length=256)(records[:3])
    dpo = PreferenceCollator(loaded.processor, objective="dpo", max_length=256)(records[:3])
    assert sft["input_ids"].shape[0] == 3 and dpo["input_ids"].shape[0] == 6
    assert sft["pixel_values"].shape[0] == 3
    width = sft["input_ids"].shape[1]
    assert torch.equal(sft["labels"], dpo["labels"][:3, :width])  # the chosen rows are the same rows


def test_finetune_all_trains_the_vision_tower_and_full_does_not():
    for finetune, vision_trains in (("all", True), ("full", False)):
        cfg = load_config(None, ["model.preset=tiny-llava", f"model.finetune={finetune}", "objective=sft"])
        loaded, reference = build_model(cfg, torch.device("cpu"))
        vision = [p.requires_grad for n, p in loaded.model.named_parameters() if "vision_tower" in n]
        assert vision and all(v == vision_trains for v in vision)
        assert reference is None
    with pytest.raises(ConfigError, match="model.finetune"):
        load_config(None, ["model.preset=tiny-llava", "model.finetune=everything"])


def test_sft_through_the_trainer_lowers_the_loss_and_raises_the_chosen_logprob(sample, tmp_path):
    out = tmp_path / "sft"
    cfg = load_config(None, [
        "objective=sft", "model.preset=tiny-llava", "model.finetune=all", f"data.path={sample}", f"output_dir={out}",
        "epochs=12", "micro_batch_size=4", "effective_batch_size=4", "lr=3e-3", "warmup_ratio=0", "data.corruption=none",
        "progress_bar=false", "tensorboard=false", "plots=false", "data.max_length=256", "seed=0",
    ])
    summary = train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and set(rows[0]) >= {"loss/total", "loss/sft", "logps/chosen"}
    first, last = rows[:2], rows[-2:]
    assert sum(r["loss/total"] for r in last) < 0.7 * sum(r["loss/total"] for r in first)
    assert sum(r["logps/chosen"] for r in last) > sum(r["logps/chosen"] for r in first)
    assert all(r["loss/total"] == pytest.approx(-r["logps/chosen"]) for r in rows)
    assert not (out / "reference_logps.pt").exists()  # no reference pass
    assert (out / "final" / "config.json").is_file() and summary["steps"] == 24
    # the saved model loads through model.path and the vision tower moved
    from mdpo.models import load_model

    trained = dict(load_model(out / "final").model.named_parameters())
    start = dict(build_preset("tiny-llava", seed=0).model.named_parameters())
    name = next(n for n in start if "vision_tower" in n and n.endswith("patch_embedding.weight"))
    assert not torch.equal(trained[name], start[name])
