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
