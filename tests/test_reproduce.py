"""`python -m benchmarks.reproduce`: the claim statistics over worlds on synthetic per-run numbers, and
the whole pipeline end to end at a tiny size (in this process): every stage runs for every world, the
tables, the claim lines and the files are written, and the claim rules decide from the numbers."""
import json
import math

import pytest
import torch

from benchmarks import reproduce
from benchmarks._claims import C1_MARGIN, VERDICTS, between_worlds, claims, decide_part, diff_ci, mean_ci, t975
from benchmarks.reproduce import Scale

TINY = Scale("tiny", sft_scenes=32, sft_steps=3, pool_scenes=24, samples_per_scene=2,
             test_counts={"balanced": 4, "cue_only": 2, "partner_only": 2}, pref_steps=2, seeds=2, worlds=2,
             model=dict(text_width=32, text_layers=1, vision_width=16, vision_layers=1), sft_batch=8, pref_batch=4,
             sft_attempts=2)
OBJECTIVES = ("dpo", "dpo_no_image", "mdpo", "mdpo_no_conditional", "mdpo_no_anchor")
RUN_NOISE = (-0.5, 0.0, 0.5)  # three run seeds around each world's mean


def per_world(base: dict, world_offsets: dict | None = None, worlds: int = 3) -> dict:
    """world -> objective -> metric -> run values: `base[v]` + the world's offset for v + RUN_NOISE."""
    world_offsets = world_offsets or {}
    return {w: {v: {m: [base.get(v, 50.0) + world_offsets.get(v, [0.0] * worlds)[w] + e for e in RUN_NOISE]
                    for m in ("chair_s", "chair_i", "recall")} for v in OBJECTIVES} for w in range(worlds)}


def verdicts(result: list[dict]) -> list[str]:
    return [c["verdict"] for c in result]


PAPER_LIKE = dict(dpo=44.3, dpo_no_image=44.3, mdpo=27.0, mdpo_no_conditional=40.3, mdpo_no_anchor=34.3)
SEED0_LIKE = dict(dpo=34.5, dpo_no_image=65.9, mdpo=60.4, mdpo_no_conditional=60.1, mdpo_no_anchor=41.3)


