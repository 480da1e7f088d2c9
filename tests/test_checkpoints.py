"""Checkpoints: safe loading (weights_only), atomic saves that survive SIGKILL, `resume_from: latest`,
one copy of the trained weights and `save_total_limit`."""
import json
import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mdpo.checkpoints import CheckpointError, complete_checkpoints, load_file, read_position, rng_state, set_rng_state
from mdpo.config import load_config
from tiny_runs import sample_records, tiny_run_overrides
from mdpo.train import train

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return sample_records(tmp_path_factory, n=16, seed=3)


def _overrides(sample, out, *extra):
    return tiny_run_overrides(sample, out, "effective_batch_size=4", "epochs=2", "lr=1e-3", "model.lora_r=4",
                              "model.lora_alpha=8", "model.dtype=float32", *extra)


def _losses(out):
    return [json.loads(line)["loss/total"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


class _RunsCode:
    """Unpickling this calls open(path, "w"): a stand-in for a checkpoint that runs code when loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_rng_states_round_trip_as_plain_tensors():
    import io
    import random

    state = rng_state()
    draws = (random.random(), float(np.random.rand()), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == draws
    buffer = io.BytesIO()  # the state loads back with weights_only=True
    torch.save(state, buffer)
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == draws


def test_a_checkpoint_holding_a_pickled_object_is_refused(sample, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, _overrides(sample, out, "max_steps=2")))
    ckpt = out / "checkpoints" / "step-000002"
    for name in ("trainable.pt", "state.pt", "rng-0.pt"):  # every file of a checkpoint loads safely
        load_file(ckpt / name)
    marker = tmp_path / "code-ran"
    for name in ("state.pt", "rng-0.pt"):
        original = (ckpt / name).read_bytes()
        blob = torch.load(ckpt / name, weights_only=True)
        blob["extra"] = _RunsCode(marker)
        torch.save(blob, ckpt / name)
        with pytest.raises(CheckpointError, match=rf"{name}: cannot be loaded safely \(weights_only=True\)"):
            train(load_config(None, _overrides(sample, tmp_path / "resumed", "max_steps=3", f"resume_from={ckpt}",
                                               f"reference.cache_path={out / 'reference_logps.pt'}")))
        if name == "state.pt":  # what mdpo-eval reads for the step
            with pytest.raises(CheckpointError, match="state.pt: cannot be loaded safely"):
                read_position(ckpt)
        assert not marker.exists()
        (ckpt / name).write_bytes(original)


# --------------------------------------------------------------------------- atomic saves, SIGKILL
def _run_and_maybe_die(overrides: list[str], kill_before: str) -> None:
    """In a forked child: train, SIGKILLing itself just before the N-th checkpoint file write
    ("save:N") or the N-th rename of a finished temporary checkpoint folder ("publish:N")."""
    import mdpo.checkpoints as ckpt
    from mdpo.train import main

    torch.cuda.is_available = lambda: False  # a CPU run (a forked child must not touch the parent's CUDA)
    # One intra-op thread: the OpenMP pool the parent already started does not survive a fork, and the
    # child's first parallel region would wait on it for ever (seen in CI with 2 threads).
    torch.set_num_threads(1)
    kind, at = kill_before.split(":")
    calls = {"save": 0, "publish": 0}

    def hooked(name, original):
        def run(*args, **kwargs):
            calls[name] += 1
            if name == kind and calls[name] == int(at):
                os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a pre-emption would
            return original(*args, **kwargs)
        return run

    ckpt._save_file = hooked("save", ckpt._save_file)
    ckpt._publish = hooked("publish", ckpt._publish)
    code = main(overrides)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _child(overrides: list[str], kill_before: str = "none:0") -> int:
    """Exit code of a forked child running `_run_and_maybe_die` (-9: killed); forked, so every run
    shares this process's imports and threads and starts in a fraction of a second; all on the CPU."""
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=_run_and_maybe_die, args=(overrides, kill_before))
    proc.start()
    proc.join(timeout=300)
    if proc.exitcode is None:  # hung: never leave it behind
        proc.kill()
        proc.join()
        raise AssertionError("the forked training run did not finish in 300 s")
    return proc.exitcode


def test_a_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(sample, tmp_path, capfd):
    """Checkpoints at steps 2, 4 (epoch end) and 5; each save writes trainable.pt, state.pt, rng-0.pt,
    then renames. SIGKILL during the step-4 save — after its first file, after its second, and after
    all its files but before the rename — leaves step 2 as the newest complete checkpoint; `resume_from=latest` continues
    from it (LoRA dropout on: the RNG matters) and the run's losses equal the uninterrupted run's."""
    common = ["max_steps=5", "save_every=2"]
    assert _child(_overrides(sample, tmp_path / "baseline", *common)) == 0
    expected = _losses(tmp_path / "baseline")
    assert len(expected) == 5
    for kill_before in ("save:5", "save:6", "publish:2"):  # after trainable.pt; after state.pt too; before the rename
        out = tmp_path / kill_before.replace(":", "-")
        assert _child(_overrides(sample, out, *common), kill_before) == -signal.SIGKILL
        assert [p.name for p in complete_checkpoints(out)] == ["step-000002"]
        assert (out / "checkpoints" / ".tmp-step-000004").is_dir()  # the interrupted save, never loaded
        assert len(_losses(out)) == 4  # the killed run had logged steps 1..4
        capfd.readouterr()
        assert _child(_overrides(sample, out, *common, "resume_from=latest")) == 0
        assert f"resumed from {out / 'checkpoints' / 'step-000002'} at step 2" in capfd.readouterr().out
        assert (out / "checkpoints" / "step-000005").is_dir()
        assert _losses(out) == expected, kill_before  # bit for bit: same process setup, same thread count
        assert [p.name for p in complete_checkpoints(out)] == ["step-000002", "step-000004", "step-000005"]
        assert not (out / "checkpoints" / ".tmp-step-000004").exists()


def test_resume_from_latest_without_a_checkpoint_starts_at_step_0(sample, tmp_path, capsys):
    out = tmp_path / "fresh"
    summary = train(load_config(None, _overrides(sample, out, "max_steps=1", "resume_from=latest")))
    assert summary["steps"] == 1 and "no complete checkpoint" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="interrupted, incomplete save"):
        train(load_config(None, _overrides(sample, out, "max_steps=2", f"resume_from={out / 'checkpoints' / '.tmp-step-000001'}")))


