"""Validation once per dataset version (issue 18): the second start reuses what the first found, a change
of the data, of an image file or of the processor settings validates again, `mdpo-data check` fills the
cache training reuses, the bad-record report is the same either way, and data changed between a run and
its resume is refused in one line. An embedded image edited in a datasets folder makes the reference stale."""
import json
import shutil

import pytest
from PIL import Image, ImageOps

from mdpo.config import load_config
from mdpo.data import BadRecordError, PreferenceCollator, load_records
from mdpo.data.cli import main as data_main
from mdpo.reference_cache import StaleCacheError
from mdpo.tiny_processors import build_tiny_processor
from mdpo.train import train
from tiny_runs import sample_records, tiny_run_overrides


@pytest.fixture
def sample(tmp_path_factory):
    return sample_records(tmp_path_factory, n=8, seed=7)


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor("llava")


@pytest.fixture
def measured(monkeypatch):
    """Records measured through the processor (the costly part of validation), by sample id."""
    calls = []
    original = PreferenceCollator.measure
    monkeypatch.setattr(PreferenceCollator, "measure", lambda self, record: calls.append(record.sample_id) or original(self, record))
    return calls


def _load(path, processor, lines, **kwargs):
    return load_records(path, processor=processor, max_length=kwargs.pop("max_length", 256), log=lines.append, **kwargs)


def test_the_second_start_reuses_the_validation(sample, processor, measured):
    lines = []
    first = _load(sample, processor, lines)
    assert len(measured) == 8 and "8 records validated in" in lines[-1] and "kept in" in lines[-1]
    measured.clear()
    again = _load(sample, processor, lines)
    assert measured == [] and f"data: {sample}: validation reused (8 records, 8 kept, 0 skipped;" in lines[-1]
    assert list(again.records.sample_ids) == list(first.records.sample_ids)
    assert [again.records[k] for k in range(8)] == [first.records[k] for k in range(8)]
    for name in ("prompt", "protected", "chosen", "rejected"):
        assert again.lengths[name].tolist() == first.lengths[name].tolist()


def test_a_change_of_the_data_an_image_or_the_processor_validates_again(sample, processor, measured):
    lines = []
    _load(sample, processor, lines)
    measured.clear()
    _load(sample, processor, lines, max_length=300)  # another data.max_length: another key
    assert len(measured) == 8 and "validated in" in lines[-1]
    other = build_tiny_processor("llava")
    other.chat_template = other.chat_template + "{# edited #}"
    measured.clear()
    _load(sample, other, lines)  # another chat template
    assert len(measured) == 8
    measured.clear()
    _load(sample, processor, lines, collator_options={"system_prompt": "Be brief."})  # a row setting
    assert len(measured) == 8
    rows = json.loads(sample.read_text())
    sample.write_text(json.dumps(rows[:7]))  # the data: one record fewer
    measured.clear()
    assert len(_load(sample, processor, lines).records) == 7 and len(measured) == 7
    image = sample.parent / rows[0]["image"]
    ImageOps.flip(Image.open(image).convert("RGB")).save(image)  # an image re-saved in place, same path
    measured.clear()
    _load(sample, processor, lines)
    assert len(measured) == 7 and "image files changed since it was validated" in lines[-2]


def test_the_bad_record_report_is_the_same_from_the_cache(sample, processor):
    rows = json.loads(sample.read_text())
    rows[2]["chosen"] = ""  # a bad field
    rows[5] = dict(rows[1])  # a repeated id
    rows[6]["chosen"] = "word " * 400  # does not fit in 256 tokens
    sample.write_text(json.dumps(rows))
    for _ in range(2):  # validated, then from the cache
        result = _load(sample, processor, [], on_bad_record="skip")
        assert [(s.index, s.sample_id) for s in result.skipped] == [(2, rows[2]["id"]), (5, rows[1]["id"]), (6, rows[6]["id"])]
        reasons = [s.reason for s in result.skipped]
        assert reasons[0] == "empty 'chosen'" and reasons[1] == "duplicate id (first used by record 1)"
        assert reasons[2].startswith("too long for max_length=256")
        assert [r.index for r in result.records] == [0, 1, 3, 4, 7]
        with pytest.raises(BadRecordError, match=r"bad record 2 \(id '.*'\) in .*data.json: empty 'chosen'"):
            _load(sample, processor, [])