def test_intervals_by_hand():
    s = mean_ci([1.0, 2.0, 3.0])  # sd 1, t(2) = 4.303
    assert s["mean"] == 2.0 and s["ci"] == pytest.approx(4.303 / math.sqrt(3))
    assert math.isnan(mean_ci([5.0])["ci"])
    d = diff_ci([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert d["diff"] == 0 and d["low"] < 0 < d["high"]
    b = between_worlds([2.0, -4.0, 5.0])  # mean 1, sd sqrt(21)
    assert b["diff"] == pytest.approx(1.0) and b["high"] - b["diff"] == pytest.approx(4.303 * math.sqrt(21 / 3))
    assert b["worlds"] == 3 and math.isnan(between_worlds([2.0])["low"])
    assert t975(11) == t975(10) and t975(40) == 1.96


def test_decide_part_directions_and_equivalence_margin():
    iv = lambda low, high: {"low": low, "high": high}  # noqa: E731
    assert [decide_part("below", iv(*x)) for x in [(-3, -1), (1, 3), (-1, 1)]] == ["supported", "contradicted", "open"]
    assert [decide_part("above", iv(*x)) for x in [(1, 3), (-3, -1), (-1, 1)]] == ["supported", "contradicted", "open"]
    m = C1_MARGIN
    assert decide_part("equal", iv(-m + 1, m - 1), m) == "supported"
    assert decide_part("equal", iv(m + 1, m + 9), m) == "contradicted"
    assert decide_part("equal", iv(-3 * m, 3 * m), m) == "open"  # contains 0, but far too wide to call "about equal"
    assert decide_part("below", iv(float("nan"), float("nan"))) == "open"


def test_claims_when_every_world_agrees():
    assert verdicts(claims(per_world(PAPER_LIKE))) == ["reproduced"] * 4
    # the committed seed-0 world, drawn three times: C3 by its rule, the others contradicted
    assert verdicts(claims(per_world(SEED0_LIKE))) == ["not reproduced", "not reproduced", "reproduced", "not reproduced"]


def test_between_world_spread_widens_the_interval_and_undecides_a_claim():
    # mDPO − (mDPO − conditional): tight inside each world (run noise ±0.5), but the worlds' own effects differ
    agree = {"mdpo_no_conditional": [6.0, 12.0, 9.0]}  # − conditional is worse than mDPO by 13.3 + (6, 12, 9)
    disagree = {"mdpo_no_conditional": [-12.0, -25.0, 4.0]}  # the seed-11 pattern: the term helps in one world only
    c_agree, c_disagree = claims(per_world(PAPER_LIKE, agree)), claims(per_world(PAPER_LIKE, disagree))
    part = lambda cs: cs[3]["numbers"]["vs_mdpo_no_conditional"]  # noqa: E731
    a, d = part(c_agree), part(c_disagree)
    # the interval is t(2)·sd(world means)/√3, the run noise cancels in each world mean
    world_means = [27.0 - (40.3 + o) for o in disagree["mdpo_no_conditional"]]
    assert d["high"] - d["diff"] == pytest.approx(t975(2) * math.sqrt(sum((x - d["diff"]) ** 2 for x in world_means) / 2) / math.sqrt(3))
    assert (d["high"] - d["low"]) > 4 * (a["high"] - a["low"])  # worlds 4x more spread: a 4x wider interval
    assert a["decision"] == "supported" and d["decision"] == "open"
    assert c_agree[3]["verdict"] == "reproduced" and c_disagree[3]["verdict"] == "not decided"
    # each world alone is decided (its run seeds agree), and the worlds disagree with each other
    assert {w: x["decision"] for w, x in d["per_world"].items()} == {0: "supported", 1: "contradicted", 2: "supported"}
    assert c_disagree[3]["world_verdicts"] == {0: "reproduced", 1: "not reproduced", 2: "reproduced"}
    # C3 reads the same two ablations: its worlds disagree too
    assert c_disagree[2]["verdict"] == "not decided" and c_agree[2]["verdict"] == "reproduced"
    # the other claims did not move
    assert verdicts(c_disagree)[:2] == ["reproduced", "reproduced"]


def test_c1_equivalence_needs_a_narrow_interval_not_just_zero_inside_it():
    # DPO (no image) ≈ DPO on average, but the worlds disagree by ±20 CHAIR points: "contains 0" would pass it
    wide = claims(per_world(PAPER_LIKE, {"dpo_no_image": [20.0, -20.0, 1.0]}))
    assert wide[0]["numbers"]["chair_s"]["low"] < 0 < wide[0]["numbers"]["chair_s"]["high"]
    assert wide[0]["verdict"] == "not decided"
    assert claims(per_world(PAPER_LIKE, {"dpo_no_image": [2.0, -1.0, 1.0]}))[0]["verdict"] == "reproduced"


def test_one_world_gives_no_interval_over_worlds():
    one = claims(per_world(PAPER_LIKE, worlds=1))
    assert verdicts(one) == ["not decided"] * 4
    assert [c["world_verdicts"][0] for c in one] == ["reproduced"] * 4  # the world alone, from its run seeds


def test_bad_worlds_argument_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exc:
        reproduce.main(["--worlds", "0"])
    assert exc.value.code == 2 and "--worlds 0" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_path_at_a_tiny_size_writes_a_valid_table(tmp_path):
    threads = torch.get_num_threads()
    summary = reproduce.run(TINY, seed=3, work=tmp_path / "work", out_dir=tmp_path / "out", stem="t", jobs=0, log=lambda *_: None)
    assert torch.get_num_threads() == threads  # one torch thread while it ran in this process, then restored
    assert [w["seed"] for w in summary["worlds"]] == [3, 4]
    assert set(summary["table"]) == set(reproduce.VARIANTS)
    for v, row in summary["table"].items():
        assert row["chair_s"]["n"] == 2  # one mean per world
        assert 0 <= row["recall"]["mean"] <= 1 and 0 <= row["chair_s"]["mean"] <= 100
        for w in summary["worlds"]:
            assert w["table"][v]["chair_s"]["n"] == (1 if v == "sft" else 2)  # the world's run seeds
    assert len(summary["claims"]) == 4 and all(c["verdict"] in VERDICTS for c in summary["claims"])
    assert summary["test_scenes"] == 8 and all(w["pairs"]["records"] == 24 for w in summary["worlds"])
    # a tiny SFT model cannot see: a second random start was tried in each world, and both are reported
    assert [[a["model_seed"] for a in w["sft_attempts"]] for w in summary["worlds"]] == [[3, 1003], [4, 1004]]
    assert summary["cpu_seconds"] > 0
    md = (tmp_path / "out" / "t.md").read_text()
    assert "| mDPO |" in md and "paper" in md and "world 3 | world 4" in md and md.count("**verdict**") == 4
    saved = json.loads((tmp_path / "out" / "t.json").read_text())
    assert saved["seed"] == 3 and len(saved["runs"]) == 2 * (1 + 5 * 2)
    assert {(r["world"], r["seed"]) for r in saved["runs"] if r["variant"] == "mdpo"} == {(3, 3), (3, 4), (4, 4), (4, 5)}
    assert (tmp_path / "out" / "t.png").stat().st_size > 1000
    # each world's test split was written before any training, from its seed alone, in its own folder
    for s in (3, 4):
        test = json.loads((tmp_path / "work" / f"world-{s}" / "test.json").read_text())
        assert [r["kind"] for r in test].count("cue_only") == 2
    assert json.loads((tmp_path / "work" / "world-3" / "test.json").read_text()) != test
    # --report re-derives the tables and claims from the runs alone
    saved["claims"], saved["table"] = [], {}
    (tmp_path / "again.json").write_text(json.dumps(saved))
    assert reproduce.main(["--report", str(tmp_path / "again.json"), "--out", str(tmp_path / "re")]) == 0
    assert (tmp_path / "re" / "again.md").read_text().split("## Data and training")[0] == md.split("## Data and training")[0]
