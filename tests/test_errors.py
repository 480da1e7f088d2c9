"""Errors a person reads: every error of the library's own ends `mdpo-train` / `mdpo-eval` / `mdpo-data`
with one line and exit code 2, and the data are checked before any model weight loads."""
import json

import pytest
import torch

from mdpo.errors import MdpoError, ModelLoadError, ModelNotFoundError, UnsupportedModelError
from mdpo.models import save_preset
from tiny_runs import sample_records, tiny_run_overrides
from mdpo.train import main


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return sample_records(tmp_path_factory, n=8, seed=4)


def _args(sample, out, *extra):
    return tiny_run_overrides(sample, out, "effective_batch_size=4", "epochs=1", "max_steps=1", "model.lora_r=4",
                              "model.lora_alpha=8", "model.dtype=float32", *extra)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("mdpo-train: error: ") and "Traceback" not in err, err
    return err


@pytest.fixture
def no_weights(monkeypatch):
    """Make loading the model weights fail loudly: what is tested must fail before it."""
    import mdpo.train

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr(mdpo.train, "build_model", refuse)


def test_model_errors_are_library_errors_and_keep_their_builtin_bases():
    assert issubclass(ModelLoadError, MdpoError) and issubclass(ModelLoadError, ValueError)
    assert issubclass(ModelNotFoundError, FileNotFoundError) and issubclass(ModelNotFoundError, ModelLoadError)
    assert issubclass(UnsupportedModelError, NotImplementedError)


def test_a_folder_without_config_json(sample, tmp_path, capsys, no_weights):
    (tmp_path / "model").mkdir()
    assert main(_args(sample, tmp_path / "o", "model.preset=null", f"model.path={tmp_path / 'model'}")) == 2
    assert "has no config.json" in _one_error_line(capsys)


@pytest.mark.parametrize("model_type", ["gpt2", "not-a-transformers-model"])
def test_an_unknown_model_type(model_type, sample, tmp_path, capsys, no_weights):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert main(_args(sample, tmp_path / "o", "model.preset=null", f"model.path={tmp_path / 'model'}")) == 2
    assert f"unsupported model_type '{model_type}'" in _one_error_line(capsys)


def test_a_folder_without_processor_files(sample, tmp_path, capsys, no_weights):
    from mdpo.models import build_preset

    build_preset("tiny-llava").model.save_pretrained(tmp_path / "model")  # weights and config, no processor
    capsys.readouterr()
    assert main(_args(sample, tmp_path / "o", "model.preset=null", f"model.path={tmp_path / 'model'}")) == 2
    assert "its processor cannot be loaded" in _one_error_line(capsys)


def test_a_family_mismatch(sample, tmp_path, capsys, no_weights):
    save_preset("tiny-llava", tmp_path / "model")
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(_args(sample, tmp_path / "o", "model.preset=null", f"model.path={tmp_path / 'model'}",
                      "model.family=qwen2-vl")) == 2
    assert "does not serve model_type 'llava'" in _one_error_line(capsys)


def test_an_unknown_preset(sample, tmp_path, capsys):
    assert main(_args(sample, tmp_path / "o", "model.preset=tiny-gpt")) == 2
    assert "model.preset='tiny-gpt' is not one of" in _one_error_line(capsys)


def test_a_bad_record_is_found_before_the_weights_load_and_says_how_to_skip(sample, tmp_path, capsys, no_weights):
    records = json.loads(sample.read_text())
    records[3]["chosen"] = ""
    bad = sample.parent / "bad.json"
    bad.write_text(json.dumps(records))
    assert main(_args(bad, tmp_path / "o")) == 2
    line = _one_error_line(capsys)
    assert "bad record 3" in line and "data.on_bad_record: skip" in line


def test_a_folder_model_is_checked_before_its_weights_load(sample, tmp_path, monkeypatch, capsys):
    """With a save_pretrained folder the processor loads first; the weights only after the records."""
    import mdpo.train

    save_preset("tiny-llava", tmp_path / "model")
    capsys.readouterr()  # save_pretrained's progress bar
    seen = {}

    def record_and_refuse(cfg, device, prepared=None):
        seen["prepared"] = prepared
        raise ModelLoadError("stop here")

    monkeypatch.setattr(mdpo.train, "build_model", record_and_refuse)
    assert main(_args(sample, tmp_path / "o", "model.preset=null", f"model.path={tmp_path / 'model'}")) == 2
    assert "stop here" in _one_error_line(capsys)
    assert seen["prepared"].model is None and seen["prepared"].processor is not None and seen["prepared"].family == "llava"


def test_out_of_memory_names_the_settings_that_lower_it(sample, tmp_path, monkeypatch, capsys):
    import mdpo.train

    def oom(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(mdpo.train.SequenceScorer, "forward", oom)
    assert main(_args(sample, tmp_path / "o")) == 2
    line = _one_error_line(capsys)
    assert "\n" not in line and "Tried to allocate 2.00 GiB" in line
    assert "micro_batch_size (now 2" in line and "data.max_length (now 256" in line
    assert "model.gradient_checkpointing: true (now false" in line
    assert main(_args(sample, tmp_path / "o2", "model.gradient_checkpointing=true")) == 2
    assert "already true" in _one_error_line(capsys)


def test_mdpo_eval_and_mdpo_data_print_library_errors(tmp_path, monkeypatch, capsys):
    import mdpo.data.cli
    import mdpo.evaluate
    from mdpo.eval.cli import main as mdpo_eval

    def fail(*args, **kwargs):
        raise UnsupportedModelError("that model soft-caps its logits")  # an MdpoError that is no ValueError

    monkeypatch.setattr(mdpo.evaluate, "evaluate_checkpoint", fail)
    assert mdpo_eval([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "mdpo-eval: error: that model soft-caps its logits"
    monkeypatch.setattr(mdpo.data.cli, "_check", fail)
    assert mdpo.data.cli.main(["check", str(tmp_path / "x.json")]) == 2
    assert "that model soft-caps its logits" in capsys.readouterr().err


def test_lora_target_modules_reach_the_model_and_a_wrong_name_is_named(sample, tmp_path, capsys):
    assert main(_args(sample, tmp_path / "o", "model.lora_target_modules=[q_proj, qproj]")) == 2
    assert "model.lora_target_modules: 'qproj'" in _one_error_line(capsys)
    assert main(_args(sample, tmp_path / "o2", "model.lora_target_modules=[v_proj]")) == 0
    trained = torch.load(tmp_path / "o2" / "checkpoints" / "step-000001" / "trainable.pt", weights_only=True)
    assert trained and all(".v_proj.lora_" in name for name in trained)
