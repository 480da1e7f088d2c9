"""Records read on demand (issue 18): `load_records` returns a RecordTable that holds an index (rows, byte
spans, ids), not the records; every record it reads, and every batch collated from it, is what the
eager reader gave (records parsed up front from `iter_raw_records` / `iter_table_records`), for every
record shape and every kind of dataset file."""
import io
import json

import pytest
import torch
from PIL import Image

from mdpo.data import CorruptionConfig, PreferenceCollator, load_records
from mdpo.data.records import content_id, iter_raw_records, iter_table_records, parse_record
from mdpo.data.table import RecordTable
from mdpo.tiny_processors import build_tiny_processor
from mdpo.train import collated_batches

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lazy-images")
    for i, colour in enumerate(((220, 20, 20), (20, 200, 20), (20, 20, 220), (200, 200, 20))):
        image = Image.new("RGB", (72 + 8 * i, 56), colour)
        image.paste((255, 255, 255), (8 + 4 * i, 8, 30, 30))
        image.save(root / f"{i}.png")
    Image.new("RGB", (64, 64), (90, 40, 160)).save(root / "3.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor("llava")


def _messages(text, typed):
    return [{"role": "assistant", "content": [{"type": "text", "text": text}] if typed else text}]


def json_records():
    """Every shape a JSON / JSONL file holds: paper (templated and bare), plain (with and without an id),
    TRL with typed contents, TRL with plain-string contents (with a system message), and a non-ASCII text."""
    return [
        {"img_path": "0.png", "prompt": "A chat. USER: <image>\nWhat colour is it? ASSISTANT:", "chosen": "Red.", "rejected": "Blue."},
        {"img_path": "1.png", "prompt": "<image>\nDescribe the square.", "chosen": "A white square.", "rejected": "A circle."},
        {"id": "plain-1", "image": "2.png", "question": "Which colour?", "chosen": "Blue.", "rejected": "Green.",
         "objects": [{"shape": "square"}]},
        {"image": "3.jpg", "question": "Crème brûlée — what colour? 色", "chosen": "Purple.", "rejected": "Orange."},
        {"images": ["3.png"], "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
         "chosen": _messages("Yellow.", True), "rejected": _messages("Grey.", True)},
        {"images": ["0.png"], "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Colour?"}],
         "chosen": _messages("Red.", False), "rejected": _messages("Black.", False)},
    ]


MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})


def table_rows(image_dir):
    """TRL rows with string contents and embedded images (datasets' Image column stores the bytes)."""
    rows = []
    for i in range(6):
        image = Image.open(image_dir / f"{i % 4}.png").convert("RGB")
        rows.append({"images": [image], "prompt": [{"role": "user", "content": f"What colour? ({i})"}],
                     "chosen": [{"role": "assistant", "content": "It is red."}],
                     "rejected": [{"role": "assistant", "content": f"It is green {i}."}]})
    features = datasets.Features({"images": datasets.List(datasets.Image()), "prompt": MESSAGES, "chosen": MESSAGES,
                                  "rejected": MESSAGES})
    return datasets.Dataset.from_list(rows, features=features)


@pytest.fixture(scope="module")
def sources(image_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lazy-sources")
    records = json_records()
    (out / "list.json").write_text(json.dumps(records, ensure_ascii=False, indent=1))
    (out / "lines.jsonl").write_text("\n\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    table = table_rows(image_dir)
    table.save_to_disk(str(out / "folder"))
    table.to_parquet(str(out / "rows.parquet"))
    # embedded bytes in a `plain` record of a table (an Image column, not TRL's list of images)
    plain = datasets.Dataset.from_list(
        [{"image": {"bytes": (image_dir / f"{i}.png").read_bytes(), "path": None}, "question": f"Colour {i}?",
          "chosen": "Red.", "rejected": "Blue."} for i in range(4)],
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                    "chosen": datasets.Value("string"), "rejected": datasets.Value("string")}))
    plain.save_to_disk(str(out / "plain-folder"))
    return out


SOURCES = ["list.json", "lines.jsonl", "folder", "rows.parquet", "plain-folder"]


