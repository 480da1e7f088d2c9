"""The training path on tiny random models: step-0 agreement, learning, the reference cache, resume,
two CPU processes, and the errors for bad configs."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdpo.config import load_config
from mdpo.data import CorruptionConfig, PreferenceCollator, load_records, make_sample
from mdpo.loss import MDPOLoss
from mdpo.models import apply_lora, build_preset
from mdpo.reference_cache import StaleCacheError
from mdpo.scoring import SequenceScorer, reference_logps
from mdpo.reference_pass import compute_reference_cache
from mdpo.train import main, train

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["tiny-llava", "tiny-qwen2-vl", "tiny-idefics3"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    make_sample(out, n=16, seed=3, n_eval=5)
    return out / "data.json"


def _policy(preset, sample, objective="mdpo"):
    loaded = build_preset(preset, seed=0)
    loaded.model = apply_lora(loaded.model, loaded.family, r=8, alpha=16, dropout=0.0)
    records = load_records(sample, processor=loaded.processor, max_length=256).records
    collator = PreferenceCollator(loaded.processor, objective=objective, max_length=256, corruption=CorruptionConfig(), family=loaded.family)
    collator.set_epoch(0)
    return loaded, SequenceScorer(loaded.model, loaded.adapter), collator, records


@pytest.mark.parametrize("preset", FAMILIES)
def test_step0_rewards_are_zero_and_loss_is_3ln2(preset, sample):
    loaded, scorer, collator, records = _policy(preset, sample)
    batch = collator(records[:3])
    scorer.train()
    policy = scorer(batch)
    ref = reference_logps(scorer, batch)
    loss, metrics = MDPOLoss()(policy_logps=policy, ref_logps=ref)
    assert policy.shape == (9,) and torch.all(policy < 0)
    assert metrics["rewards/chosen"].item() == 0 and metrics["rewards/corrupted"].item() == 0
    assert loss.item() == pytest.approx(3 * math.log(2), abs=1e-6)


@pytest.mark.parametrize("preset", FAMILIES)
def test_a_few_steps_on_a_fixed_batch_lower_the_loss(preset, sample):
    loaded, scorer, collator, records = _policy(preset, sample)
    batch = collator(records[:2])
    ref = reference_logps(scorer, batch)
    optimizer = torch.optim.AdamW([p for p in scorer.parameters() if p.requires_grad], lr=2e-3)
    criterion, losses = MDPOLoss(beta=0.5), []
    for _ in range(6):
        loss, _ = criterion(policy_logps=scorer(batch), ref_logps=ref)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-qwen2-vl"])
def test_cached_reference_logps_equal_live_ones(preset, sample):
    loaded, scorer, collator, records = _policy(preset, sample)
    # Make the policy differ from the reference, so "adapters disabled" is really tested.
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    fingerprint = {"objective.branches": ["chosen", "rejected", "corrupted"]}
    cache = compute_reference_cache(scorer, records[:4], collator, fingerprint, 2, 2, torch.device("cpu"), None, False)
    for epoch in (0, 1):
        collator.set_epoch(epoch)
        chunk = records[2:4]
        live = reference_logps(scorer, collator(chunk))
        torch.testing.assert_close(cache.lookup([r.sample_id for r in chunk], epoch), live, rtol=1e-5, atol=1e-4)
    assert not torch.equal(cache.corrupted[0], cache.corrupted[1])  # each epoch has its own crop
    assert not torch.allclose(scorer(collator(chunk)).detach(), live)  # the policy is not the reference


def _overrides(sample, out, *extra):
    return [f"data.path={sample}", f"output_dir={out}", "model.preset=tiny-llava", "micro_batch_size=2",
            "effective_batch_size=4", "epochs=2", "lr=1e-3", "model.lora_r=8", "model.lora_alpha=16",
            "progress_bar=false", "tensorboard=false", "data.max_length=256", "model.dtype=float32", *extra]


def _losses(out):
    return [json.loads(line)["loss/total"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_outputs_and_refuses_a_stale_cache(sample, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train(load_config(None, _overrides(sample, out, "max_steps=3", "save_merged=true")))
    assert summary["steps"] == 3 and summary["first"]["loss/total"] == pytest.approx(3 * math.log(2), abs=1e-5)
    for name in ("metrics.jsonl", "summary.json", "reference_logps.pt", "final/adapter_config.json", "plots/losses.png",
                 "merged/config.json", "checkpoints/step-000003/state.pt"):
        assert (out / name).exists(), name
    # A second run (over the first: overwrite_output_dir keeps the cache) reuses the cache ...
    train(load_config(None, _overrides(sample, out, "max_steps=1", "overwrite_output_dir=true")))
    assert "reusing" in capsys.readouterr().out
    # ... and a run reading it with another corruption seed is refused, naming what differs.
    cache = f"reference.cache_path={out / 'reference_logps.pt'}"
    with pytest.raises(StaleCacheError, match=r"corruption: cache has"):
        train(load_config(None, _overrides(sample, tmp_path / "seed-9", "max_steps=1", "data.corruption_seed=9", cache)))
    assert main([*_overrides(sample, tmp_path / "crop", "max_steps=1", "data.crop_area=[0.2, 0.5]", cache)]) == 2
    assert "computed for a different setting" in capsys.readouterr().err


def test_full_finetune_with_a_live_reference(sample, tmp_path):
    out = tmp_path / "full-live"
    summary = train(load_config(None, _overrides(sample, out, "max_steps=2", "model.finetune=full", "reference.mode=live",
                                                 "model.preset=tiny-qwen2-vl", "objective=mdpo_no_conditional", "lr=1e-4")))
    assert summary["first"]["loss/total"] == pytest.approx(2 * math.log(2), abs=1e-5)  # DPO + anchor terms, rewards 0
    assert "rewards/corrupted" not in summary["first"] and not (out / "reference_logps.pt").exists()


def test_resume_matches_an_uninterrupted_run(sample, tmp_path):
    full = tmp_path / "full"
    train(load_config(None, _overrides(sample, full, "max_steps=5", "save_every=2")))
    ckpt = full / "checkpoints" / "step-000002"
    assert (ckpt / "trainable.pt").is_file() and not (ckpt / "adapter").exists()  # the LoRA weights once (trainable.pt)
    resumed = tmp_path / "resumed"
    train(load_config(None, _overrides(sample, resumed, "max_steps=5", f"resume_from={ckpt}",
                                       f"reference.cache_path={full / 'reference_logps.pt'}")))
    if torch.cuda.is_available():  # cuBLAS may pick other kernels for a new process: equal to rounding
        assert _losses(resumed) == pytest.approx(_losses(full)[2:], rel=1e-5)
    else:
        assert _losses(resumed) == _losses(full)[2:]  # steps 3..5, bit for bit (LoRA dropout included)


def _train_on_cpu_processes(processes: int, overrides: list[str]) -> None:
    """mdpo.train in a child on 1 CPU process, or on 2 through `accelerate launch` (gloo); the GPU of a
    GPU machine is hidden, so runs compare on one device and thread count."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mdpo.train"]
    cmd = launch if processes > 1 else [sys.executable, "-m", "mdpo.train"]
    proc = subprocess.run([*cmd, *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_cpu_processes_through_accelerate(sample, tmp_path):
    out = tmp_path / "ddp"
    overrides = ["max_steps=4", "model.lora_dropout=0", f"data.eval_path={sample.parent / 'eval.json'}"]
    _train_on_cpu_processes(2, _overrides(sample, out, *overrides))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    assert summary["first"]["loss/total"] == pytest.approx(3 * math.log(2), abs=1e-5)
    # Held-out pairs shared 3 + 2 over the processes, sums reduced: all 5 counted, at steps 0 and 4.
    assert summary["eval"]["pairs"] == 5 and summary["eval"]["first"]["pairs"] == 5
    assert summary["eval"]["first"]["loss/total"] == pytest.approx(3 * math.log(2), abs=1e-5)
    assert summary["eval"]["last"]["step"] == 4
    # Each process computed the reference log-probs of its half of the records; the merged cache
    # equals one process's (up to float noise from other micro-batch shapes) and no part is left.
    assert not list(out.glob("*.part*"))
    single = tmp_path / "single"
    _train_on_cpu_processes(1, _overrides(sample, single, *overrides))
    # The learning-rate schedule counts optimizer steps, whatever the number of processes, so the two
    # runs train alike: the same losses to float rounding (gloo's all-reduce sums in another order).
    lrs = [[json.loads(line)["lr"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (out, single)]
    assert lrs[0] == lrs[1] and lrs[0][0] > 0, lrs
    assert _losses(out) == pytest.approx(_losses(single), rel=1e-5) and _losses(out)[-1] < _losses(out)[0] - 1e-3
    for name in ("reference_logps.pt", "reference_logps-eval.pt"):
        two, one = (torch.load(d / name, weights_only=True) for d in (out, single))
        assert two["fingerprint"] == one["fingerprint"] and sorted(two["sample_ids"]) == sorted(one["sample_ids"])
        order = [two["sample_ids"].index(sid) for sid in one["sample_ids"]]
        for key in ("chosen", "rejected"):
            torch.testing.assert_close(two[key][order], one[key], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(two["corrupted"][:, order], one["corrupted"], rtol=1e-5, atol=1e-4)


def test_bad_configs_give_clear_errors(sample, tmp_path, capsys):
    assert main([*_overrides(sample, tmp_path / "a"), "model.preset=null", f"model.path={tmp_path / 'nope'}"]) == 2
    assert f"model.path={tmp_path / 'nope'}: no such model folder" in capsys.readouterr().err
    assert main(_overrides(tmp_path / "missing.json", tmp_path / "b")) == 2
    assert "no such dataset file" in capsys.readouterr().err
    assert main([*_overrides(sample, tmp_path / "c"), "optimizer=sgd"]) == 2
    assert "unknown key(s) optimizer" in capsys.readouterr().err
    assert main([str(tmp_path / "nothing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bfloat16_model_trains(sample, tmp_path):
    """The low-precision trainer path (bf16 base weights, bf16 hidden states into the fused head, fp32
    log-probs and loss; peft keeps the LoRA weights in fp32) — the GPU default, also on the CPU."""
    out = tmp_path / "bf16"
    summary = train(load_config(None, _overrides(sample, out, "max_steps=3", "model.dtype=bfloat16", "model.lora_dropout=0")))
    losses = _losses(out)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(3 * math.log(2), abs=2e-2)  # bf16 noise between cached and live ρ
    assert losses[-1] < losses[0]
    trained = torch.load(out / "checkpoints" / "step-000003" / "trainable.pt", weights_only=True)
    assert trained and {t.dtype for t in trained.values()} == {torch.float32}  # peft keeps adapters in fp32 over bf16
    assert summary["steps"] == 3


def test_collating_workers_change_nothing_in_the_run(sample, tmp_path):
    """data.num_workers collates ahead in other processes: a run resumed with workers continues a run
    without them bit for bit (LoRA dropout on: the loader must not draw from the global RNG)."""
    plain, resumed = tmp_path / "plain", tmp_path / "resumed"
    train(load_config(None, _overrides(sample, plain, "max_steps=5", "save_every=2")))
    train(load_config(None, _overrides(sample, resumed, "max_steps=5", "data.num_workers=2",
                                       f"resume_from={plain / 'checkpoints' / 'step-000002'}",
                                       f"reference.cache_path={plain / 'reference_logps.pt'}")))
    if torch.cuda.is_available():
        assert _losses(resumed) == pytest.approx(_losses(plain)[2:], rel=1e-5)
    else:
        assert _losses(resumed) == _losses(plain)[2:]


def test_gradient_accumulation_goes_through_the_engine(sample, tmp_path, monkeypatch):
    """The engine learns of the accumulation: each micro-batch's forward and backward run inside
    `engine.accumulate(last=...)` — what DDP's gradient sync follows — with last on the final
    micro-batch of each optimizer step only, and the engine steps once per `accum` micro-batches
    (2 micro-batches per step here)."""
    from mdpo.distributed import Engine

    seen, accumulate, step = [], Engine.accumulate, Engine.step

    def spy_accumulate(self, module, last):
        seen.append(("micro", last, self.accum))
        return accumulate(self, module, last)

    def spy_step(self, trainable):
        seen.append(("step",))
        return step(self, trainable)

    monkeypatch.setattr(Engine, "accumulate", spy_accumulate)
    monkeypatch.setattr(Engine, "step", spy_step)
    train(load_config(None, _overrides(sample, tmp_path / "accum", "max_steps=2")))
    assert seen == [("micro", False, 2), ("micro", True, 2), ("step",)] * 2


def test_resume_on_two_processes_from_a_one_process_checkpoint(sample, tmp_path):
    """A checkpoint saved by 1 process resumed by 2 (accelerate launch, gloo): process 1 has no
    rng-1.pt, gets RNG states derived from (seed, step, process) with a note, and the run continues
    the 1-process run's schedule and losses (no dropout: the RNG does not enter the losses)."""
    single = tmp_path / "single"
    overrides = ["max_steps=4", "save_every=2", "model.lora_dropout=0"]
    _train_on_cpu_processes(1, _overrides(sample, single, *overrides))  # on the CPU like the 2 processes
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mdpo.train"]
    resumed = tmp_path / "resumed"
    proc = subprocess.run([*launch, *_overrides(sample, resumed, *overrides, f"resume_from={single / 'checkpoints' / 'step-000002'}",
                                                f"reference.cache_path={single / 'reference_logps.pt'}")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "saved by 1 process(es), this run has 2" in proc.stdout + proc.stderr
    assert _losses(resumed) == pytest.approx(_losses(single)[2:], rel=1e-5)
    state = torch.load(resumed / "checkpoints" / "step-000004" / "state.pt", weights_only=True)
    assert state["processes"] == 2 and (resumed / "checkpoints" / "step-000004" / "rng-1.pt").is_file()


def test_deepspeed_import_line_on_a_cpu_machine_is_dropped_and_its_other_lines_kept():
    """DeepSpeed, imported by transformers / accelerate in every run once installed, logs "Setting
    accelerator to CPU ..." when it finds no GPU: with mdpo imported first, that line is gone and any other
    DeepSpeed warning still shows."""
    pytest.importorskip("deepspeed")
    noise = "Setting accelerator to CPU"
    code = "import deepspeed; from deepspeed.utils import logger; logger.warning('another DeepSpeed line')"
    run = lambda prefix: subprocess.run([sys.executable, "-c", prefix + code], capture_output=True, text=True,  # noqa: E731
                                        timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    bare, quiet = run(""), run("import mdpo; ")
    assert noise in bare.stdout + bare.stderr  # the line exists without mdpo's filter
    assert noise not in quiet.stdout + quiet.stderr and "another DeepSpeed line" in quiet.stdout + quiet.stderr
