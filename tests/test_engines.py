"""FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU processes (gloo) train exactly like one process.

For each engine, tiny LLaVA and tiny Qwen2-VL, LoRA and full fine-tuning (with a live, sharded reference
for Qwen2-VL), LoRA on an NF4-quantised LLaVA (bitsandbytes), the dpo objective (with answers generated
during training, shared over the processes) and sft: per-step losses, rewards, grad norms and learning rates, and the held-out evaluations,
equal a 1-process run's to fp32 rounding, over 5 steps with 2 micro-batches per process per step and
5 held-out pairs (3 + 2: the short process pads its forwards). A run killed by SIGKILL while saving
resumes from the last complete checkpoint and ends like the uninterrupted run (fsdp2 resumed by 1
process: DCP reshards). The checkpoints score in mdpo-eval, and final/ loads with transformers + peft,
like the run's last held-out evaluation. Configs that cannot work are refused in one line.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdpo.checkpoints import complete_checkpoints
from mdpo.config import load_config
from mdpo.data import make_sample
from mdpo.train import main, train

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("MDPO_TEST_DEVICE") == "cuda",
                                                   reason="CPU processes; benchmarks/gpu_check.sh runs a 1-GPU FSDP2 step")]

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("fsdp2", "zero2", "zero3")
MODELS = {  # (preset, finetune): the run's own settings
    ("tiny-llava", "lora"): ["reference.mode=cached"],
    ("tiny-llava", "full"): ["reference.mode=cached"],
    ("tiny-qwen2-vl", "lora"): ["reference.mode=cached"],
    ("tiny-qwen2-vl", "full"): ["reference.mode=live"],
    ("tiny-llava", "qlora"): ["reference.mode=cached", "model.quantization=nf4"],
    ("tiny-llava", "dpo"): ["objective=dpo", "eval_generate_every=5"],  # no corrupted rows; answers generated, sharded
    ("tiny-qwen2-vl", "sft"): ["objective=sft"],  # no reference at all
}
COMPARED = ("loss/total", "loss/dpo", "loss/conditional", "loss/anchor", "rewards/chosen", "rewards/rejected",
            "rewards/corrupted", "rewards/margins", "grad_norm", "lr")  # accuracies: ties at step 1 fall either way


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines-sample")
    make_sample(out, n=16, seed=3, n_eval=5)
    return out / "data.json"


def _overrides(sample, out, preset, finetune, *extra):
    """5 optimizer steps of 8 pairs: 2 micro-batches of 2 pairs per process on 2 processes (4 on 1)."""
    lr = "lr=1e-4" if finetune == "full" else "lr=1e-3"
    return [f"data.path={sample}", f"data.eval_path={sample.parent / 'eval.json'}", f"output_dir={out}",
            f"model.preset={preset}", f"model.finetune={finetune if finetune == 'full' else 'lora'}", "model.lora_dropout=0",
            *MODELS[preset, finetune],
            "micro_batch_size=2", "effective_batch_size=8", "max_steps=5", "save_every=2", "eval_every=2", lr,
            "progress_bar=false", "report_to=none", "plots=false", "data.max_length=256", *extra]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")


def _run(cmd: list[str], timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run a command in a session of its own; on a timeout the whole session (torchrun and its workers)
    is killed, never left behind."""
    import signal

    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd[:6])} … did not finish in {timeout} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _launch(processes: int, jobs: list[dict], jobs_file: Path) -> subprocess.CompletedProcess:
    jobs_file.write_text(json.dumps(jobs))
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone",
                 str(ROOT / "tests" / "engine_runs.py"), str(jobs_file)])


def _rows(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines() if line.strip()]


