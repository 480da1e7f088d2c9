"""`mdpo-data check / preview / make-sample`: exit codes and output."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from mdpo.data import load_records
from mdpo.data.cli import main
from mdpo.data.sample import COLOURS, POSITIONS, SHAPES


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    assert main(["make-sample", str(out), "--n", "30", "--seed", "4"]) == 0
    return out


def test_make_sample_writes_records_images_and_object_lists(sample_dir, capsys):
    rows = json.loads((sample_dir / "data.json").read_text())
    assert len(rows) == 30 and len({r["id"] for r in rows}) == 30
    kinds = {r["question_type"] for r in rows}
    assert {"count", "colour", "existence", "position", "describe"} <= kinds
    for r in rows:
        image = Image.open(sample_dir / r["image"])
        assert image.size == (64, 64) and image.mode == "RGB"
        assert r["chosen"] != r["rejected"] and 1 <= len(r["objects"]) <= 4
        for o in r["objects"]:
            assert o["shape"] in SHAPES and o["colour"] in COLOURS and o["position"] in POSITIONS.values()
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            # The object is really drawn: its colour is at the centre of its box.
            assert image.getpixel(((x0 + x1) // 2, (y0 + y1 - 1) // 2 + 1)) == COLOURS[o["colour"]]
    # Answers follow the scene: count questions are right in chosen and wrong in rejected.
    for r in rows:
        if r["question_type"] == "count":
            shape = r["question"].split()[2].rstrip("s")
            n = sum(o["shape"] == shape for o in r["objects"])
            number = ("no", "one", "two", "three", "four", "five")[n]
            assert f" {number} " in r["chosen"] and f" {number} " not in r["rejected"]
        if r["question_type"] == "colour":
            assert any(o["colour"] in r["chosen"] and o["shape"] in r["chosen"] for o in r["objects"])
    assert load_records(sample_dir / "data.json").num_read == 30


def test_make_sample_is_reproducible(tmp_path):
    assert main(["make-sample", str(tmp_path / "a"), "--n", "5", "--seed", "9"]) == 0
    assert main(["make-sample", str(tmp_path / "b"), "--n", "5", "--seed", "9"]) == 0
    assert main(["make-sample", str(tmp_path / "c"), "--n", "5", "--seed", "10"]) == 0
    a, b, c = ((tmp_path / d / "data.json").read_text() for d in "abc")
    assert a == b and a != c
    assert (tmp_path / "a/images/00003.png").read_bytes() == (tmp_path / "b/images/00003.png").read_bytes()


def test_make_sample_writes_a_held_out_set_that_leaves_the_training_set_as_it_was(tmp_path, capsys):
    assert main(["make-sample", str(tmp_path / "with"), "--n", "6", "--eval", "4", "--seed", "9"]) == 0
    assert "4 held-out records" in capsys.readouterr().out
    assert main(["make-sample", str(tmp_path / "without"), "--n", "6", "--eval", "0", "--seed", "9"]) == 0
    assert not (tmp_path / "without" / "eval.json").exists()
    train_rows = json.loads((tmp_path / "with" / "data.json").read_text())
    assert train_rows == json.loads((tmp_path / "without" / "data.json").read_text())
    eval_rows = json.loads((tmp_path / "with" / "eval.json").read_text())
    assert len(eval_rows) == 4
    assert not {r["id"] for r in eval_rows} & {r["id"] for r in train_rows}
    assert not {r["image"] for r in eval_rows} & {r["image"] for r in train_rows}
    assert all((tmp_path / "with" / r["image"]).is_file() for r in eval_rows)
    assert load_records(tmp_path / "with" / "eval.json").num_read == 4


def test_make_sample_scenes_writes_the_main_jobs_scene_set(tmp_path, capsys, monkeypatch):
    from mdpo.data import sample, scenes

    real = sample.make_scene_sample
    monkeypatch.setattr(sample, "make_scene_sample", lambda out, seed: real(out, seed=seed, n_sft=6, n_pairs=4, n_eval=8))
    assert main(["make-sample", str(tmp_path / "a"), "--n", "3", "--eval", "0", "--seed", "2", "--scenes"]) == 0
    assert "co-occurrence scenes" in capsys.readouterr().out
    folder = tmp_path / "a" / "scenes"
    sft, pairs, held = (json.loads((folder / f"{n}.json").read_text()) for n in ("sft", "pairs", "eval"))
    assert len(sft) == 6 and len(pairs) == 4 and len(held) == 8
    assert sorted(r["kind"] for r in held) == ["balanced"] * 4 + ["cue_only"] * 2 + ["partner_only"] * 2
    for r in sft + pairs + held:  # exact object lists; chosen faithful, rejected names one absent object
        assert set(r["objects"]) <= set(scenes.CATEGORIES) and r["chosen"] == scenes.describe(r["objects"])
        assert len(scenes.label_answer(r["rejected"], r["objects"])["hallucinated"]) == 1
        assert Image.open(folder / r["image"]).size == (56, 56)
    assert load_records(folder / "pairs.json").num_read == 4
    assert (folder / "model" / "config.json").is_file()
    assert (tmp_path / "a" / "data.json").is_file()  # the classic sample is still written
    real(tmp_path / "b", seed=2, n_sft=6, n_pairs=4, n_eval=8)
    assert (tmp_path / "b" / "scenes" / "eval.json").read_text() == (folder / "eval.json").read_text()
    with pytest.raises(ValueError, match="positive"):
        real(tmp_path / "c", n_sft=0)


def test_check_passes_on_good_data(sample_dir, capsys):
    assert main(["check", str(sample_dir / "data.json")]) == 0
    out = capsys.readouterr().out
    assert "records: 30 read, 30 valid, 0 bad" in out and "shapes: plain 30" in out
    assert "bad records" not in out and "chosen" in out


def test_check_with_a_processor_prints_token_statistics(sample_dir, tmp_path, capsys):
    from mdpo.tiny_processors import build_tiny_processor

    build_tiny_processor("llava", save_dir=tmp_path / "proc")
    assert main(["check", str(sample_dir / "data.json"), "--processor", str(tmp_path / "proc"), "--max-length", "256"]) == 0
    out = capsys.readouterr().out
    assert "tokens (LlavaProcessor, family llava, max_length 256" in out
    line = next(l for l in out.splitlines() if l.strip().startswith("image+special"))
    assert line.split()[2] == "17"  # 16 image tokens + BOS in every prompt
    # A max length too small for any record: every record is bad, exit 1.
    assert main(["check", str(sample_dir / "data.json"), "--processor", "tiny:llava", "--max-length", "20"]) == 1
    out = capsys.readouterr().out
    assert "30 read, 0 valid, 30 bad" in out and "too long for max_length=20" in out


def test_check_lists_bad_records_and_exits_1(sample_dir, tmp_path, capsys):
    rows = json.loads((sample_dir / "data.json").read_text())[:4]
    for r in rows:
        r["image"] = str(sample_dir / r["image"])
    rows[1]["image"] = "nowhere.png"
    rows[3]["rejected"] = ""
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "records: 4 read, 2 valid, 2 bad" in out
    assert f"record 1 (id '{rows[1]['id']}'): image file not found" in out
    assert f"record 3 (id '{rows[3]['id']}'): empty 'rejected'" in out


def test_check_of_a_missing_file_exits_2(tmp_path, capsys):
    assert main(["check", str(tmp_path / "none.json")]) == 2
    assert "dataset file not found" in capsys.readouterr().err


@pytest.mark.parametrize("strategy", ["crop", "random_image", "moco_v2"])
def test_preview_writes_a_png(sample_dir, tmp_path, strategy, capsys):
    out = tmp_path / f"{strategy}.png"
    assert main(["preview", str(sample_dir / "data.json"), "--out", str(out), "-n", "3", "--strategy", strategy]) == 0
    image = Image.open(out)
    assert image.width > 400 and image.height > 3 * 160
    assert f"wrote {out} (3 records, strategy {strategy})" in capsys.readouterr().out


def test_console_entry_point_exit_codes(sample_dir, tmp_path):
    """The module runs as a program and its exit status is main()'s return value."""
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    good = subprocess.run([sys.executable, "-m", "mdpo.data.cli", "check", str(sample_dir / "data.json")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert good.returncode == 0, good.stderr[-2000:]
    usage = subprocess.run([sys.executable, "-m", "mdpo.data.cli", "preview", str(sample_dir / "data.json")],
                           capture_output=True, text=True, env=env, timeout=120)
    assert usage.returncode == 2 and "--out" in usage.stderr
