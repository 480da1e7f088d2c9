"""Damaged, foreign and mixed runs (issue 21): a checkpoint or adapter missing tensors, of other shapes
or dtypes, a state.pt without a position, a pickled adapter .bin, a fresh run into another run's
output_dir, a resume of a checkpoint with other training settings. Each is refused in one line naming
the file, key or tensor; none loads silently."""
import shutil

import pytest
import torch

from mdpo.checkpoints import CheckpointError
from mdpo.config import ConfigError, load_config
from mdpo.train import main, train
from tiny_runs import sample_records, tiny_run_overrides


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return sample_records(tmp_path_factory, n=8, seed=21)


def _overrides(sample, out, *extra):
    return tiny_run_overrides(sample, out, "effective_batch_size=4", "epochs=2", "lr=1e-3", "model.lora_r=4",
                              "model.lora_alpha=8", "model.dtype=float32", *extra)


@pytest.fixture(scope="module")
def run(sample, tmp_path_factory):
    """A 3-step LoRA run (checkpoints at steps 2 and 3: save_every=2 and the last) and its final/ adapter."""
    out = tmp_path_factory.mktemp("damaged") / "run"
    train(load_config(None, _overrides(sample, out, "max_steps=3", "save_every=2")))
    return out


def _copy(run, tmp_path, name="ckpt"):
    """A copy of the run's step-2 checkpoint, to damage."""
    return shutil.copytree(run / "checkpoints" / "step-000002", tmp_path / name)


def _one_line(capsys, prefix):
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in err and err.endswith(lines[0]), err
    return lines[0]


# --------------------------------------------------------------------------------- trainable.pt
def _damage_trainable(ckpt, how):
    trained = torch.load(ckpt / "trainable.pt", weights_only=True)
    if how == "half":  # every other tensor gone
        trained = {k: v for i, (k, v) in enumerate(sorted(trained.items())) if i % 2 == 0}
    elif how == "rank":  # LoRA r=8 instead of 4: other shapes
        trained = {k: torch.zeros(8, v.shape[1]) if ".lora_A." in k else torch.zeros(v.shape[0], 8) for k, v in trained.items()}
    elif how == "dtype":
        trained = {k: v.double() for k, v in trained.items()}
    torch.save(trained, ckpt / "trainable.pt")


@pytest.mark.parametrize("how, message", [
    ("half", r"trainable\.pt does not hold this run's trained parameters: 14 of the 28 trained tensors are missing \(base_model"),
    ("rank", r"28 tensor\(s\) do not fit: .*lora_A\.default\.weight has shape \(8, 128\), the model's \(4, 128\)"),
    ("dtype", r"tensor\(s\) do not fit: .* is float64, the model's float32"),
])
def test_resume_refuses_a_trainable_pt_that_is_not_this_runs(how, message, run, sample, tmp_path):
    ckpt = _copy(run, tmp_path)
    _damage_trainable(ckpt, how)
    with pytest.raises(CheckpointError, match=message):
        train(load_config(None, _overrides(sample, tmp_path / "resumed", "max_steps=3", f"resume_from={ckpt}",
                                           f"reference.cache_path={run / 'reference_logps.pt'}")))


def test_mdpo_eval_and_adapter_checkpoints_refuse_missing_tensors(run, sample, tmp_path, capsys):
    from mdpo.eval.generate import load_generation_model
    from mdpo.eval.cli import main as mdpo_eval

    ckpt = _copy(run, tmp_path)
    _damage_trainable(ckpt, "half")
    assert mdpo_eval([str(ckpt), "--data", str(sample)]) == 2
    assert "14 of the 28 trained tensors are missing" in _one_line(capsys, "mdpo-eval: error:")
    with pytest.raises(CheckpointError, match=r"--adapter=.*14 of the 28 trained tensors are missing"):
        load_generation_model("tiny-llava", ckpt, device="cpu", preset_seed=42)
    wider = _copy(run, tmp_path, "wider")
    _damage_trainable(wider, "dtype")  # evaluation casts floating dtypes (a CPU run evaluated in bf16): fine
    assert load_generation_model("tiny-llava", wider, device="cpu", preset_seed=42).kind == "checkpoint"


def test_a_state_pt_without_a_position_is_named_before_any_weight_loads(run, sample, tmp_path, capsys, monkeypatch):
    import mdpo.train
    from mdpo.eval.cli import main as mdpo_eval

    ckpt = _copy(run, tmp_path)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    del state["position"]
    torch.save(state, ckpt / "state.pt")
    monkeypatch.setattr(mdpo.train, "build_model", lambda *a, **k: pytest.fail("model weights were loaded"))
    assert main(_overrides(sample, tmp_path / "resumed", "max_steps=3", f"resume_from={ckpt}")) == 2
    assert "state.pt: no loop position" in _one_line(capsys, "mdpo-train: error:")
    assert mdpo_eval([str(ckpt), "--data", str(sample)]) == 2
    assert "state.pt: no loop position" in _one_line(capsys, "mdpo-eval: error:")


def test_a_refused_pickle_is_named_in_a_whole_sentence(run, tmp_path):
    from mdpo.checkpoints import read_position

    class RunsCode:
        def __reduce__(self):
            return (open, (str(tmp_path / "code-ran"), "w"))

    ckpt = _copy(run, tmp_path)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    state["extra"] = RunsCode()
    torch.save(state, ckpt / "state.pt")
    with pytest.raises(CheckpointError) as refused:
        read_position(ckpt)
    message = str(refused.value)
    assert "state.pt: cannot be loaded safely (weights_only=True): it holds a pickled Python object (GLOBAL " in message
    assert message.endswith("a checkpoint file holds only tensors and plain containers") and "\n" not in message
    assert not (tmp_path / "code-ran").exists()