def eager_records(path, image_root):
    """Today's eager reading: every record parsed up front, embedded images held as bytes."""
    rows = iter_table_records(path) if path.is_dir() or path.suffix == ".parquet" else iter_raw_records(path)
    return [parse_record(raw, i, image_root) for i, raw, _ in rows]


@pytest.mark.parametrize("name", SOURCES)
def test_a_lazy_table_reads_the_records_and_batches_the_eager_reader_gave(name, sources, image_dir, processor):
    path = sources / name
    root = image_dir if name.endswith(("json", "jsonl")) else None
    lazy = load_records(path, image_root=root, processor=processor, max_length=256).records
    eager = eager_records(path, root if root is not None else path)
    assert isinstance(lazy, RecordTable) and len(lazy) == len(eager) > 3
    assert list(lazy.sample_ids) == [r.sample_id for r in eager]  # ids without reading a record
    for k, record in enumerate(eager):
        assert lazy[k] == record  # every field, embedded image bytes included
    if name.endswith(("json", "jsonl")):  # ids: the `id` field, else the content hash they always were
        raws = [raw for _, raw, _ in iter_raw_records(path)]
        assert list(lazy.sample_ids) == [str(raw["id"]) if "id" in raw else content_id(raw) for raw in raws]
        assert {r.shape for r in eager} == {"paper", "plain", "trl"}
    collator = PreferenceCollator(processor, objective="mdpo", max_length=256, corruption=CorruptionConfig(seed=3))
    collator.set_epoch(1)
    for start in range(0, len(eager), 3):
        got, want = collator(lazy[start : start + 3]), collator(eager[start : start + 3])
        assert got["sample_ids"] == want["sample_ids"]
        assert set(got) == set(want)
        for key, value in want.items():
            if torch.is_tensor(value):
                assert torch.equal(got[key], value), key
    assert lazy[-1] == eager[-1] and lazy[1:3] == eager[1:3]
    with pytest.raises(IndexError):
        lazy[len(eager)]


def test_dataloader_workers_read_their_records_from_the_table(sources, processor):
    """data.num_workers > 0: the workers read the rows of their batches from the memory-mapped table."""
    path = sources / "folder"
    lazy = load_records(path, processor=processor, max_length=256).records
    eager = eager_records(path, path)
    collator = PreferenceCollator(processor, objective="mdpo", max_length=256)
    batches = [[0, 5], [3, 1], [2, 4]]
    workers = list(collated_batches(batches, lazy, collator, num_workers=2))
    here = list(collated_batches(batches, eager, collator, num_workers=0))
    for got, want in zip(workers, here):
        assert got["sample_ids"] == want["sample_ids"]
        for key in ("input_ids", "labels", "pixel_values"):
            assert torch.equal(got[key], want[key]), key


def test_the_table_holds_no_image_bytes(sources):
    """What a RecordTable keeps per record is an index; the table's images stay in its Arrow files."""
    lazy = load_records(sources / "folder").records
    held = lazy.index
    size = sum(getattr(held, name).nbytes for name in ("rows", "image_of", "lengths")) + held.ids.data.nbytes
    assert size < 50 * len(lazy)  # bytes per record, against an embedded PNG of about 300 bytes here and 100 KB in practice
    assert held.spans is None and len(held.image_files) == 0 and lazy.embedded_images()[0] == len(lazy)


def test_a_record_changed_under_the_run_is_named(sources, tmp_path, image_dir):
    path = tmp_path / "d.jsonl"
    records = json_records()
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    lazy = load_records(path, image_root=image_dir).records
    edited = dict(records[1], chosen="A black square.")  # no id: its content hash changes; same length in bytes
    text = "\n".join(json.dumps(r) for r in [records[0], edited, *records[2:]]) + "\n"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"record 1 changed after it was validated .* must not change under a run"):
        lazy[1]