# ------------------------------------------------------------------------- one copy, total limit
def test_weights_stored_once_and_save_total_limit(sample, tmp_path):
    out = tmp_path / "limited"
    train(load_config(None, _overrides(sample, out, "max_steps=5", "save_every=1", "save_total_limit=2")))
    kept = complete_checkpoints(out)
    assert [p.name for p in kept] == ["step-000004", "step-000005"]
    for ckpt in kept:
        assert (ckpt / "trainable.pt").is_file() and not (ckpt / "adapter").exists()  # LoRA weights once
    # Resumed from step 4 with a limit of 1: the checkpoint resumed from is never deleted, the last is kept.
    train(load_config(None, _overrides(sample, out, "max_steps=7", "save_every=1", "save_total_limit=1",
                                       f"resume_from={kept[0]}")))
    assert [p.name for p in complete_checkpoints(out)] == ["step-000004", "step-000007"]
    with pytest.raises(Exception, match="save_total_limit must be ≥ 0"):
        load_config(None, _overrides(sample, out, "save_total_limit=-1"))


# ------------------------------------------------------------------- another number of processes
class _FakeEngine:
    """What load_checkpoint uses of a ddp `mdpo.distributed.Engine`, posing as process `rank` of `world`."""

    name = "ddp"

    def __init__(self, rank, world):
        from mdpo.distributed import Engine

        self.rank, self.world, self.printed = rank, world, []
        self.load = lambda folder, module, optimizer, state: Engine.load(self, folder, module, optimizer, state)

    def unwrap(self, model):
        return model

    def print(self, *args):
        self.printed.append(" ".join(map(str, args)))