def _assert_same_rows(rows, expected, keys=COMPARED):
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for row, want in zip(rows, expected):
        for key in keys:
            if key in want:
                assert row[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (row["step"], key)


@pytest.fixture(scope="module")
def runs(sample, tmp_path_factory):
    """{(engine, preset, finetune): output folder} of the 2-process runs, with ("one", ...) the 1-process runs."""
    root = tmp_path_factory.mktemp("engines")
    folders = {("one", *key): root / f"one-{key[0]}-{key[1]}" for key in MODELS}
    for (_, preset, finetune), out in folders.items():
        train(load_config(None, _overrides(sample, out, preset, finetune)))
    jobs = []
    for engine in ENGINES:
        for preset, finetune in MODELS:
            out = root / f"{engine}-{preset}-{finetune}"
            folders[engine, preset, finetune] = out
            jobs.append({"overrides": _overrides(sample, out, preset, finetune, f"distributed.engine={engine}")})
    proc = _launch(2, jobs, root / "jobs.json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return folders


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("preset,finetune", list(MODELS))
def test_two_processes_train_like_one(runs, engine, preset, finetune):
    out, one = runs[engine, preset, finetune], runs["one", preset, finetune]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == engine and summary["processes"] == 2 and summary["steps"] == 5
    _assert_same_rows(_rows(out), _rows(one))
    assert _rows(out)[-1]["loss/total"] < _rows(out)[0]["loss/total"] - 1e-3  # it learnt something
    # held-out at steps 0, 2, 4 and 5: all 5 pairs counted once, though one process scores 3 and the other 2
    evals, evals_one = _rows(out, "eval_metrics.jsonl"), _rows(one, "eval_metrics.jsonl")
    assert [r["step"] for r in evals] == [0, 2, 4, 5] and all(r["pairs"] == 5 for r in evals)
    _assert_same_rows(evals, evals_one, keys=("loss/total", "rewards/margins", "rewards/conditional_margins",
                                              "generate/tokens_per_answer", "generate/chair_i"))
    if "eval_generate_every=5" in MODELS[preset, finetune]:  # answers generated at step 5, on both sides
        assert all("generate/tokens_per_answer" in r for r in (evals[-1], evals_one[-1]))
    assert [p.name for p in complete_checkpoints(out)] == ["step-000002", "step-000004", "step-000005"]


@pytest.mark.parametrize("engine", ENGINES)
def test_checkpoints_and_final_score_like_the_last_evaluation(runs, sample, engine):
    """mdpo-eval reads the engine's checkpoint (DCP / DeepSpeed shards put together in one process), and
    final/ — a peft adapter, or whole weights for full fine-tuning — loads with transformers (+ peft):
    both score the held-out pairs like the run's last evaluation (live reference here, cached there)."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from mdpo.components import build_model, make_collator, make_corruption, make_criterion, read_records, load_processor
    from mdpo.evaluate import evaluate, evaluate_checkpoint
    from mdpo.scoring import SequenceScorer

    for preset, finetune in (("tiny-llava", "lora"), ("tiny-qwen2-vl", "full")):
        out = runs[engine, preset, finetune]
        last = _rows(out, "eval_metrics.jsonl")[-1]
        scored = evaluate_checkpoint(out / "checkpoints" / "step-000005")
        assert scored["loss/total"] == pytest.approx(last["loss/total"], rel=1e-5)
        assert scored["rewards/margins"] == pytest.approx(last["rewards/margins"], rel=1e-4, abs=1e-6)

        cfg = load_config(out / "config.json")
        prepared = load_processor(cfg)
        records = read_records(cfg, cfg.data.eval_path, prepared).records
        base = build_model(load_config(out / "config.json", ["model.finetune=full"]), torch.device("cpu"), prepared)[0].model
        if finetune == "lora":
            policy = PeftModel.from_pretrained(base, out / "final")
            reference = None  # adapters disabled
        else:
            policy = AutoModelForImageTextToText.from_pretrained(out / "final")
            reference = base  # the initial weights
        assert policy.dtype == torch.float32
        scorer = SequenceScorer(policy, prepared.adapter)
        metrics = evaluate(scorer, make_criterion(cfg), records, make_collator(cfg, prepared, make_corruption(cfg), records),
                           micro_batch_size=2, device="cpu", reference_model=reference)
        assert metrics["loss/total"] == pytest.approx(last["loss/total"], rel=1e-5), (preset, finetune)


@pytest.fixture(scope="module")
def killed(runs, sample, tmp_path_factory):
    """Per engine, the LLaVA LoRA run of `runs` killed while saving its step-4 checkpoint: process 0
    dies before writing state.pt (after the engine's own files), or before the rename of a finished
    folder; then resumed with resume_from=latest (fsdp2 by 1 process, DeepSpeed by 2)."""
    root = tmp_path_factory.mktemp("killed")
    folders = {}
    for engine, kill in (("fsdp2", "save:3"), ("zero2", "publish:2"), ("zero3", "save:3")):
        out = folders[engine] = root / engine
        overrides = _overrides(sample, out, "tiny-llava", "lora", f"distributed.engine={engine}")
        proc = _launch(2, [{"overrides": overrides, "kill": kill}], root / f"{engine}.json")
        assert proc.returncode != 0  # torchrun reports the killed process
        assert [p.name for p in complete_checkpoints(out)] == ["step-000002"], proc.stderr[-3000:]
        assert (out / "checkpoints" / ".tmp-step-000004").is_dir()
        resume = [*overrides, "resume_from=latest"]
        if engine == "fsdp2":  # one process: DCP reshards the 2-process checkpoint
            cmd = [sys.executable, "-m", "mdpo.train", *resume]
        else:  # the user's command
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m",
                   "mdpo.train", *resume]
        proc = _run(cmd)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert "resumed from" in proc.stdout
    return folders


@pytest.mark.parametrize("engine", ENGINES)
def test_a_run_killed_while_saving_resumes_like_the_uninterrupted_run(runs, killed, engine):
    out, uninterrupted = killed[engine], runs[engine, "tiny-llava", "lora"]
    _assert_same_rows(_rows(out), _rows(uninterrupted))  # steps 1-2 of the killed run, 3-5 of the resumed one
    _assert_same_rows(_rows(out, "eval_metrics.jsonl"), _rows(uninterrupted, "eval_metrics.jsonl"), keys=("loss/total",))
    assert [p.name for p in complete_checkpoints(out)] == ["step-000002", "step-000004", "step-000005"]
    state = torch.load(out / "checkpoints" / "step-000005" / "state.pt", weights_only=True)
    assert state["engine"] == engine and state["processes"] == (1 if engine == "fsdp2" else 2)


def test_a_zero_checkpoint_does_not_resume_on_another_number_of_processes(runs, sample, tmp_path):
    ckpt = runs["zero2", "tiny-llava", "lora"] / "checkpoints" / "step-000002"
    proc = _run([sys.executable, "-m", "mdpo.train", *_overrides(sample, tmp_path / "r", "tiny-llava", "lora",
                                                                 "distributed.engine=zero2", f"resume_from={ckpt}")])
    assert proc.returncode == 2 and "of 2 process(es) cannot be resumed by 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_checkpoint_of_another_engine_is_refused(runs, sample, tmp_path, capsys):
    ckpt = runs["fsdp2", "tiny-llava", "lora"] / "checkpoints" / "step-000002"
    code = main(_overrides(sample, tmp_path / "r", "tiny-llava", "lora", f"resume_from={ckpt}"))
    err = capsys.readouterr().err
    assert code == 2 and "distributed.engine: 'fsdp2' → 'ddp'" in err and "Traceback" not in err


# ------------------------------------------------------------------------------- refused configs
def _refused(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_configs_that_cannot_work_are_refused_in_one_line(sample, tmp_path, capsys, monkeypatch):
    base = _overrides(sample, tmp_path / "x", "tiny-llava", "lora")
    # the engine's package is missing
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    assert "pip install deepspeed" in _refused(capsys, [*base, "distributed.engine=zero3"])
    monkeypatch.delitem(sys.modules, "deepspeed")
    # an accelerate config that asks for another engine
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert "asks for zero3, but distributed.engine=ddp" in _refused(capsys, base)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert "FSDP version 1" in _refused(capsys, [*base, "distributed.engine=fsdp2"])
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    # a DeepSpeed config with its own gradient accumulation, or an optimizer of its own
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"gradient_accumulation_steps": 2, "zero_optimization": {"reduce_bucket_size": 5e7}}))
    err = _refused(capsys, [*base, "distributed.engine=zero2", f"distributed.deepspeed_config={ds}"])
    assert "gradient_accumulation_steps=2" in err and "needs 4" in err
    ds.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    assert "'optimizer' section" in _refused(capsys, [*base, "distributed.engine=zero2", f"distributed.deepspeed_config={ds}"])
    # settings that do not fit the engine
    assert "needs distributed.engine zero2 or zero3" in _refused(capsys, [*base, "distributed.offload=optimizer"])
    assert "save_merged=true needs the whole model" in _refused(capsys, [*base, "distributed.engine=fsdp2", "save_merged=true"])
    assert "is not one of" in _refused(capsys, [*base, "distributed.engine=fsdp"])


def test_a_deepspeed_config_that_agrees_is_merged_under_ours():
    from mdpo.distributed import _merge_ds_config

    user = {"gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 3, "reduce_bucket_size": 5e7},
            "communication_data_type": "fp32"}
    ours = {"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 3}}
    assert _merge_ds_config(user, ours, "x.json") == {"gradient_accumulation_steps": 4, "communication_data_type": "fp32",
                                                      "zero_optimization": {"stage": 3, "reduce_bucket_size": 5e7}}


@pytest.mark.parametrize("config_file, engine", [("ddp", None), ("fsdp", "fsdp2"), ("deepspeed-zero2", "zero2"),
                                                  ("deepspeed-zero3", "zero3")])
def test_the_shipped_accelerate_configs_start_the_engine_they_name(config_file, engine):
    """Each file in configs/accelerate/, read by accelerate's own launcher code as `accelerate launch
    --config_file FILE --num_processes 2` reads it on this machine, gives the processes an environment
    that mdpo accepts with its engine and refuses with any other (ddp.yaml: any engine)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    from mdpo.distributed import DistributedError, check_launcher

    path = ROOT / "configs" / "accelerate" / f"{config_file}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), "--num_processes", "2", "-m", "mdpo.train", "x.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    assert not args.cpu and args.num_processes == 2  # not silently turned into one CPU process
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    for other in ("ddp", *ENGINES):
        cfg = load_config(None, [f"distributed.engine={other}", "model.preset=tiny-llava"])
        if engine is None or other == engine:
            check_launcher(cfg, env)
        else:
            with pytest.raises(DistributedError, match=f"asks for {engine}, but distributed.engine={other}"):
                check_launcher(cfg, env)