def test_validation_in_worker_processes_finds_the_same(sample, processor):
    """data.num_workers forked workers share the validation (every 3rd record of the file each): the same
    kept records, reasons, lengths and ids as one process."""
    rows = json.loads(sample.read_text())
    rows[4]["chosen"] = ""
    rows[6] = dict(rows[0])
    sample.write_text(json.dumps(rows))
    one = _load(sample, processor, [], on_bad_record="skip", cache_dir="off")
    lines = []
    three = _load(sample, processor, lines, on_bad_record="skip", cache_dir="off", workers=3)
    assert "over 1 process(es) × 3 workers" in lines[-1]
    assert three.skipped == one.skipped and [s.index for s in one.skipped] == [4, 6]
    assert list(three.records.sample_ids) == list(one.records.sample_ids)
    assert [r.index for r in three.records] == [r.index for r in one.records]
    for name in ("prompt", "protected", "chosen", "rejected"):
        assert three.lengths[name].tolist() == one.lengths[name].tolist()


def test_mdpo_data_check_fills_the_cache_that_training_reuses(sample, tmp_path, capsys):
    assert data_main(["check", str(sample), "--processor", "tiny:llava", "--max-length", "256"]) == 0
    out = capsys.readouterr().out
    assert f"data: {sample}: 8 records validated in" in out and "records: 8 read, 8 valid, 0 bad" in out
    assert "tokens (LlavaProcessor, family llava, max_length 256" in out
    assert data_main(["check", str(sample), "--processor", "tiny:llava", "--max-length", "256"]) == 0
    assert "validation reused" in capsys.readouterr().out
    train(load_config(None, tiny_run_overrides(sample, tmp_path / "run", "max_steps=1", "epochs=1", "effective_batch_size=4")))
    assert f"data: {sample}: validation reused (8 records, 8 kept, 0 skipped;" in capsys.readouterr().out


def test_a_resume_on_changed_data_is_refused_in_one_line(sample, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = tiny_run_overrides(sample, out, "epochs=1", "effective_batch_size=2", "max_steps=2", "save_every=1",
                                   "reference.mode=live")
    train(load_config(None, overrides))
    rows = json.loads(sample.read_text())
    rows[3]["chosen"] = "Something else entirely."
    sample.write_text(json.dumps(rows))
    with pytest.raises(Exception, match=r"resume_from=.*step-000002: the training data changed since this checkpoint was "
                                        r"written \(data.sha256 '\w+' then, '\w+' now\); resume with the data it trained on"):
        train(load_config(None, [*overrides, "resume_from=latest", "max_steps=3"]))


datasets = pytest.importorskip("datasets")


def test_an_edited_embedded_image_in_a_datasets_folder_makes_the_reference_stale(tmp_path, capsys):
    messages = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
    rows = [{"images": [Image.new("RGB", (64, 48), (40 * i, 200 - 40 * i, 90))],
             "prompt": [{"role": "user", "content": f"What colour? ({i})"}],
             "chosen": [{"role": "assistant", "content": "It is red."}], "rejected": [{"role": "assistant", "content": "Green."}]}
            for i in range(4)]
    for row in rows:
        row["images"][0].paste((255, 255, 255), (4, 4, 20, 40))  # an image whose mirror differs
    table = datasets.Dataset.from_list(rows, features=datasets.Features(
        {"images": datasets.List(datasets.Image()), "prompt": messages, "chosen": messages, "rejected": messages}))
    folder = tmp_path / "prefs"
    table.save_to_disk(str(folder))
    overrides = tiny_run_overrides(folder, tmp_path / "run", "max_steps=1", "epochs=1", "effective_batch_size=4")
    train(load_config(None, overrides))
    cache = tmp_path / "run" / "reference_logps.pt"
    capsys.readouterr()

    def flip_first(row, i):  # the first row's image mirrored, everything else as it was
        return {"images": [ImageOps.mirror(row["images"][0]) if i == 0 else row["images"][0]]}

    table.map(flip_first, with_indices=True).save_to_disk(str(tmp_path / "edited"))
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "edited", folder)
    again = [*overrides, f"output_dir={tmp_path / 'again'}", f"reference.cache_path={cache}"]
    with pytest.raises(StaleCacheError, match=r"data\.sha256: cache has '\w+', this run has '\w+'"):
        train(load_config(None, again))
    assert "records validated in" in capsys.readouterr().out  # not the old validation either
    train(load_config(None, [*overrides, "overwrite_output_dir=true"]))
    out = capsys.readouterr().out
    assert "recomputing it in place" in out and "reusing" not in out
