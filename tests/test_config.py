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
        cfg = load_config(path)
        assert cfg.objective == "mdpo", path


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
