"""TRL-format records as TRL's own docs and `datasets` tables write them (issue 11, item 9): message
contents as plain strings, images embedded as bytes or PIL images, a `save_to_disk` folder or a
parquet file as the dataset, and stable content-hash ids for such records."""
import json

import pytest
import torch
from PIL import Image

from mdpo.data import BadRecordError, PreferenceCollator, load_image, load_records
from mdpo.data.records import content_id, parse_record
from mdpo.tiny_processors import build_tiny_processor

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for name, colour in (("red.png", (220, 20, 20)), ("blue.png", (20, 20, 220))):
        image = Image.new("RGB", (64, 48), colour)
        image.paste((255, 255, 255), (8, 8, 24, 24))
        image.save(root / name)
    return root


@pytest.fixture(scope="module")
def processors():
    return {family: build_tiny_processor(family) for family in ("llava", "qwen2-vl")}


def string_record(image, question="What colour is the square?", system=None):
    """TRL's collator-docstring form: every content a plain string; TRL inserts the image itself."""
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return {"images": [image], "prompt": prompt, "chosen": [{"role": "assistant", "content": "It is red."}],
            "rejected": [{"role": "assistant", "content": "It is green."}]}


def typed_record(image, question="What colour is the square?", system=None):
    prompt = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []) + [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return {"images": [image], "prompt": prompt, "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "It is red."}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "It is green."}]}]}


def png_bytes(path):
    return path.read_bytes()


# ------------------------------------------------------------------------------ string contents
@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_string_contents_give_the_rows_of_the_typed_form(family, system, image_dir, processors, tmp_path):
    """The image goes first in the first user message, as TRL's prepare_multimodal_messages puts it."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps([string_record("red.png", system=system), typed_record("red.png", system=system)]))
    strings, typed = load_records(path, image_root=image_dir).records
    assert strings.prompt == typed.prompt  # normalised to typed items
    assert strings.question == typed.question == "What colour is the square?"
    collator = PreferenceCollator(processors[family], objective="dpo", max_length=256)  # no crop: ids differ
    text = collator.prompt_text(strings)
    assert "What colour is the square?" in text  # llava-hf's template renders string contents as nothing
    if system:
        assert "Answer briefly." in text
    a, b = collator([strings]), collator([typed])
    for key in ("input_ids", "labels", "pixel_values"):
        assert torch.equal(a[key], b[key]), key


def test_the_image_goes_into_the_first_user_message(image_dir, tmp_path):
    raw = string_record("red.png", system="Be brief.")
    raw["prompt"] += [{"role": "assistant", "content": "A square."}, {"role": "user", "content": "Which colour?"}]
    record = parse_record(raw, 0, image_dir)
    assert record.prompt[0]["content"] == [{"type": "text", "text": "Be brief."}]
    assert record.prompt[1]["content"] == [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]
    assert record.prompt[3]["content"] == [{"type": "text", "text": "Which colour?"}]


# ------------------------------------------------------------------------------ embedded images
def test_embedded_bytes_and_pil_images(image_dir, processors):
    on_disk = parse_record(typed_record("red.png"), 0, image_dir)
    as_bytes = parse_record(typed_record({"bytes": png_bytes(image_dir / "red.png"), "path": None}), 1, image_dir)
    pil = Image.open(image_dir / "red.png")
    pil.load()
    as_pil = parse_record(typed_record(pil), 2, image_dir)
    for record in (as_bytes, as_pil):
        assert record.image_bytes is not None and record.image_path.startswith("<embedded:")
        assert list(load_image(record).getdata()) == list(load_image(on_disk).getdata())
    collator = PreferenceCollator(processors["qwen2-vl"], objective="dpo", max_length=256)  # no crop: ids differ
    want = collator([on_disk])
    for record in (as_bytes, as_pil):
        got = collator([record])
        assert torch.equal(got["pixel_values"], want["pixel_values"]) and torch.equal(got["input_ids"], want["input_ids"])
    with pytest.raises(BadRecordError, match="embedded image unreadable"):
        parse_record(typed_record({"bytes": b"not an image", "path": None}), 3, image_dir)
    with pytest.raises(BadRecordError, match="embedded image bytes must be bytes"):
        parse_record(typed_record({"bytes": "iVBORw0KGgo=", "path": None}), 4, image_dir)


def test_content_ids_of_embedded_images_are_stable_and_include_the_pixels(image_dir):
    red, blue = png_bytes(image_dir / "red.png"), png_bytes(image_dir / "blue.png")
    a = content_id(typed_record({"bytes": red, "path": None}))
    assert a == content_id(typed_record({"bytes": bytes(red), "path": None})) and len(a) == 16
    assert a != content_id(typed_record({"bytes": blue, "path": None}))  # the only difference is the image
    pil_a, pil_b = Image.open(image_dir / "red.png"), Image.open(image_dir / "red.png")  # two objects, same pixels
    pil_a.load(), pil_b.load()
    assert content_id(typed_record(pil_a)) == content_id(typed_record(pil_b))
    assert content_id(typed_record(pil_a)) != content_id(typed_record(Image.open(image_dir / "blue.png")))


# ------------------------------------------------------------------------------ datasets folder and parquet
MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})


@pytest.fixture(scope="module")
def table(image_dir):
    """A TRL-style preference table with an Image-list column and string contents, as `datasets` users build it."""
    # Images without a file name (convert() makes new ones): `datasets` embeds their bytes.
    rows = [string_record(Image.open(image_dir / name).convert("RGB"), question)
            for name, question in (("red.png", "What colour?"), ("blue.png", "Which colour?"))]
    features = datasets.Features({"images": datasets.List(datasets.Image()), "prompt": MESSAGES, "chosen": MESSAGES,
                                  "rejected": MESSAGES})
    return datasets.Dataset.from_list(rows, features=features)


def test_a_save_to_disk_folder_and_a_parquet_file(table, tmp_path, image_dir, processors):
    folder = tmp_path / "prefs"
    table.save_to_disk(str(folder))
    parquet = tmp_path / "prefs.parquet"
    table.to_parquet(str(parquet))
    from_folder = load_records(folder)
    from_parquet = load_records(parquet)
    assert from_folder.num_read == from_parquet.num_read == 2 and not from_folder.skipped
    ids = [r.sample_id for r in from_folder.records]
    assert ids == [r.sample_id for r in from_parquet.records] == [r.sample_id for r in load_records(folder).records]
    assert len(set(ids)) == 2
    for record, name in zip(from_folder.records, ("red.png", "blue.png")):
        assert record.shape == "trl" and record.image_bytes is not None
        assert list(load_image(record).getdata()) == list(Image.open(image_dir / name).convert("RGB").getdata())
        assert record.prompt[0]["content"][0] == {"type": "image"}
    batch = PreferenceCollator(processors["llava"], objective="mdpo", max_length=256)(from_parquet.records)
    assert batch["input_ids"].shape[0] == 6 and batch["sample_ids"] == ids
    dataset_dict = tmp_path / "dict"
    datasets.DatasetDict({"train": table}).save_to_disk(str(dataset_dict))
    assert [r.sample_id for r in load_records(dataset_dict).records] == ids


def test_a_folder_that_is_not_a_dataset_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not one written by datasets' save_to_disk"):
        load_records(tmp_path / "empty")


def test_dataset_digest_of_a_file_and_a_folder(table, tmp_path):
    import hashlib

    from mdpo.data.records import dataset_digest

    one = tmp_path / "d.json"
    one.write_text("[]")
    assert dataset_digest(one) == hashlib.sha256(b"[]").hexdigest()
    folder = tmp_path / "prefs"
    table.save_to_disk(str(folder))
    before = dataset_digest(folder)
    assert before == dataset_digest(folder)
    table.select([0]).save_to_disk(str(tmp_path / "one_row"))
    assert dataset_digest(tmp_path / "one_row") != before


def test_random_image_refuses_embedded_images_by_name(image_dir, processors):
    from mdpo.config import ConfigError
    from mdpo.data import CorruptionConfig

    records = [parse_record(typed_record({"bytes": png_bytes(image_dir / n), "path": None}), i, image_dir)
               for i, n in enumerate(("red.png", "blue.png"))]
    with pytest.raises(ConfigError, match="random_image .* 2 record\\(s\\) hold embedded images"):
        PreferenceCollator(processors["llava"], corruption=CorruptionConfig(strategy="random_image"), image_pool=records)


def test_mdpo_train_on_a_save_to_disk_folder_with_the_cached_reference(table, tmp_path):
    """The default reference.mode (cached) fingerprints the dataset: a folder is digested whole (it was
    opened as one file before, IsADirectoryError), and editing a row makes the cache stale."""
    from mdpo.config import load_config
    from mdpo.reference_cache import StaleCacheError
    from mdpo.train import train

    rows = datasets.concatenate_datasets([table] * 4).map(  # 8 distinct pairs (ids are content hashes)
        lambda row, i: {"prompt": [{"role": "user", "content": f"{row['prompt'][0]['content']} ({i})"}]}, with_indices=True)
    folder = tmp_path / "prefs"
    rows.save_to_disk(str(folder))
    overrides = [f"data.path={folder}", f"output_dir={tmp_path / 'run'}", "model.preset=tiny-llava", "max_steps=1",
                 "epochs=1", "micro_batch_size=2", "effective_batch_size=4", "data.max_length=256", "plots=false",
                 "report_to=none", "progress_bar=false", "data.corruption=crop"]
    summary = train(load_config(None, overrides))
    assert summary["steps"] == 1 and (tmp_path / "run" / "reference_logps.pt").is_file()
    edited = rows.map(lambda row, i: {"chosen": [{"role": "assistant", "content": "It is blue."}]} if i == 0 else {},
                      with_indices=True)
    edited.save_to_disk(str(tmp_path / "edited"))
    import shutil

    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "edited", folder)
    again = [*overrides, f"output_dir={tmp_path / 'again'}", f"reference.cache_path={tmp_path / 'run' / 'reference_logps.pt'}"]
    with pytest.raises(StaleCacheError, match="data.sha256"):  # a new run reading the first run's cache
        train(load_config(None, again))
