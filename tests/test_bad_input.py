"""Bad input a new user meets (issue 21): config values, data files that are not records, misleading
record messages, damaged reference caches, huge images, and a battery that runs `mdpo-train`,
`mdpo-eval` and `mdpo-data` on all of it: exit code 2, one line naming the file / key / record, no
traceback. Damaged checkpoints, adapters and output folders: tests/test_damaged_runs.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mdpo.config import ConfigError, load_config
from mdpo.data import BadRecordError, load_records, make_sample
from mdpo.errors import MdpoError
from mdpo.reference_cache import ReferenceCache, StaleCacheError, canonical

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A sample data set (absolute image paths, so every file below may sit anywhere) and broken copies."""
    root = tmp_path_factory.mktemp("bad")
    make_sample(root / "s", n=8, seed=5, n_eval=0)
    records = json.loads((root / "s" / "data.json").read_text())
    for r in records:
        r["image"] = str(root / "s" / r["image"])
    text = json.dumps(records)
    (root / "good.json").write_text(text)
    (root / "truncated.json").write_text(text[:-300])
    (root / "indented.json").write_text(json.dumps(records[0], indent=2))
    (root / "latin1.json").write_bytes(text.replace("square", "carr\u00e9", 1).encode("latin-1"))
    (root / "wrapped.json").write_text(json.dumps({"records": records}, indent=2))
    (root / "wrapped1.json").write_text(json.dumps({"records": records}))
    (root / "empty.json").write_text("[]")
    (root / "empty.jsonl").write_text("\n\n")
    return root


# -------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("override, message", [
    ("loss.beta=0", r"loss.beta must be a finite number > 0, got 0.0 \(β ≤ 0 zeroes or reverses"),
    ("loss.beta=-0.1", "loss.beta must be a finite number > 0, got -0.1"),
    ("lr=.nan", "lr is nan"),
    ("lr=-1", "lr must be a finite number > 0 .*got -1.0"),
    ("lr=.inf", "lr must be a finite number > 0 .*got inf"),
    ("lr=0", "lr must be a finite number > 0"),
    ("data.max_length=0", "data.max_length must be ≥ 1"),
    ("loss.delta=.nan", "loss.delta is nan"),
    ("warmup_ratio=1.5", r"warmup_ratio must be in \[0, 1\]"),
])
def test_config_values_that_train_wrong_or_crash_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.preset=tiny-llava", override])