def test_mdpo_data_preview_reads_only_the_records_it_shows(sources, tmp_path, monkeypatch):
    from mdpo.data.cli import main
    from mdpo.data.table import TableRecordReader

    read = []
    raw = TableRecordReader.raw
    monkeypatch.setattr(TableRecordReader, "raw", lambda self, row, span=None: read.append(row) or raw(self, row, span))
    assert main(["preview", str(sources / "folder"), "--out", str(tmp_path / "p.png"), "-n", "2"]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0 and sorted(read) == [0, 1]


def test_string_arrays_take_and_concat_strings_as_bytes():
    """`StringArray.take` copies bytes a block of strings at a time: across block edges, with repeats, empty
    and non-ASCII strings, it gives the strings a list would; `concat` joins arrays (emptying the list when
    it consumes it)."""
    from mdpo.data.table import StringArray

    strings = ["", "a", "Crème", "色彩", "", "longer string here", "z" * 40, "\udcff-escaped"]
    array = StringArray.from_strings(strings)
    positions = [7, 0, 3, 3, 5, 1, 4, 2, 6, 0]
    for block in (1, 3, 4, 1 << 16):
        taken = array.take(positions, block=block)
        assert list(taken) == [strings[i] for i in positions], block
        assert len(taken.data) == sum(len(strings[i].encode("utf-8", "surrogateescape")) for i in positions)
    assert list(array.take([])) == []
    chunks = [StringArray.from_strings(strings[:3]), StringArray.from_strings([]), array.take([6, 7]), StringArray.from_strings(strings[3:5])]
    assert list(StringArray.concat(list(chunks))) == strings[:3] + strings[6:8] + strings[3:5]
    assert list(StringArray.concat(chunks, consume=True)) == strings[:3] + strings[6:8] + strings[3:5] and chunks == []
    assert list(StringArray.concat([])) == []


def test_the_index_names_each_records_image_and_counts_distinct_images(sources, tmp_path, image_dir):
    """Image files are numbered into the sorted list of distinct files whatever order the records name them
    in; embedded images are counted once per distinct picture."""
    path = tmp_path / "order.jsonl"
    names = ["3.png", "0.png", "2.png", "0.png", "1.png", "3.jpg", "2.png"]
    path.write_text("".join(json.dumps({"image": name, "question": f"Colour {i}?", "chosen": "Red.", "rejected": "Blue."}) + "\n"
                            for i, name in enumerate(names)))
    lazy = load_records(path, image_root=image_dir).records
    eager = eager_records(path, image_dir)
    assert list(lazy.image_files) == sorted({str(image_dir / name) for name in names})
    assert lazy.image_entries() == [(r.sample_id, r.image_path) for r in eager]
    assert lazy.index.n_images == 5 and lazy.embedded_images() == (0, None)
    folder = load_records(sources / "folder").records  # 6 rows, pictures i % 4: 4 distinct embedded images
    assert folder.index.n_images == 4 and folder.embedded_images() == (6, folder.sample_ids[0])


def test_image_files_are_numbered_right_when_path_hashes_collide(tmp_path, image_dir, monkeypatch):
    """The merge groups image paths (and finds repeated ids) by hash, then checks the strings: with every
    hash equal, the index is still the one the strings give."""
    import mdpo.data.validation as validation

    path = tmp_path / "collide.jsonl"
    names = ["3.png", "0.png", "2.png", "0.png", "1.png"]
    path.write_text("".join(json.dumps({"image": name, "question": f"Colour {i}?", "chosen": "Red.", "rejected": "Blue."}) + "\n"
                            for i, name in enumerate(names)) + json.dumps({"image": "1.png", "question": "Colour 4?",
                                                                          "chosen": "Red.", "rejected": "Blue."}) + "\n")
    monkeypatch.setattr(validation, "hash", lambda value: 7, raising=False)
    result = load_records(path, image_root=image_dir, on_bad_record="skip", cache_dir="off")
    eager = eager_records(path, image_dir)[:5]  # the sixth repeats the fifth's content, so its id
    assert [s.index for s in result.skipped] == [5] and "duplicate id (first used by record 4)" in result.skipped[0].reason
    assert list(result.records.image_files) == sorted({str(image_dir / name) for name in names})
    assert result.records.image_entries() == [(r.sample_id, r.image_path) for r in eager]