def test_resuming_with_more_processes_derives_the_missing_rng_states(sample, tmp_path):
    import types

    from mdpo.checkpoints import load_checkpoint
    from mdpo.components import build_model

    out = tmp_path / "one"
    cfg = load_config(None, _overrides(sample, out, "max_steps=2"))
    train(cfg)
    ckpt = out / "checkpoints" / "step-000002"
    loaded, _ = build_model(cfg, torch.device("cpu"))
    trainable = [p for p in loaded.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scorer = types.SimpleNamespace(model=loaded.model)

    def draws(rank, world):
        engine = _FakeEngine(rank, world)
        position = load_checkpoint(ckpt, engine, scorer, optimizer, scheduler, seed=cfg.seed)
        assert position["global_step"] == 2
        return torch.rand(4).tolist(), engine.printed

    rank0, _ = draws(0, 1)
    again, printed = draws(0, 2)
    assert again == rank0 and printed[0].startswith("note: ")  # process 0 reads its own rng-0.pt
    rank1, printed = draws(1, 2)
    assert "saved by 1 process(es), this run has 2" in printed[0] and "derived" in printed[0]
    assert draws(1, 2)[0] == rank1 and rank1 != rank0  # deterministic, and not a copy of process 0's stream
    assert draws(2, 3)[0] not in (rank0, rank1)


# ---------------------------------------------------------------- the final adapter, outside mdpo
@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-qwen2-vl"])
def test_the_final_adapter_loads_with_peft_and_transformers(sample, tmp_path, preset):
    """The README's two lines (AutoPeftModelForCausalLM does not know these model classes) give the
    trained policy: the same log-probs as mdpo's model with the run's last trained parameters."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from mdpo.checkpoints import load_trainable
    from mdpo.components import build_model, make_collator, make_corruption
    from mdpo.data import load_records
    from mdpo.models import save_preset
    from mdpo.scoring import SequenceScorer

    model_dir = save_preset(preset, tmp_path / "model")
    out = tmp_path / "run"
    overrides = [o for o in _overrides(sample, out, "max_steps=2", "lr=1e-2") if not o.startswith("model.preset")]
    cfg = load_config(None, [*overrides, f"model.path={model_dir}"])
    train(cfg)

    readme = (ROOT / "README.md").read_text()
    block = next(b for b in readme.split("```python")[1:] if "PeftModel.from_pretrained(base" in b).split("```")[0]
    lines = [line.strip() for line in block.splitlines() if "from_pretrained(" in line]
    assert len(lines) == 2, lines
    names = {"PeftModel": PeftModel, "AutoModelForImageTextToText": AutoModelForImageTextToText}
    source = re.sub(r'AutoModelForImageTextToText\.from_pretrained\("[^"]*"\)',
                    f"AutoModelForImageTextToText.from_pretrained({str(model_dir)!r})", "\n".join(lines))
    source = re.sub(r'PeftModel\.from_pretrained\(base, "[^"]*"\)', f"PeftModel.from_pretrained(base, {str(out / 'final')!r})", source)
    exec(source, names)  # the README's two lines, with this run's folders
    model = names["model"].eval()

    loaded, _ = build_model(cfg, torch.device("cpu"))
    load_trainable(loaded.model, out / "checkpoints" / "step-000002", "test")
    loaded.model.eval()
    records = load_records(sample, processor=loaded.processor, max_length=256).records[:2]
    batch = make_collator(cfg, loaded, make_corruption(cfg), records)(records)
    with torch.no_grad():
        policy = SequenceScorer(loaded.model, loaded.adapter)(batch)
        reloaded = SequenceScorer(model, loaded.adapter)(batch)
        with model.disable_adapter():
            untrained = SequenceScorer(model, loaded.adapter)(batch)
    torch.testing.assert_close(reloaded, policy, rtol=1e-5, atol=1e-5)
    assert (reloaded - untrained).abs().max() > 1e-3  # the adapter is applied: it trained away from the base
