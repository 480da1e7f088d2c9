"""Full fine-tuning of a bf16 model: fp32 master weights, so small-lr updates are not rounded away."""
import copy

import pytest
import torch

from mdpo.config import load_config
from mdpo.models import build_preset, freeze_for_full_finetune
from mdpo.optim import MasterWeightAdamW, make_optimizer
from tiny_runs import sample_records, tiny_run_overrides
from mdpo.train import train

SEED = 42


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return sample_records(tmp_path_factory, n=8, seed=5)


def _run(sample, out, *extra):
    overrides = tiny_run_overrides(sample, out, "model.finetune=full", "model.dtype=bfloat16", "lr=1e-5",
                                   "warmup_ratio=0", "max_steps=3", "effective_batch_size=2", "epochs=1",
                                   f"seed={SEED}", *extra)
    return train(load_config(None, overrides))


def _initial_trainable(dtype=torch.bfloat16):
    """(names, fp32 values) of the parameters a full fine-tune trains, as the run built them."""
    loaded = build_preset("tiny-llava", seed=SEED, dtype=dtype)
    freeze_for_full_finetune(loaded.model, loaded.family)
    named = [(n, p) for n, p in loaded.model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p.detach().float().clone() for _, p in named]


def _should_change(name: str) -> bool:
    # Every trained weight gets a gradient each step except the rows of the input embedding whose
    # tokens the batch does not hold (weight decay is 0, so those rows stay put).
    return "embed_tokens" not in name


def _changed_fraction(names, before, after) -> float:
    changed = total = 0
    for name, b, a in zip(names, before, after):
        if _should_change(name):
            changed += int((a.float() != b).sum())
            total += b.numel()
    return changed / total


def test_bf16_full_finetune_changes_almost_every_weight(sample, tmp_path):
    out = tmp_path / "run"
    _run(sample, out)
    names, before = _initial_trainable()
    state = torch.load(out / "checkpoints" / "step-000003" / "state.pt", map_location="cpu", weights_only=True)
    masters = state["optimizer"]["master_weights"]  # what the optimizer trained, in fp32
    assert len(masters) == len(names) and {m.dtype for m in masters} == {torch.float32}
    assert _changed_fraction(names, before, masters) > 0.99
    # The model runs in bf16: its weights are the master weights rounded to nearest.
    trained = torch.load(out / "checkpoints" / "step-000003" / "trainable.pt", weights_only=True)
    for name, master in zip(names, masters):
        assert trained[name].dtype == torch.bfloat16
        assert torch.equal(trained[name], master.to(torch.bfloat16)), name


def test_plain_adamw_on_bf16_weights_loses_most_updates(sample, tmp_path, monkeypatch):
    """The old path, for contrast: AdamW stepping the bf16 weights themselves."""
    import mdpo.optim

    monkeypatch.setattr(mdpo.optim, "make_optimizer", lambda params, lr, weight_decay: torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay))
    out = tmp_path / "plain"
    _run(sample, out)
    names, before = _initial_trainable()
    trained = torch.load(out / "checkpoints" / "step-000003" / "trainable.pt", weights_only=True)
    assert _changed_fraction(names, before, [trained[n] for n in names]) < 0.5


def test_make_optimizer_adds_master_weights_only_for_low_precision():
    fp32 = torch.nn.Linear(4, 4)
    assert type(make_optimizer(fp32.parameters(), lr=1e-3)) is torch.optim.AdamW  # LoRA: adapters are fp32
    bf16 = torch.nn.Linear(4, 4).to(torch.bfloat16)
    assert isinstance(make_optimizer(bf16.parameters(), lr=1e-3), MasterWeightAdamW)


def _steps(model, optimizer, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 16, generator=g).to(torch.bfloat16)
        model(x).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_master_weights_follow_fp32_adamw_and_resume_exactly():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(torch.bfloat16)
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = MasterWeightAdamW(model.parameters(), lr=1e-5)
    _steps(model, optimizer, 2, seed=1)
    saved = copy.deepcopy(optimizer.state_dict())  # as torch.save + torch.load would (the live one holds references)
    assert all(not torch.equal(m, s.float()) for m, s in zip(saved["master_weights"], start))
    # A second optimizer loaded from the state dict continues exactly like the first.
    clone = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(torch.bfloat16)
    clone.load_state_dict(model.state_dict())
    resumed = MasterWeightAdamW(clone.parameters(), lr=1e-5)
    resumed.load_state_dict(saved)
    _steps(model, optimizer, 2, seed=2)
    _steps(clone, resumed, 2, seed=2)
    for a, b in zip(optimizer.master_params, resumed.master_params):
        assert torch.equal(a, b)
    for p, m in zip(model.parameters(), optimizer.master_params):
        assert p.dtype == torch.bfloat16 and torch.equal(p, m.to(torch.bfloat16))


def test_bf16_full_finetune_resumes_from_the_fp32_master_weights(sample, tmp_path):
    import json

    def losses(out):
        return [json.loads(line)["loss/total"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _run(sample, whole, "save_every=1", "lr=1e-4")
    _run(sample, resumed, "lr=1e-4", f"resume_from={whole / 'checkpoints' / 'step-000001'}",
         f"reference.cache_path={whole / 'reference_logps.pt'}")
    last = "checkpoints/step-000003/state.pt"
    a, b = (torch.load(d / last, map_location="cpu", weights_only=True)["optimizer"]["master_weights"] for d in (whole, resumed))
    if torch.cuda.is_available():
        assert losses(resumed) == pytest.approx(losses(whole)[1:], rel=1e-5)
    else:
        assert losses(resumed) == losses(whole)[1:]
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("finetune, vision_trains", [("full", False), ("all", True)])
def test_build_model_trains_what_finetune_says(finetune, vision_trains):
    from mdpo.components import build_model, load_processor

    cfg = load_config(None, ["model.preset=tiny-qwen2-vl", f"model.finetune={finetune}", "model.dtype=bfloat16"])
    prepared = load_processor(cfg)
    loaded, _ = build_model(cfg, torch.device("cpu"), prepared)
    assert loaded is prepared and loaded.model is not None
    params = dict(loaded.model.named_parameters())
    assert all(p.requires_grad for n, p in params.items() if n.startswith(loaded.adapter.language_model_prefix))
    assert all(p.requires_grad == vision_trains for n, p in params.items() if n.startswith(loaded.adapter.frozen_prefixes))
    assert isinstance(make_optimizer([p for p in params.values() if p.requires_grad], lr=1e-5), MasterWeightAdamW)
