"""AMBER (mdpo/eval/amber.py) on a small synthetic AMBER folder (tests/benchmark_files.py): discriminative
counts worked by hand and put through the formulas of AMBER's inference.py; generative scores of
hand-worked descriptions (our noun path: without vector synonyms)."""
import pytest

from benchmark_files import make_amber_dir
from mdpo.eval.amber import WITHOUT_VECTORS, AmberDataError, load_amber, score_amber, score_description, text_tools

DESCRIPTIONS = {
    # kept nouns: dog puppy grass car tree sign. dog, puppy -> truth "dog"; grass -> "grass"; car: a hallu object
    # (covered, Cog) and hallucinated; tree: hallucinated; sign: a safe word (counted, never hallucinated)
    "1": "A dog and a puppy on the grass, next to a car and a tree. A sign.",
    # men -> man -> the first "person" (association words come first); woman: the same entry; the second
    # "person" entry is never covered (as in the script); "Dogs" keeps its case: no noun of the lists
    "2": "Two men and a woman. Dogs.",
}
YES_NO = {"3": "Yes", "4": "No, there is no cat.", "5": "Yes", "6": "No", "7": "no", "8": "I don't see one", "9": "Yes."}


@pytest.fixture(scope="module")
def amber(tmp_path_factory):
    return load_amber(make_amber_dir(tmp_path_factory.mktemp("amber")))


@pytest.fixture(scope="module")
def report(amber):
    tools = text_tools(prefer_amber=False)
    return score_amber(amber, {**DESCRIPTIONS, **YES_NO}, tools)


def test_generative_descriptions_by_hand(amber, report):
    tools = text_tools(prefer_amber=False)
    one = score_description(DESCRIPTIONS["1"], ["dog", "grass"], ["cat", "car"], amber, tools)
    assert one.nouns == ["dog", "puppy", "grass", "car", "tree", "sign"]
    assert one.hallucinated == [False, False, False, True, True, False]
    assert one.truth_covered == [True, True] and one.hallu_covered == [False, True]
    two = score_description(DESCRIPTIONS["2"], ["person", "person"], ["bird"], amber, tools)
    assert two.nouns == ["man", "woman"] and two.hallucinated == [False, False]
    assert two.truth_covered == [True, False] and two.hallu_covered == [False]
    g = report.generative
    # 8 kept nouns, 2 hallucinated; truth entries 2 + 2, covered 2 + 1; hallu entries 2 + 1, covered 1; 1 of 2 hallucinate
    assert (g["chair"], g["cover"], g["hal"], g["cog"]) == (2 / 8, 3 / 4, 1 / 2, 1 / 3)
    # inference.py: every *_num starts at 0.001 (metrics.txt), percentages rounded to 0.1
    assert g["printed"] == {"chair": round(2 / (0.001 + 8) * 100, 1), "cover": round(3 / (0.001 + 4) * 100, 1),
                            "hal": round(100 - 1 / (0.001 + 2) * 100, 1), "cog": round(1 / (0.001 + 3) * 100, 1)}
    assert g["printed"] == {"chair": 25.0, "cover": 75.0, "hal": 50.0, "cog": 33.3}
    assert report.method["label"] == WITHOUT_VECTORS == tools.label


def _script_f1(p, r, eps=0.0001):  # inference.py: F1 of the ROUNDED percentages, + eps in the denominator
    return round(2 * (p / 100) * (r / 100) / ((p / 100) + (r / 100) + eps) * 100, 1)


def test_discriminative_by_hand_against_the_scripts_formulas(report):
    d = report.discriminative
    assert report.normalised == 4  # "No, there is no cat.", "no", "I don't see one" (-> Yes), "Yes."
    # all 7: correct 3, 4, 7, 9; truth "no": 4, 5, 7, 8; answered "No": 4, 6, 7; both: 4, 7
    overall = d["discriminative"]
    assert (overall["n"], overall["correct"], overall["truth_no"], overall["answered_no"], overall["correct_no"]) == (7, 4, 4, 3, 2)
    assert (overall["accuracy"], overall["precision"], overall["recall"]) == (4 / 7, 2 / 3, 2 / 4)
    assert overall["f1"] == pytest.approx(4 / 7)
    p, r = round(2 / (0.001 + 3) * 100, 1), round(2 / (0.001 + 4) * 100, 1)
    assert overall["printed"] == {"accuracy": round(4 / (0.001 + 7) * 100, 1), "precision": p, "recall": r, "f1": _script_f1(p, r)}
    assert overall["printed"] == {"accuracy": 57.1, "precision": 66.6, "recall": 50.0, "f1": 57.1}
    # existence (3 yes -> Yes, 4 no -> No): perfect, printed through the 0.001 counters; its F1 uses + 0.001
    e = d["existence"]
    assert (e["accuracy"], e["precision"], e["recall"], e["f1"]) == (1.0, 1.0, 1.0, 1.0)
    p = round(1 / (0.001 + 1) * 100, 1)
    assert e["printed"] == {"accuracy": round(2 / (0.001 + 2) * 100, 1), "precision": p, "recall": p,
                            "f1": _script_f1(p, p, eps=0.001)} == {"accuracy": 100.0, "precision": 99.9, "recall": 99.9, "f1": 99.9}
    # attribute = state (5: no, Yes) + number (6: yes, No) + action (7: no, No); the script sums the three
    # sub-counters, each starting at 0.001
    a = d["attribute"]
    assert (a["n"], a["correct"], a["truth_no"], a["answered_no"], a["correct_no"]) == (3, 1, 2, 2, 1)
    answered_no = (0.001 + 0) + (0.001 + 1) + (0.001 + 1)  # state, number, action
    truth_no = (0.001 + 1) + (0.001 + 0) + (0.001 + 1)
    p, r = round(1 / answered_no * 100, 1), round(1 / truth_no * 100, 1)
    assert a["printed"] == {"accuracy": round(1 / (3 * 0.001 + 3) * 100, 1), "precision": p, "recall": r,
                            "f1": _script_f1(p, r)} == {"accuracy": 33.3, "precision": 49.9, "recall": 49.9, "f1": 49.9}
    # state alone: nothing answered "No": precision undefined here, 0.0 as the script prints it
    assert d["state"]["precision"] is None and d["state"]["printed"]["precision"] == 0.0
    # relation = discriminative-relation (8: no, "I don't see one" -> Yes) + relation (9: yes, Yes)
    rel = d["relation"]
    assert (rel["n"], rel["correct"], rel["recall"], rel["precision"]) == (2, 1, 0.0, None)
    assert list(d) == ["discriminative", "existence", "attribute", "state", "number", "action", "relation"]
    assert report.responses[2:4] == [{"id": 3, "response": "Yes"}, {"id": 4, "response": "No"}]  # AMBER's format


def test_tasks_and_bad_files(tmp_path):
    root = make_amber_dir(tmp_path)
    assert [q.id for q in load_amber(root, "existence").queries] == [3, 4]
    assert [q.id for q in load_amber(root / "data", "generative").queries] == [1, 2]
    relation = root / "data" / "relation.json"
    relation.write_text('{"dog": []}')
    with pytest.raises(AmberDataError, match=r"id 1: truth object 'grass' has no association list"):
        load_amber(root)
    with pytest.raises(AmberDataError, match="task 'everything'"):
        load_amber(root, "everything")
