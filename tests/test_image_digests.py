"""Image files in the run fingerprint (issue 18): a record's image re-saved in place (same path, same
JSON) makes the cached reference stale, and each file is read once, then remembered by size and mtime."""
import os

import pytest
from PIL import Image, ImageOps

import mdpo.data.digests as digests
from mdpo.config import load_config
from mdpo.data.digests import image_files_digest
from mdpo.reference_cache import StaleCacheError
from mdpo.train import train
from tiny_runs import sample_records, tiny_run_overrides


@pytest.fixture
def sample(tmp_path_factory):
    return sample_records(tmp_path_factory, n=8, seed=5)


def _flip_in_place(path):
    """Re-save an image flipped: same path, same size on disk is not required, the JSON is untouched."""
    image = Image.open(path)
    image.load()
    ImageOps.mirror(image).save(path)


def _reading(monkeypatch):
    read = []
    original = digests.file_sha256
    monkeypatch.setattr(digests, "file_sha256", lambda path: read.append(str(path)) or original(path))
    return read


def test_each_image_is_read_once_then_remembered_by_size_and_mtime(tmp_path, monkeypatch):
    files = []
    for i, colour in enumerate(((200, 0, 0), (0, 200, 0), (0, 0, 200))):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    read = _reading(monkeypatch)
    first = image_files_digest(files + files[:1])  # a file named twice counts once
    assert first.n_files == 3 and sorted(read) == sorted(files)
    read.clear()
    assert image_files_digest(list(reversed(files))).value == first.value and read == []  # stat only
    os.utime(files[1], ns=(1, 1))  # touched, same bytes: read again, same digest
    again = image_files_digest(files)
    assert read == [files[1]] and again.value == first.value and again.changed == []
    Image.new("RGB", (16, 16), (0, 0, 201)).save(files[2])  # other bytes
    changed = image_files_digest(files)
    assert changed.value != first.value and changed.changed == [files[2]]
    # the order of the sorted paths carries which bytes belong to which file: a swap changes the digest
    a, b = (tmp_path / "0.png").read_bytes(), (tmp_path / "1.png").read_bytes()
    (tmp_path / "0.png").write_bytes(b)
    (tmp_path / "1.png").write_bytes(a)
    assert image_files_digest(files).value not in (first.value, changed.value)


def test_without_a_cache_folder_digests_are_computed_every_time(tmp_path, monkeypatch):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    monkeypatch.setenv("MDPO_DATA_CACHE", "off")
    read = _reading(monkeypatch)
    assert image_files_digest([str(tmp_path / "a.png")]).value == image_files_digest([str(tmp_path / "a.png")]).value
    assert len(read) == 2 and image_files_digest([]) is None


def test_a_changed_image_file_makes_the_cached_reference_stale(sample, tmp_path, capsys):
    """Same path, same JSON, other pixels: the cache is refused (a new run reading it) or recomputed
    (overwrite_output_dir), never reused; before the change it is reused."""
    first = tmp_path / "run"
    overrides = tiny_run_overrides(sample, first, "max_steps=1", "epochs=1", "effective_batch_size=4")
    train(load_config(None, overrides))
    cache = first / "reference_logps.pt"
    assert cache.is_file()
    capsys.readouterr()

    def again(name, *extra):
        return load_config(None, [*overrides, f"output_dir={tmp_path / name}", f"reference.cache_path={cache}", *extra])

    train(again("same"))
    assert f"reference log-probs: reusing {cache}" in capsys.readouterr().out
    image = sample.parent / "images" / sorted(os.listdir(sample.parent / "images"))[0]
    before = sample.read_bytes()
    _flip_in_place(image)
    assert sample.read_bytes() == before
    with pytest.raises(StaleCacheError, match=r"data\.images: cache has '8 files, sha256 \w+', this run has") as refused:
        train(again("flipped"))
    assert "data.sha256" not in str(refused.value)
    out = capsys.readouterr().out
    assert f"data: {sample}: image files changed since it was validated ({image}); validating it again" in out
    train(load_config(None, [*overrides, "overwrite_output_dir=true"]))
    out = capsys.readouterr().out
    assert "data.images: cache has" in out and "recomputing it in place" in out and "reusing" not in out
