"""The on-disk reference log-prob cache: layout of lookups, fingerprints, stale caches."""
import pytest
import torch

from mdpo.reference_cache import ReferenceCache, StaleCacheError, canonical, weights_digest


def _cache(fp=None):
    fp = canonical(fp or {"data.sha256": "abc", "corruption": ["crop", [0.01, 0.2], 0, False]})
    return ReferenceCache(fp, ["a", "b", "c"], torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0]),
                          torch.tensor([[7.0, 8.0, 9.0], [10.0, 11.0, 12.0]]))


def test_lookup_follows_batch_layout():
    cache = _cache()
    torch.testing.assert_close(cache.lookup(["c", "a"], 0), torch.tensor([3.0, 1.0, 6.0, 4.0, 9.0, 7.0]))
    torch.testing.assert_close(cache.lookup(["b"], 1), torch.tensor([2.0, 5.0, 11.0]))
    with pytest.raises(StaleCacheError, match="corruption epoch"):
        cache.lookup(["a"], 2)
    with pytest.raises(StaleCacheError, match="no entry for sample id"):
        cache.lookup(["zzz"], 0)


def test_round_trip_and_stale_refusal(tmp_path):
    cache = _cache()
    path = tmp_path / "ref.pt"
    cache.save(path)
    again = ReferenceCache.load(path, cache.fingerprint)
    torch.testing.assert_close(again.corrupted, cache.corrupted)
    other = dict(cache.fingerprint, **{"data.sha256": "def"})
    with pytest.raises(StaleCacheError, match="data.sha256: cache has 'abc', this run has 'def'"):
        ReferenceCache.load(path, other)
    path.write_bytes(b"not a torch file")
    with pytest.raises(StaleCacheError, match="cannot be read"):
        ReferenceCache.load(path, cache.fingerprint)


def test_weights_digest_sees_a_changed_weight_but_not_lora():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    before = weights_digest(model)
    model.register_parameter("lora_A", torch.nn.Parameter(torch.ones(2)))
    assert weights_digest(model) == before
    with torch.no_grad():
        model[1].weight[0, 0] += 1e-3
    assert weights_digest(model) != before


def _part(ids, offset, fp=None, with_corrupted=True):
    n = len(ids)
    base = torch.arange(n, dtype=torch.float32) + offset
    return ReferenceCache(canonical(fp or {"data.sha256": "abc"}), list(ids), base, base + 100,
                          torch.stack([base + 200, base + 300]) if with_corrupted else None)


def test_merged_parts_look_up_like_the_parts():
    parts = [_part(["a", "c"], 0), _part(["b"], 10), _part([], 20)]  # a process may get no records
    merged = ReferenceCache.merge(parts)
    assert sorted(merged.sample_ids) == ["a", "b", "c"]
    for part in parts:
        for sid in part.sample_ids:
            for epoch in (0, 1):
                torch.testing.assert_close(merged.lookup([sid], epoch), part.lookup([sid], epoch))
    no_corrupted = ReferenceCache.merge([_part(["a"], 0, with_corrupted=False), _part(["b"], 1, with_corrupted=False)])
    assert no_corrupted.corrupted is None and no_corrupted.lookup(["b"], 0).tolist() == [1.0, 101.0]


def test_merge_refuses_overlapping_or_mismatched_parts():
    with pytest.raises(StaleCacheError, match="overlap"):
        ReferenceCache.merge([_part(["a", "b"], 0), _part(["b"], 10)])
    with pytest.raises(StaleCacheError, match="part 1 has another fingerprint.*data.sha256"):
        ReferenceCache.merge([_part(["a"], 0), _part(["b"], 10, fp={"data.sha256": "zzz"})])
