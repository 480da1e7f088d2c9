"""The benchmark tooling that runs away from this machine: provenance stamps and the GPU check script.

Benchmarks themselves are not run here (figures belong in benchmarks/, never in assertions); these
tests check what a GPU session depends on before it spends device time: the script's argument
handling, its dry run, its refusal without a GPU, and the git revision stamped on every result.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import _harness

REPO = Path(__file__).resolve().parent.parent
GPU_CHECK = REPO / "benchmarks" / "gpu_check.sh"
STEPS = ("build", "logprobs", "linear_logprobs", "tests", "train_step", "main_job", "logprobs_v151936",
         "train_step_ckpt", "linear_logprobs_b")


def _run_gpu_check(args: list[str], **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(GPU_CHECK), *args], capture_output=True, text=True, env=full_env, timeout=120)


def test_git_revision_from_the_environment(monkeypatch):
    monkeypatch.setenv("MDPO_GIT_REV", "abc1234")
    assert _harness.stamp("cpu")["git"] == "abc1234"


def test_git_revision_of_a_copy_without_git_says_how_to_name_it(monkeypatch, tmp_path):
    monkeypatch.delenv("MDPO_GIT_REV", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above tmp_path
    monkeypatch.setattr(_harness, "REPO_ROOT", tmp_path)
    assert _harness._git_revision() == "unknown (no git repository; set MDPO_GIT_REV)"


def test_gpu_check_without_an_output_folder_prints_usage():
    proc = _run_gpu_check([])
    assert proc.returncode == 2
    assert "usage: benchmarks/gpu_check.sh OUT_DIR" in proc.stderr


def test_gpu_check_dry_run_lists_every_step_and_runs_nothing(tmp_path):
    proc = _run_gpu_check([str(tmp_path / "out")], GPU_CHECK_DRY_RUN="1", GPU_CHECK_ARCHIVE=str(tmp_path / "a.tgz"))
    assert proc.returncode == 0, proc.stderr
    summary = proc.stdout[proc.stdout.index("gpu_check summary"):]
    for step in STEPS:
        assert f"\n{step} " in summary, f"step {step!r} missing from the summary"
    assert "--device cuda" in proc.stdout and "MDPO_TEST_DEVICE=cuda" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.txt"]  # nothing ran
    assert not (tmp_path / "a.tgz").exists()  # a dry run packs nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_refuses_to_run_without_a_gpu(tmp_path):
    proc = _run_gpu_check([str(tmp_path / "out")])
    assert proc.returncode == 2
    assert "no CUDA GPU visible" in proc.stderr
    assert not (tmp_path / "out" / "tests.log").exists()


# ---- train_step's trl-real provider (TRL's own DPOTrainer; issue 13) ----
# A model with the benchmark's layout but toy widths: the provider's setup and one step run in seconds.
TOY_SHAPE = dict(hidden=64, intermediate=128, heads=4, kv_heads=4, vocab=512, vision_hidden=32, vision_intermediate=64,
                 vision_heads=4, patch=14, text_layers=1, vision_layers=1, pairs=1, prompt_tokens=4, response_tokens=6,
                 rejected_tokens=3, image_size=28, finetune="lora", lora_r=4, lora_alpha=8, grad_ckpt=False)
CPU_FP32 = {"device": "cpu", "dtype": "float32"}


def test_trl_real_is_a_provider_and_a_baseline_with_trls_token_count():
    from benchmarks import train_step

    assert "trl-real" in train_step.ALL_PROVIDERS and "trl-real" in train_step.BASELINES
    batch = train_step.make_batch(TOY_SHAPE, torch.device("cpu"), torch.float32)
    forwards = train_step.lm_forwards("trl-real", TOY_SHAPE, batch)
    # TRL's fused head scores the completion tokens of [chosen | rejected] only: 6 + 3, in the policy and the reference
    assert [(f["rows"], f["grad"], f["head"]) for f in forwards] == [(2, True, 9), (2, False, 9)]


def test_trl_real_without_trl_says_how_to_install_it(monkeypatch):
    from benchmarks import train_step

    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    assert train_step.trl_version() is None
    with pytest.raises(RuntimeError, match="pip install trl"):
        train_step.trl_real_setup(TOY_SHAPE, CPU_FP32)


@pytest.fixture
def trl_process_state():
    """TRL's trainer seeds every RNG, sets environment variables and initialises accelerate's
    process-wide state: undo all three afterwards, so the tests after this one see what they would alone."""
    import random

    import numpy as np

    pytest.importorskip("trl")
    env = dict(os.environ)
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    random.setstate(states[0]), np.random.set_state(states[1]), torch.random.set_rng_state(states[2])
    os.environ.clear()
    os.environ.update(env)


def test_trl_real_step_trains_only_the_language_models_lora_through_trl(trl_process_state):
    from benchmarks import train_step

    step = train_step.trl_real_setup(TOY_SHAPE, CPU_FP32)
    trainer = step.trainer
    assert type(trainer).__name__ == "DPOTrainer" and trainer.ref_model is None  # reference = adapters off
    lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert lora_b and all(".language_model." in n and "lora_" in n for n in trainable)
    step()
    moved = [n for n, p in trainer.model.named_parameters() if n in lora_b and not torch.equal(p, lora_b[n])]
    assert sorted(moved) == sorted(lora_b)  # one real optimizer step moved every LoRA B matrix (zero at init)
    assert train_step.STATS["trl-real"]["policy_rows"] == 2


def test_qlora_fit_counts_the_real_llava_models_parameters():
    """The computed 7B / 13B fit counts every parameter of the real models (checked on the meta device)."""
    from transformers import LlavaForConditionalGeneration

    from benchmarks.qlora import REAL_MODELS, real_model_params
    from benchmarks.train_step import LLAVA_15_7B, llava_config

    for name, m in REAL_MODELS.items():
        heads = m["hidden"] // 128
        shape = {**LLAVA_15_7B, "hidden": m["hidden"], "intermediate": m["intermediate"], "heads": heads, "kv_heads": heads,
                 "text_layers": m["layers"], "vision_layers": 24, "image_size": 336, "prompt_tokens": 8, "response_tokens": 8}
        with torch.device("meta"):
            model = LlavaForConditionalGeneration._from_config(llava_config(shape))
        counted = real_model_params(name)
        lm_linear = sum(module.weight.numel() for module in model.model.language_model.modules()
                        if isinstance(module, torch.nn.Linear))
        assert counted["lm_linear"] == lm_linear
        assert counted["lm_linear"] + counted["other"] == sum(p.numel() for p in model.parameters())


def test_qlora_weight_report_counts_nf4_bytes_per_weight():
    pytest.importorskip("bitsandbytes")
    from benchmarks.qlora import weight_report
    from mdpo.models import apply_lora, build_preset
    from mdpo.models.quantization import QuantizationSettings, quantize_in_memory

    plain = build_preset("tiny-llava")
    n_params = sum(p.numel() for p in plain.model.parameters())
    quantised = quantize_in_memory(plain.model, QuantizationSettings("nf4", double_quant=True), plain.adapter)
    report = weight_report(apply_lora(quantised, plain.family, r=4, alpha=8), plain.adapter)
    assert report["model"]["params"] == n_params and report["other"]["bytes_per_param"] == 4.0
    # 4-bit nibbles + an 8-bit scale per 64 weights, plus per layer fp32 second-level scales and code books
    # (~1.2 kB: 0.2 byte per weight on these 64-wide layers, 0.0002 on LLaVA-7B's)
    assert 0.5 + 1 / 64 < report["lm_linear"]["bytes_per_param"] < 0.75
    assert report["lora"]["params"] == sum(p.numel() for n, p in quantised.named_parameters() if "lora_" in n)