# ------------------------------------------------------------------------------------ adapters
def _adapter_copy(run, tmp_path):
    """A copy of the run folder's final/ adapter (with the run's config.json beside it)."""
    folder = tmp_path / "run"
    (folder).mkdir()
    shutil.copy(run / "config.json", folder / "config.json")
    return shutil.copytree(run / "final", folder / "final")


def test_an_adapter_bin_holding_a_pickle_is_named_and_safetensors_is_preferred(run, tmp_path):
    from safetensors.torch import load_file

    from mdpo.eval.generate import load_generation_model

    class RunsCode:
        def __reduce__(self):
            return (open, (str(tmp_path / "code-ran"), "w"))

    final = _adapter_copy(run, tmp_path)
    tensors = load_file(final / "adapter_model.safetensors")
    torch.save({**tensors, "extra": RunsCode()}, final / "adapter_model.bin")
    gm = load_generation_model("tiny-llava", final, device="cpu", preset_seed=42)  # safetensors beside it: read that
    assert gm.has_adapter
    (final / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"final/adapter_model\.bin: cannot be loaded safely .*GLOBAL .*adapter_model\.safetensors"):
        load_generation_model("tiny-llava", final, device="cpu", preset_seed=42)
    assert not (tmp_path / "code-ran").exists()


def test_an_adapter_missing_lora_tensors_is_refused(run, tmp_path):
    from safetensors.torch import load_file, save_file

    from mdpo.eval.generate import AdapterMismatchError, load_generation_model

    final = _adapter_copy(run, tmp_path)
    tensors = load_file(final / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".layers.1." not in k}, final / "adapter_model.safetensors")
    with pytest.raises(AdapterMismatchError, match=r"14 of the 28 LoRA tensors .* are missing from its weights file"):
        load_generation_model("tiny-llava", final, device="cpu", preset_seed=42)


# ---------------------------------------------------------------------------------- output_dir
def test_a_fresh_run_into_another_runs_folder_is_refused_and_changes_nothing(run, sample, tmp_path, capsys):
    out = shutil.copytree(run, tmp_path / "run")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(_overrides(sample, out, "max_steps=1", "lr=5e-4")) == 2
    line = _one_line(capsys, "mdpo-train: error:")
    assert f"output_dir={out} holds another run (config.json, metrics.jsonl, summary.json, checkpoints/, final/)" in line
    assert "overwrite_output_dir: true" in line
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_overwrite_output_dir_deletes_the_old_run_and_keeps_its_cache(run, sample, tmp_path, capsys):
    out = shutil.copytree(run, tmp_path / "run")
    (out / "notes.txt").write_text("mine")  # not a file mdpo-train writes: left alone
    train(load_config(None, _overrides(sample, out, "max_steps=1", "overwrite_output_dir=true")))
    printed = capsys.readouterr().out
    assert "overwrite_output_dir: deleted the earlier run's config.json, metrics.jsonl, summary.json, checkpoints/, final/" in printed
    assert "reference log-probs: reusing" in printed  # same fingerprint: the cache stayed and is used
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]  # run 1's step-2 and step-3 gone
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1 and (out / "notes.txt").read_text() == "mine"
    # another data setting: the cache in the overwritten folder is recomputed in place, not refused
    train(load_config(None, _overrides(sample, out, "max_steps=1", "overwrite_output_dir=true", "data.corruption_seed=7")))
    assert "recomputing it in place (overwrite_output_dir: true)" in capsys.readouterr().out


def test_resume_refuses_other_training_settings_and_notes_a_longer_run(run, sample, tmp_path, capsys):
    out = shutil.copytree(run, tmp_path / "run")
    assert main(_overrides(sample, out, "max_steps=4", "resume_from=latest", "lr=5e-4", "seed=7")) == 2
    line = _one_line(capsys, "mdpo-train: error:")
    assert "step-000003/config.json was written by a run with other training settings (lr: 0.001 → 0.0005; seed: 42 → 7)" in line
    # reporting and run-length keys may change: a longer run resumes, with a note
    train(load_config(None, _overrides(sample, out, "max_steps=4", "resume_from=latest", "save_every=1", "plots=true")))
    printed = capsys.readouterr().out
    assert "another run length (max_steps 3 → 4)" in printed and "resumed from" in printed
    with pytest.raises(ConfigError, match="overwrite_output_dir=true and resume_from=latest contradict"):
        load_config(None, _overrides(sample, out, "resume_from=latest", "overwrite_output_dir=true"))


def test_resume_latest_without_a_checkpoint_restarts_only_the_same_run(run, sample, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.json", "metrics.jsonl"):  # a run killed before its first checkpoint
        shutil.copy(run / name, out / name)
    with pytest.raises(ConfigError, match=r"resume_from: latest, no checkpoint yet\).*\(lr: 0\.001 → 0\.002\)"):
        train(load_config(None, _overrides(sample, out, "max_steps=3", "save_every=2", "resume_from=latest", "lr=2e-3")))
    summary = train(load_config(None, _overrides(sample, out, "max_steps=1", "resume_from=latest")))
    assert summary["steps"] == 1 and len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_an_output_dir_that_is_a_file_is_one_line(sample, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(_overrides(sample, tmp_path / "afile", "max_steps=1")) == 2
    assert f"output_dir={tmp_path / 'afile'} is a file, not a folder" in _one_line(capsys, "mdpo-train: error:")
