"""Co-occurrence scenes (`mdpo.data.scenes`): the prior is in the training scenes and absent from the
trap scenes, mentions and scores are exact, the pair builder labels exactly and is deterministic."""
import json
import random

import pytest

from mdpo.data import scenes
from mdpo.data.scenes import PAIRS, PARTNER, build_pairs, describe, label_answer, mentions, score, text_only_accuracy


def test_training_scenes_carry_the_cooccurrence_and_trap_scenes_break_it():
    rng = random.Random(0)
    train = [scenes.sample_categories(rng, "train") for _ in range(3000)]
    for cue, partner in PAIRS:
        with_cue = [s for s in train if cue in s]
        assert sum(partner in s for s in with_cue) / len(with_cue) == pytest.approx(0.9, abs=0.04)
    for kind in ("cue_only", "partner_only"):
        for s in (scenes.sample_categories(rng, kind) for _ in range(200)):
            assert any(PARTNER[c] not in s for c in s)  # at least one object without its partner
            assert 1 <= len(s) <= scenes.MAX_OBJECTS and s == [c for c in scenes.CATEGORIES if c in s]
    with pytest.raises(ValueError, match="kind"):
        scenes.sample_categories(rng, "odd")


def test_mentions_and_labels_are_exact():
    assert describe(["blue square", "red circle", "orange circle"]) == "a red circle, a blue square and an orange circle."
    assert mentions("A red circle, two blue squares and a red circle.") == ["red circle", "blue square"]
    assert mentions("a red square and a blue circle.") == []  # not categories: no mention
    lab = label_answer("a red circle and a blue square.", ["red circle", "green triangle"])
    assert lab == {"mentioned": ["red circle", "blue square"], "hallucinated": ["blue square"],
                   "correct": ["red circle"], "recall": 0.5}


def test_score_on_hand_made_answers():
    records = [{"objects": ["red circle"], "kind": "cue_only"},                  # partner (blue square) missing
               {"objects": ["red circle", "blue square"], "kind": "balanced"},
               {"objects": ["yellow star"], "kind": "partner_only"}]            # cue (green triangle) missing
    answers = ["a red circle and a blue square.", "a red circle.", "nothing."]
    s = score(answers, records)
    # mentions: 2 + 1 + 0 = 3, hallucinated 1 (blue square in answer 0)
    assert s["chair_i"] == pytest.approx(100 / 3) and s["chair_s"] == pytest.approx(100 / 3)
    assert s["recall"] == pytest.approx(2 / 4) and s["objects_per_answer"] == pytest.approx(1.0)
    assert s["prior_rate"] == pytest.approx(50.0)  # 1 of the 2 trap scenes names its missing partner
    with pytest.raises(ValueError, match="answers"):
        score(answers[:2], records)


def _pool():
    return [{"id": "a", "image": "a.png", "question": scenes.QUESTION, "objects": ["red circle"], "kind": "train"},
            {"id": "b", "image": "b.png", "question": scenes.QUESTION, "objects": ["green triangle", "yellow star"], "kind": "train"},
            {"id": "c", "image": "c.png", "question": scenes.QUESTION, "objects": ["cyan square"], "kind": "train"},
            {"id": "d", "image": "d.png", "question": scenes.QUESTION, "objects": ["purple diamond"], "kind": "train"}]


