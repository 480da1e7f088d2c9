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


def test_a_partial_cache_names_the_entries_it_lacks_and_merges_with_their_part(tmp_path):
    fp = canonical({"data.sha256": "abc"})
    held = torch.tensor([[True, False], [False, False]])
    part = ReferenceCache(fp, ["a", "b"], torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.zeros(2, 2),
                          torch.tensor([True, True]), held)
    part.save(tmp_path / "ref.pt")
    part = ReferenceCache.load(tmp_path / "ref.pt", fp)
    assert part.n_entries == 3 and part.lookup(["a"], 0).tolist() == [1.0, 3.0, 0.0]
    with pytest.raises(StaleCacheError, match=r"no corrupted-image entry at corruption epoch 1 for sample id\(s\) \['a'\]"):
        part.lookup(["a"], 1)
    rest = ReferenceCache(fp, ["b", "a"], torch.zeros(2), torch.zeros(2), torch.tensor([[5.0, 0.0], [6.0, 7.0]]),
                          torch.tensor([False, False]), torch.tensor([[True, False], [True, True]]))
    merged = ReferenceCache.merge([part, rest])
    assert merged.n_entries == 6 and merged.lookup(["b", "a"], 1).tolist() == [2.0, 1.0, 4.0, 3.0, 6.0, 7.0]
    with pytest.raises(StaleCacheError, match="overlap"):
        ReferenceCache.merge([merged, rest])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_weights_digest_sees_any_single_changed_weight(dtype):
    from mdpo.reference_cache import DIGEST_CHUNK

    gen = torch.Generator().manual_seed(1)
    values = 1 + 0.01 * torch.randn(DIGEST_CHUNK + 123, generator=gen)  # like a norm's weights: Σw ≈ 4·10^6
    big = torch.nn.Parameter((values * 50 if dtype == torch.int8 else values).to(dtype), requires_grad=False)
    model = torch.nn.Module()
    model.register_parameter("w", big)
    before = weights_digest(model)
    assert weights_digest(model) == before  # deterministic
    for index in (0, 1, DIGEST_CHUNK - 1, DIGEST_CHUNK, DIGEST_CHUNK + 122):  # both chunks, their edges
        with torch.no_grad():
            old = big[index].clone()
            bits = big.view(torch.int16 if big.element_size() == 2 else torch.int8 if big.element_size() == 1 else torch.int32)
            bits[index] += 1  # the smallest change of the value's bits (one ulp for floats)
            assert weights_digest(model) != before, index
            big[index] = old
    assert weights_digest(model) == before
    # two tensors swapped (same sums overall) are told apart by name
    pair = torch.nn.Module()
    pair.a, pair.b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(3))
    swapped = torch.nn.Module()
    swapped.a, swapped.b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.ones(3))
    assert weights_digest(pair) != weights_digest(swapped)
