"""Reading preference records: the three shapes, ids, bad records and the skip accounting."""
import json

import pytest
from PIL import Image

from mdpo.data import BadRecordError, load_image, load_records
from mdpo.data.records import content_id


@pytest.fixture
def image_dir(tmp_path):
    Image.new("RGB", (32, 24), (200, 10, 10)).save(tmp_path / "red.png")
    Image.new("RGBA", (16, 16), (0, 0, 255, 0)).save(tmp_path / "clear.png")  # fully transparent blue
    Image.new("L", (16, 16), 77).save(tmp_path / "grey.png")
    Image.new("P", (16, 16), 3).save(tmp_path / "palette.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return tmp_path


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


PAPER = {"img_path": "red.png", "prompt": "USER: <image>\nWhat colour? ASSISTANT:", "chosen": "Red.", "rejected": "Blue."}
PLAIN = {"id": "p1", "image": "red.png", "question": "What colour?", "chosen": "Red.", "rejected": "Blue.",
         "objects": [{"shape": "square", "colour": "red"}]}
TRL = {
    "images": ["red.png"],
    "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
    "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
    "rejected": [{"role": "assistant", "content": "Blue."}],
}


def test_three_shapes_from_a_json_list(image_dir):
    result = load_records(write_json(image_dir / "d.json", [PAPER, PLAIN, TRL]))
    paper, plain, trl = result.records
    assert [r.shape for r in result.records] == ["paper", "plain", "trl"]
    assert [r.index for r in result.records] == [0, 1, 2] and result.skipped == [] and result.num_read == 3
    for r in result.records:  # image paths are relative to the dataset's folder by default
        assert r.image_path == str(image_dir / "red.png")
        assert (r.chosen, r.rejected) == ("Red.", "Blue.")
    assert paper.prompt == PAPER["prompt"] and paper.question is None
    assert paper.display_question == "What colour?"  # the question recovered from the LLaVA template
    assert plain.question == "What colour?" and plain.prompt is None
    assert plain.meta == {"objects": [{"shape": "square", "colour": "red"}]}  # extra keys are kept
    assert trl.prompt == TRL["prompt"] and trl.question == "What colour?"


def test_jsonl_and_image_root(image_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    path = write_jsonl(other / "d.jsonl", [PLAIN, "", {**PAPER, "id": 7}])
    result = load_records(path, image_root=image_dir)
    assert [r.sample_id for r in result.records] == ["p1", "7"]  # the blank line is not a record
    assert [r.index for r in result.records] == [0, 1]
    assert result.records[1].image_path == str(image_dir / "red.png")


def test_ids_are_the_id_field_else_a_stable_content_hash(image_dir):
    result = load_records(write_json(image_dir / "d.json", [PAPER, {**PAPER, "chosen": "Crimson."}]))
    a, b = result.records
    assert a.sample_id == content_id(PAPER) and len(a.sample_id) == 16
    assert a.sample_id != b.sample_id
    again = load_records(write_json(image_dir / "e.json", [dict(reversed(list(PAPER.items())))]))
    assert again.records[0].sample_id == a.sample_id  # key order does not matter


BAD_CASES = [
    ({**PLAIN, "image": "missing.png"}, "image file not found: .*missing.png"),
    ({**PLAIN, "image": "broken.png"}, "image file unreadable: .*broken.png"),
    ({k: v for k, v in PLAIN.items() if k != "image"}, r"missing image \('img_path', 'image' or 'images'\)"),
    ({**PLAIN, "chosen": "  "}, "empty 'chosen'"),
    ({k: v for k, v in PLAIN.items() if k != "rejected"}, "missing 'rejected'"),
    ({**PAPER, "rejected": ""}, "empty 'rejected'"),
    ({**TRL, "chosen": [{"role": "assistant", "content": []}]}, "empty 'chosen'"),
    ({**PAPER, "prompt": "USER: What colour? ASSISTANT:"}, "prompt has 0 image placeholders '<image>'"),
    ({**TRL, "prompt": [{"role": "user", "content": [{"type": "text", "text": "What colour?"}]}]},
     "prompt messages hold 0 image placeholders"),  # typed items without an image item: not TRL's string form
    ({**TRL, "images": ["red.png", "grey.png"]}, "'images' holds 2 images; one image per record is supported"),
    ({"image": "red.png", "chosen": "a", "rejected": "b"}, "unrecognised record shape"),
    (["not", "an", "object"], "not a JSON object but list"),
]


@pytest.mark.parametrize("bad, reason", BAD_CASES, ids=[r.split(" ")[0] + str(i) for i, (_, r) in enumerate(BAD_CASES)])
def test_each_bad_record_is_named_with_its_reason(image_dir, bad, reason):
    path = write_json(image_dir / "d.json", [PLAIN | {"id": "good"}, bad])
    with pytest.raises(BadRecordError, match=r"bad record 1 \(id .*\) in .*d.json: " + reason) as info:
        load_records(path)
    assert info.value.index == 1 and isinstance(info.value, ValueError)
    expected_id = bad.get("id") if isinstance(bad, dict) else None
    assert info.value.sample_id == (expected_id if expected_id is not None else (content_id(bad) if isinstance(bad, dict) else None))


def test_duplicate_ids_and_invalid_jsonl_lines(image_dir):
    path = write_jsonl(image_dir / "d.jsonl", [PLAIN, "{not json", PLAIN])
    with pytest.raises(BadRecordError, match=r"bad record 1 \(id None\).*line 2 is not valid JSON"):
        load_records(path)
    result = load_records(path, on_bad_record="skip")
    assert [r.sample_id for r in result.records] == ["p1"]
    assert [(s.index, s.sample_id) for s in result.skipped] == [(1, None), (2, "p1")]
    assert result.skipped[1].reason == "duplicate id (first used by record 0)"


def test_skip_counts_and_lists_every_bad_record(image_dir):
    records = [PLAIN, {**PLAIN, "id": "x", "image": "missing.png"}, {**PAPER, "id": "y"},
               {**PLAIN, "id": "z", "chosen": ""}, {**TRL, "id": "w"}]
    result = load_records(write_json(image_dir / "d.json", records), on_bad_record="skip")
    assert [r.sample_id for r in result.records] == ["p1", "y", "w"]
    assert [(i, sid) for i, sid, _ in result.skipped] == [(1, "x"), (3, "z")]  # plain tuples unpack
    assert result.num_read == 5 and len(result.records) + len(result.skipped) == result.num_read
    summary = result.summary()
    assert "5 records read, 3 kept, 2 skipped" in summary
    assert "skipped record 1 (id 'x'): image file not found" in summary
    assert "skipped record 3 (id 'z'): empty 'chosen'" in summary


def test_bad_arguments_are_named(image_dir):
    path = write_json(image_dir / "d.json", [PLAIN])
    (image_dir / "one.json").write_text(json.dumps(PLAIN, indent=2))
    with pytest.raises(ValueError, match="holds one JSON object; expected a JSON list of records or JSONL"):
        load_records(image_dir / "one.json")
    with pytest.raises(ValueError, match="on_bad_record='drop'"):
        load_records(path, on_bad_record="drop")
    with pytest.raises(FileNotFoundError, match="dataset file not found: .*nope.json"):
        load_records(image_dir / "nope.json")


@pytest.mark.parametrize("name, pixel", [("clear.png", (255, 255, 255)), ("grey.png", (77, 77, 77)), ("red.png", (200, 10, 10))])
def test_images_in_other_modes_become_rgb(image_dir, name, pixel):
    record = load_records(write_json(image_dir / "d.json", [{**PLAIN, "image": name}])).records[0]
    image = load_image(record)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == pixel  # transparent → white background


def test_palette_image_is_converted(image_dir):
    record = load_records(write_json(image_dir / "d.json", [{**PLAIN, "image": "palette.png"}])).records[0]
    assert load_image(record).mode == "RGB"
