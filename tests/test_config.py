"""The typed training config: YAML + overrides, and the errors for bad keys and values."""
import pytest

from mdpo.config import ConfigError, TrainConfig, load_config


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_papers():
    cfg = TrainConfig()
    assert (cfg.loss.beta, cfg.loss.delta, cfg.lr, cfg.warmup_ratio, cfg.effective_batch_size, cfg.epochs) == (0.1, 0.0, 1e-5, 0.1, 32, 3)
    assert (cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_dropout) == (64, 128, 0.05)
    assert cfg.data.crop_area == (0.01, 0.2) and cfg.reference.mode == "cached"


def test_yaml_and_overrides(tmp_path):
    path = _write(tmp_path, "objective: dpo\nlr: 1e-5\nmodel:\n  preset: tiny-llava\ndata:\n  path: x.json\n")
    cfg = load_config(path, ["max_steps=7", "data.crop_area=[0.2, 0.5]", "loss.beta=1", "data.image_root=/img", "output_dir=o"])
    assert cfg.objective == "dpo" and cfg.lr == 1e-5 and cfg.max_steps == 7 and cfg.data.crop_area == (0.2, 0.5)
    assert cfg.loss.beta == 1.0 and isinstance(cfg.loss.beta, float)
    assert (cfg.data.path, cfg.data.image_root, cfg.output_dir, cfg.model.preset) == ("x.json", "/img", "o", "tiny-llava")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["max_steps=abc"], "max_steps: expected an integer"),
        (["data.pth=a"], r"unknown key\(s\) data.pth; valid keys here: data.path"),
        (["lr=fast"], "lr: expected a number"),
        (["seed=1.5"], "seed: expected an integer"),
        (["progress_bar=maybe"], "progress_bar: expected true or false"),
        (["data.crop_area=[0.1]"], r"data.crop_area: expected a list of 2"),
        (["objective=ipo"], "objective='ipo' is not one of"),
        (["reference.mode=sometimes"], "reference.mode='sometimes'"),
        (["max_steps"], "must look like key=value"),
        (["model.path=/m"], "exactly one of model.preset and model.path"),
        (["effective_batch_size=6", "micro_batch_size=4"], "multiple of micro_batch_size"),
        (["data.crop_area=[0.5, 0.2]"], "0 < low ≤ high ≤ 1"),
    ],
)
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.preset=tiny-llava", *overrides])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(_write(tmp_path, "model:\n  preset: tiny-llava\nbatch: 3\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))
    assert any(p.name == "tiny-cpu.yaml" for p in configs)
    for path in configs:
        cfg = load_config(path)  # every key known, every value valid
        assert (cfg.model.preset is None) != (cfg.model.path is None), path


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "llava-1.5-7b.yaml"])
def test_print_config_shows_every_key_and_reads_back_equal(name, tmp_path, capsys):
    from pathlib import Path

    import yaml

    from mdpo.train import main

    path = Path(__file__).resolve().parents[1] / "configs" / name
    out = tmp_path / "run"
    assert main([str(path), "lr=2e-4", "loss.delta=0.5", f"output_dir={out}", "--print-config"]) == 0
    text = capsys.readouterr().out
    tree = yaml.safe_load(text)
    assert tree["lr"] == 2e-4 and tree["loss"]["delta"] == 0.5 and "eval_every" in tree and "cache_path" in tree["reference"]
    assert load_config(_write(tmp_path, text)) == load_config(path, ["lr=2e-4", "loss.delta=0.5", f"output_dir={out}"])
    assert not out.exists()  # nothing ran