def test_a_yaml_syntax_error_is_one_line_with_its_position(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 2\n  lr: [1e-5\nseed: 3\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value) == f"config file {path} is not valid YAML: mapping values are not allowed here at line 2, column 5"
    with pytest.raises(ConfigError, match=r"^override lr: cannot parse value '\[1e-5': expected ',' or '\]', but got "
                                          r"'<stream end>' at line 1, column 6 \(while parsing a flow sequence from line 1, column 1\)$"):
        load_config(None, ["lr=[1e-5"])


# ---------------------------------------------------------------------------------- data files
@pytest.mark.parametrize("name, message", [
    ("truncated.json", r"truncated.json: not valid JSON \([^()]*: line 1, column \d+\); it does not end with '\]' \(cut off\?\)"),
    ("indented.json", "indented.json: holds one JSON object; expected a JSON list of records or JSONL"),
    ("latin1.json", r"latin1.json: not UTF-8 text \(byte 0xe9 at line 1, column \d+\); save it as UTF-8"),
    ("wrapped.json", r"wrapped.json: one JSON object whose 'records' key holds a list of 8 records; .*jq '.records'"),
    ("wrapped1.json", r"wrapped1.json: one JSON object whose 'records' key holds a list of 8 records"),
    ("empty.json", r"empty.json: holds no records"),
    ("empty.jsonl", r"empty.jsonl: holds no records"),
])
def test_a_file_that_is_not_records_is_named_in_one_line(files, name, message):
    with pytest.raises(MdpoError, match=message) as refused:
        load_records(files / name)
    assert "\n" not in str(refused.value)


def test_a_jsonl_error_gives_its_line_and_real_column(files):
    records = json.loads((files / "good.json").read_text())[:3]
    records[1]["question"] = "Where is the red square? " * 20
    lines = [json.dumps(r) for r in records]
    cut = lines[1].index(', "chosen"') + 1  # line 2 ends after the comma that follows the long question
    lines[1] = lines[1][:cut]
    path = files / "cut.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadRecordError) as refused:
        load_records(path)
    assert cut > 500 and str(refused.value).endswith(
        f"cut.jsonl: line 2 is not valid JSON (Expecting property name enclosed in double quotes: column {cut + 1}); "
        "it does not end with '}' (cut off?)")  # before: "line 2 ... at column 1", the position after the newline


@pytest.mark.parametrize("field, value, reason", [
    ("question", 3, r"'question' must be a string, not int \(3\)"),
    ("question", ["a", "b"], r"'question' must be a string, not list \(\[\"a\", \"b\"\]\)"),
    ("question", None, r"missing 'question' \(null\)"),
    ("question", "  ", r"empty 'question'"),
])
def test_a_question_of_another_type_says_which(files, field, value, reason):
    records = json.loads((files / "good.json").read_text())
    records[2][field] = value
    path = files / f"q-{type(value).__name__}.json"
    path.write_text(json.dumps(records))
    with pytest.raises(BadRecordError, match=r"bad record 2 .*: " + reason):
        load_records(path)


def test_a_paper_prompt_of_another_type_says_which(files):
    records = json.loads((files / "good.json").read_text())
    record = {k: v for k, v in records[0].items() if k != "question"} | {"prompt": 7}
    path = files / "prompt-int.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(BadRecordError, match=r"'prompt' must be a string \(paper shape\) or a list of messages \(TRL shape\), not int"):
        load_records(path)


def test_identical_pairs_are_counted_by_mdpo_data_check_and_the_trainer(files, tmp_path, capsys, monkeypatch):
    import mdpo.train
    from mdpo.data.cli import main as mdpo_data
    from mdpo.errors import ModelLoadError

    records = json.loads((files / "good.json").read_text())
    for i in (2, 5):
        records[i]["rejected"] = records[i]["chosen"] + " "
    path = tmp_path / "same.json"
    path.write_text(json.dumps(records))
    assert mdpo_data(["check", str(path)]) == 0  # not bad records: counted
    assert "chosen == rejected: 2 pair(s) (their DPO term is constant), e.g. record 2 (id 'sample-00002'), record 5" in capsys.readouterr().out
    assert mdpo_data(["check", str(files / "good.json")]) == 0
    assert "chosen == rejected: 0 pair(s)\n" in capsys.readouterr().out

    def stop(*args, **kwargs):  # the start-up lines come before any weight loads
        raise ModelLoadError("stop here")

    monkeypatch.setattr(mdpo.train, "build_model", stop)
    args = [f"data.path={path}", f"output_dir={tmp_path / 'run'}", "model.preset=tiny-llava", "effective_batch_size=4",
            "micro_batch_size=2", "data.max_length=256", "report_to=none", "plots=false", "progress_bar=false"]
    assert mdpo.train.main(args) == 2
    assert (f"note: 2 of 8 pair(s) in {path} have chosen == rejected (records 2 (id 'sample-00002'), 5 (id 'sample-00005')): "
            "their DPO term is constant (no gradient); the conditional and anchor terms still train") in capsys.readouterr().out
    assert mdpo.train.main([*args, f"output_dir={tmp_path / 'dpo'}", "objective=dpo"]) == 2
    assert "they teach nothing under this objective" in capsys.readouterr().out


# ----------------------------------------------------------------------------- reference cache
def _cache(tmp_path):
    cache = ReferenceCache(canonical({"data.sha256": "abc"}), ["a", "b", "c"], torch.tensor([1.0, 2.0, 3.0]),
                           torch.tensor([4.0, 5.0, 6.0]), torch.tensor([[7.0, 8.0, 9.0]]))
    path = tmp_path / "ref.pt"
    cache.save(path)
    return cache, path


@pytest.mark.parametrize("edit", ["edited", "permuted", "ids permuted", "held flag"])
def test_a_cache_whose_values_changed_under_its_fingerprint_is_refused(tmp_path, edit):
    cache, path = _cache(tmp_path)
    blob = torch.load(path, weights_only=True)
    if edit == "edited":
        blob["chosen"][1] += 0.5
    elif edit == "permuted":
        blob["corrupted"][0] = blob["corrupted"][0].flip(0)
    elif edit == "ids permuted":
        blob["sample_ids"] = ["b", "a", "c"]
    else:
        blob["pair_held"][0] = False
    torch.save(blob, path)
    with pytest.raises(StaleCacheError, match=rf"reference cache {path}: its values do not match their checksum"):
        ReferenceCache.load(path, cache.fingerprint)


def test_a_bit_flipped_or_cut_off_cache_file_is_refused(tmp_path):
    cache, path = _cache(tmp_path)
    data = bytearray(path.read_bytes())
    at = bytes(data).index(torch.tensor([1.0, 2.0, 3.0]).numpy().tobytes()) + 5  # inside the chosen values
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(StaleCacheError, match=rf"reference cache {path}"):
        ReferenceCache.load(path, cache.fingerprint)
    cache.save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(StaleCacheError, match=rf"reference cache {path} cannot be read \(RuntimeError: PytorchStreamReader"):
        ReferenceCache.load(path, cache.fingerprint)


@pytest.mark.parametrize("blob, message", [
    ([1, 2], r"is not a reference cache \(a list\)"),
    ({"version": 3}, r"is not a reference cache \(a mapping without a fingerprint\)"),
    ({"version": 2, "fingerprint": {"data.sha256": "abc"}}, r"has format version 2, expected 3"),
])
def test_a_file_that_is_not_a_cache_is_one_line(tmp_path, blob, message):
    path = tmp_path / "ref.pt"
    torch.save(blob, path)
    with pytest.raises(StaleCacheError, match=message) as refused:
        ReferenceCache.load(path, {"data.sha256": "abc"})
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


# --------------------------------------------------------------------------------------- images
def _record(tmp_path, image):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"id": "big", "image": image, "question": "Q?", "chosen": "a", "rejected": "b"}]))
    return load_records(path).records[0]