def test_pair_builder_labels_exactly():
    samples = [
        ["a red circle and a blue square.", "a red circle.", "a red circle, a blue square and a pink triangle.", "a red circle."],
        ["a green triangle.", "a green triangle and a yellow star.", "a yellow star.", "a green triangle and a yellow star."],
        ["a cyan square and a pink triangle.", "a pink triangle.", "a cyan square and a pink triangle.", "nothing."],
        ["a purple diamond.", "a purple diamond.", "a purple diamond.", "a purple diamond."],
    ]
    pairs, stats = build_pairs(_pool(), samples, seed=0)
    by_id = {p["id"]: p for p in pairs}
    assert set(by_id) == {"a", "c"}  # b and d: no hallucinating sample
    assert by_id["a"]["chosen"] == "a red circle."
    assert by_id["a"]["rejected"] in (samples[0][0], samples[0][2])
    assert "blue square" in by_id["a"]["rejected_hallucinated"]
    assert by_id["c"]["chosen"] == "a cyan square."  # no faithful sample: the reference answer
    assert by_id["c"]["rejected"] in (samples[2][0], samples[2][1], samples[2][2])
    for p in pairs:  # chosen faithful, rejected hallucinating: checked against the object lists again
        assert not label_answer(p["chosen"], p["objects"])["hallucinated"]
        assert label_answer(p["rejected"], p["objects"])["hallucinated"] == p["rejected_hallucinated"] != []
    assert stats == {"records": 4, "pairs": 2, "gold_chosen": 1, "no_hallucination": 2, "rejected_names_partner": 2,
                     "samples": 16, "samples_hallucinating": 5}
    # deterministic for a seed; another seed may pick another rejected answer but the same labels
    assert build_pairs(_pool(), samples, seed=0) == (pairs, stats)
    picks = {build_pairs(_pool(), samples, seed=s)[0][0]["rejected"] for s in range(20)}
    assert picks == {samples[0][0], samples[0][2]}


def test_text_only_accuracy_sees_a_text_cue_and_nothing_without_one():
    rng = random.Random(0)
    cued, blind = [], []
    for _ in range(200):
        objs = sorted(rng.sample(scenes.CATEGORIES, 2))
        cued.append({"chosen": describe(objs[:1]), "rejected": describe(objs)})  # rejected always names one more
        a, b = describe([rng.choice(scenes.CATEGORIES)]), describe([rng.choice(scenes.CATEGORIES)])
        blind.append({"chosen": a, "rejected": b})
    assert text_only_accuracy(cued) > 0.95
    assert 0.35 < text_only_accuracy(blind) < 0.65
    assert text_only_accuracy(cued, seed=3) == text_only_accuracy(cued, seed=3)


def test_write_split_is_a_function_of_the_seed(tmp_path):
    counts = {"balanced": 3, "cue_only": 2, "partner_only": 2}
    a = json.loads(scenes.write_split(tmp_path / "a", "test", counts, seed=1).read_text())
    b = json.loads(scenes.write_split(tmp_path / "b", "test", counts, seed=1).read_text())
    c = json.loads(scenes.write_split(tmp_path / "c", "test", counts, seed=2).read_text())
    assert a == b and a != c and len(a) == 7
    assert (tmp_path / "a" / a[0]["image"]).read_bytes() == (tmp_path / "b" / b[0]["image"]).read_bytes()
    assert [r["kind"] for r in a] == ["balanced"] * 3 + ["cue_only"] * 2 + ["partner_only"] * 2
    for r in a:
        assert r["chosen"] == describe(r["objects"]) and label_answer(r["rejected"], r["objects"])["hallucinated"]
    with pytest.raises(ValueError, match="kinds"):
        scenes.write_split(tmp_path / "d", "x", {"weird": 1}, seed=0)


def test_the_sampler_is_deterministic_and_the_blank_image_changes_nothing_per_record(tmp_path):
    recs = json.loads(scenes.write_split(tmp_path, "t", {"balanced": 3}, seed=0).read_text())
    model = scenes.build_scene_model(tmp_path / "m", seed=0, text_width=32, text_layers=1, vision_width=16, vision_layers=1)
    kw = dict(n_samples=2, temperature=0.7, top_k=20, seed=5, max_new_tokens=6)
    first = scenes.sample_answers(model, recs, tmp_path, **kw)
    assert first == scenes.sample_answers(model, recs, tmp_path, **kw) and len(first) == 3 and len(first[0]) == 2
    blank = scenes.sample_answers(model, recs, tmp_path, blank=True, max_new_tokens=6)
    assert len({a[0] for a in blank}) == 1  # same question, same blank image: one greedy answer
    with pytest.raises(ValueError, match="greedy"):
        scenes.sample_answers(model, recs, tmp_path, n_samples=2)