def _flat_keys(cls=TrainConfig, prefix=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _flat_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_every_key_has_a_comment_which_is_its_help():
    from mdpo.config import config_keys

    keys = config_keys()
    assert [k["key"] for k in keys] == list(_flat_keys())  # every field of every section, in order
    undocumented = [k["key"] for k in keys if not k["help"]]
    assert not undocumented, f"config keys without a comment in mdpo/config.py: {undocumented}"
    by_key = {k["key"]: k for k in keys}
    assert by_key["data.crop_area"]["type"] == "tuple[float, float]" and by_key["data.crop_area"]["default"] == (0.01, 0.2)
    assert by_key["lr"]["help"] == "peak learning rate of AdamW"


def test_help_lists_every_key_with_type_default_and_meaning(tmp_path, capsys):
    from mdpo.config import config_keys
    from mdpo.train import main

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for entry in config_keys():
        assert f"  {entry['key']}  ({entry['type']}, default " in text, entry["key"]
        assert entry["help"] in text
    assert "model.lora_r  (int, default 64)" in text and "[this config:" not in text
    # mdpo-train CONFIG --help: the same list, with the values the config (and overrides) set
    path = _write(tmp_path, "model:\n  preset: tiny-llava\n  lora_r: 8\n")
    out = tmp_path / "run"
    assert main([str(path), f"output_dir={out}", "--help"]) == 0
    text = capsys.readouterr().out
    assert "model.lora_r  (int, default 64)  [this config: 8]" in text and "[this config: tiny-llava]" in text
    assert "model.lora_alpha  (int, default 128)\n" in text and not out.exists()
    assert main([str(tmp_path / "missing.yaml"), "--help"]) == 2  # a config that cannot load says why


def test_report_to_and_the_old_tensorboard_key():
    base = ["model.preset=tiny-llava"]
    assert load_config(None, base).report_to == "tensorboard"
    assert load_config(None, [*base, "report_to=none"]).report_to == "none"
    old_off = load_config(None, [*base, "tensorboard=false"])
    assert old_off.report_to == "none" and old_off.tensorboard is None
    assert load_config(None, [*base, "tensorboard=true"]).report_to == "tensorboard"
    with pytest.raises(ConfigError, match="tensorboard=true contradicts report_to='wandb'"):
        load_config(None, [*base, "tensorboard=true", "report_to=wandb"])
    with pytest.raises(ConfigError, match="report_to='mlflow' is not one of"):
        load_config(None, [*base, "report_to=mlflow"])


def test_lora_target_modules_is_a_list_of_names():
    base = ["model.preset=tiny-llava"]
    assert load_config(None, base).model.lora_target_modules is None
    assert load_config(None, [*base, "model.lora_target_modules=[q_proj, v_proj]"]).model.lora_target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"model.lora_target_modules: expected list\[str\] or null, got 'q_proj'"):
        load_config(None, [*base, "model.lora_target_modules=q_proj"])
    with pytest.raises(ConfigError, match=r"model.lora_target_modules: expected list\[str\] or null, got \['q_proj', 3\]"):
        load_config(None, [*base, "model.lora_target_modules=[q_proj, 3]"])


def _tiny_run_args(tmp_path, *extra):
    from mdpo.data import make_sample

    make_sample(tmp_path / "data", n=4, seed=1, n_eval=0)
    return [f"data.path={tmp_path / 'data' / 'data.json'}", f"output_dir={tmp_path / 'run'}", "model.preset=tiny-llava",
            "micro_batch_size=2", "effective_batch_size=2", "epochs=1", "max_steps=2", "model.lora_r=4",
            "model.lora_alpha=8", "progress_bar=false", "plots=false", "data.max_length=256", "model.dtype=float32", *extra]


def test_report_to_wandb_logs_each_row_to_a_wandb_run(tmp_path, monkeypatch):
    """A stand-in `wandb` module: nothing leaves the machine, and the trainer's calls are recorded."""
    import sys
    import types

    from mdpo.train import main

    calls = {"log": [], "finished": False}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finished"] = True

    fake = types.ModuleType("wandb")
    fake.__spec__ = types.SimpleNamespace(name="wandb")  # importlib.util.find_spec sees it as installed
    fake.init = lambda **kwargs: calls.setdefault("init", kwargs) and Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert main(_tiny_run_args(tmp_path, "report_to=wandb")) == 0
    assert calls["init"]["config"]["model"]["preset"] == "tiny-llava" and calls["finished"]
    steps = sorted({step for step, _ in calls["log"]})
    assert steps == [1, 2] and any("loss/total" in values for _, values in calls["log"])
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_report_to_wandb_without_wandb_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import importlib.util

    import mdpo.train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.setattr(mdpo.train, "build_model", lambda *a, **k: pytest.fail("model loaded"))
    assert mdpo.train.main(_tiny_run_args(tmp_path, "report_to=wandb")) == 2
    assert "report_to=wandb needs the wandb package" in capsys.readouterr().err