def test_a_huge_image_is_decoded_reduced_and_a_small_one_as_before(tmp_path):
    from mdpo.data.records import load_image

    Image.new("RGB", (3000, 2400), (10, 200, 30)).save(tmp_path / "big.png")
    Image.new("RGB", (3000, 2400), (10, 200, 30)).save(tmp_path / "big.jpg", quality=95)
    Image.effect_noise((300, 200), 40).convert("RGB").save(tmp_path / "small.png")
    big = load_image(_record(tmp_path, "big.png"), max_pixels=1000 * 1000)
    assert big.size == (1000, 800) and big.mode == "RGB" and big.getpixel((500, 400)) == (10, 200, 30)  # factor 3
    jpeg = load_image(_record(tmp_path, "big.jpg"), max_pixels=1000 * 1000)  # decoded at 1/2 scale by the codec, then /2
    assert jpeg.width * jpeg.height <= 1000 * 1000 and jpeg.size == (750, 600)
    small = load_image(_record(tmp_path, "small.png"), max_pixels=1000 * 1000)
    with Image.open(tmp_path / "small.png") as original:
        assert small.tobytes() == original.convert("RGB").tobytes()


def test_an_image_over_pillows_limit_is_refused_naming_the_record(tmp_path, monkeypatch):
    from mdpo.data.records import load_image

    Image.new("L", (300, 300)).save(tmp_path / "bomb.png")
    record = _record(tmp_path, "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # 90,000 pixels > 2 × 10,000: refused before decoding
    with pytest.raises(BadRecordError, match=r"bad record 0 \(id 'big'\): image file unreadable: .*bomb.png \(DecompressionBombError"):
        load_image(record)


# ----------------------------------------------------------------------------------- CLI battery
def _fake_checkpoint(root: Path, state) -> Path:
    """A checkpoint folder with a real run config and the given state.pt (None: no state.pt)."""
    from mdpo.config import to_dict

    ckpt = root / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    cfg = load_config(None, ["model.preset=tiny-llava", f"output_dir={root}"])
    (ckpt / "config.json").write_text(json.dumps(to_dict(cfg), default=str))
    torch.save({}, ckpt / "trainable.pt")
    if state is not None:
        torch.save(state, ckpt / "state.pt")
    return ckpt


def _battery(files: Path, tmp: Path) -> list[tuple[str, list[str], str]]:
    """(command, argv, what the one error line must contain) for every bad input."""
    used = tmp / "used"
    used.mkdir()
    (used / "config.json").write_text("{}")
    (used / "metrics.jsonl").write_text("")
    (tmp / "afile").write_text("x")
    (tmp / "bad.yaml").write_text("max_steps: 2\n  lr: [1e-5\n")
    torch.save([1, 2], tmp / "cache-list.pt")
    torch.save({"version": 3}, tmp / "cache-nofp.pt")
    records = json.loads((files / "good.json").read_text())
    records[3]["chosen"] = ""
    (tmp / "bad-record.json").write_text(json.dumps(records))
    adapter = tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    torch.save({"x": subprocess.Popen}, adapter / "adapter_model.bin")  # a pickled class: refused, never imported
    good = str(files / "good.json")

    def train(*extra, data=good, out=None):
        return ["mdpo-train", [f"data.path={data}", f"output_dir={out or tmp / 'o'}", "model.preset=tiny-llava",
                               "effective_batch_size=4", "micro_batch_size=2", "data.max_length=256", "max_steps=1",
                               "report_to=none", "plots=false", "progress_bar=false", "model.lora_r=4", "model.lora_alpha=8", *extra]]

    def hallucination(*extra, data=good):
        return ["mdpo-eval", ["hallucination", "--model", "tiny-llava", "--data", data, "--out", str(tmp / "h"), "--no-progress", *extra]]

    cases = [
        (*train(data=files / "truncated.json"), "not valid JSON"),
        (*train(data=files / "indented.json"), "holds one JSON object"),
        (*train(data=files / "latin1.json"), "not UTF-8 text"),
        (*train(data=files / "wrapped.json"), "'records' key holds a list of 8 records"),
        (*train(data=files / "empty.json"), "holds no records"),
        (*train(data=tmp / "bad-record.json"), "bad record 3 (id 'sample-00003')"),  # worked before: kept
        (*train("loss.beta=0"), "loss.beta must be a finite number > 0"),
        (*train("lr=nan"), "lr is nan"),
        (*train("lr=-1"), "lr must be a finite number > 0"),
        (*train("data.max_length=0"), "data.max_length must be ≥ 1"),
        (*train(out=tmp / "afile"), "is a file, not a folder"),
        (*train(out=used), "holds another run (config.json, metrics.jsonl)"),
        (*train(f"reference.cache_path={tmp / 'cache-list.pt'}", out=tmp / "c1"), "is not a reference cache (a list)"),
        (*train(f"reference.cache_path={tmp / 'cache-nofp.pt'}", out=tmp / "c2"), "a mapping without a fingerprint"),
        (*train("resume_from=/nowhere/.tmp-step-000002"), "an interrupted, incomplete save"),  # worked before: kept
        (*train(f"resume_from={_fake_checkpoint(tmp / 'r1', {'optimizer': {}, 'scheduler': {}})}"), "no loop position"),
        (*train("data.pth=x"), "unknown key(s) data.pth"),  # worked before: kept
        ("mdpo-train", [str(tmp / "bad.yaml")], "mapping values are not allowed here at line 2, column 5"),
        ("mdpo-eval", [str(_fake_checkpoint(tmp / "r2", None)), "--data", good], "state.pt: missing from the checkpoint"),
        ("mdpo-eval", [str(_fake_checkpoint(tmp / "r3", [1])), "--data", good], "state.pt: holds a list"),
        ("mdpo-eval", [str(tmp), "--data", good], "no config.json"),  # worked before: kept
        (*hallucination(data=str(files / "truncated.json")), "not valid JSON"),
        (*hallucination(data=str(files / "latin1.json")), "not UTF-8 text"),
        (*hallucination("--adapter", str(adapter)), "adapter_model.bin: cannot be loaded safely"),
        ("mdpo-data", ["check", str(files / "latin1.json")], "not UTF-8 text"),
        ("mdpo-data", ["check", str(files / "wrapped1.json")], "'records' key holds a list of 8 records"),
        ("mdpo-data", ["check", str(files / "empty.jsonl")], "holds no records"),
        ("mdpo-data", ["check", str(files / "truncated.json")], "not valid JSON"),  # worked before: kept
        ("mdpo-data", ["preview", str(files / "indented.json"), "--out", str(tmp / "p.png")], "holds one JSON object"),
    ]
    return cases


def _error_line(command: str, argv: list[str], err: str) -> str:
    prefix = {"mdpo-train": "mdpo-train: error: ", "mdpo-data": f"mdpo-data {argv[0]}: error: ",
              "mdpo-eval": "mdpo-eval hallucination: error: " if argv[0] == "hallucination" else "mdpo-eval: error: "}[command]
    lines = [line for line in err.strip().splitlines() if line.startswith(prefix)]
    assert "Traceback" not in err and len(lines) == 1 and err.strip().endswith(lines[0]), (command, argv, err)
    return lines[0]


def test_every_cli_ends_bad_input_with_one_line_and_exit_2(files, tmp_path, capsys):
    from mdpo.data.cli import main as mdpo_data
    from mdpo.eval.cli import main as mdpo_eval
    from mdpo.train import main as mdpo_train

    mains = {"mdpo-train": mdpo_train, "mdpo-eval": mdpo_eval, "mdpo-data": mdpo_data}
    for command, argv, expected in _battery(files, tmp_path):
        capsys.readouterr()
        code = mains[command](argv)
        err = capsys.readouterr().err
        assert code == 2, (command, argv, err)
        assert expected in _error_line(command, argv, err), (command, argv, err)


@pytest.mark.parametrize("command, module, argv", [
    ("mdpo-train", "mdpo.train", ["data.path={latin1}", "output_dir={tmp}/o", "model.preset=tiny-llava", "loss.beta=0"]),
    ("mdpo-data", "mdpo.data.cli", ["check", "{wrapped}"]),
])
def test_a_real_process_exits_2_without_a_traceback(files, tmp_path, command, module, argv):
    argv = [a.format(latin1=files / "latin1.json", wrapped=files / "wrapped.json", tmp=tmp_path) for a in argv]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    line = _error_line(command, argv, done.stderr)
    assert ("loss.beta must be a finite number > 0" if command == "mdpo-train" else "'records' key holds a list") in line
