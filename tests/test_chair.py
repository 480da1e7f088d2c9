"""CHAIR / recall / hallucination-rate metrics (mdpo/eval/chair.py) on hand-made answers whose values
are worked out here, both annotation sources, and the bad inputs that must name what is wrong."""
import json

import pytest

from mdpo.errors import MdpoError
from mdpo.eval.chair import (
    HallucinationDataError,
    ObjectVocabulary,
    VocabularyError,
    annotations_from_records,
    format_category_table,
    format_table,
    load_annotation_source,
    load_annotations,
    load_coco_annotations,
    plot_bars,
    score_answers,
    score_answers_file,
)

SCENES = {"red circle": ["red disc"], "blue square": [], "green triangle": []}


@pytest.fixture(scope="module")
def coco():
    return ObjectVocabulary.coco()


def cats(vocab, text):
    return [(m.text, m.category) for m in vocab.find_mentions(text)]


# --- mention extraction ---------------------------------------------------------------------------
def test_coco_vocabulary_has_the_80_categories(coco):
    assert len(coco.categories) == 80 and "hot dog" in coco and "hair drier" in coco and "dog" in coco


def test_synonyms_and_plurals(coco):
    assert cats(coco, "A puppy, two kittens, three women and some knives.") == [
        ("puppy", "dog"), ("kittens", "cat"), ("women", "person"), ("knives", "knife")]
    # irregular and plural-only forms both ways, from lemminflect's dictionary
    assert cats(coco, "mice, a mouse, people, a person, skis, one ski") == [
        ("mice", "mouse"), ("mouse", "mouse"), ("people", "person"), ("person", "person"),
        ("skis", "skis"), ("ski", "skis")]


def test_spans_index_the_answer(coco):
    text = "Two Hot-Dogs beside a DOG."
    mentions = coco.find_mentions(text)
    assert [(text[m.start:m.end], m.category) for m in mentions] == [("Hot-Dogs", "hot dog"), ("DOG", "dog")]
    assert [m.text for m in mentions] == ["Hot-Dogs", "DOG"]


@pytest.mark.parametrize("text, expected", [
    ("a hot dog on a plate", [("hot dog", "hot dog")]),                      # food, not a dog
    ("a teddy bear and a bear", [("teddy bear", "teddy bear"), ("bear", "bear")]),
    ("he swings a baseball bat", [("baseball bat", "baseball bat")]),
    ("a baby elephant", [("baby elephant", "elephant")]),                    # not a person
    ("a passenger train", [("passenger train", "train")]),
    ("a computer monitor", [("computer monitor", "tv")]),                    # not a laptop
    ("the train cars", [("train cars", "train")]),                           # not a car
    ("the toilet seat is up", [("toilet seat", "toilet")]),                  # not a chair
    ("the seat of the toilet", [("toilet", "toilet")]),                      # CHAIR's toilet-seat rule
    ("a seat by the window", [("seat", "chair")]),
    ("the motorcycle seat", [("motorcycle", "motorcycle")]),                 # the seat is part of it
    ("a microwave oven", [("microwave oven", "microwave")]),                 # not an oven too
    ("a boy on a dirt bike", [("boy", "person"), ("dirt bike", "motorcycle")]),   # not a bicycle
    ("an orange cat eats an orange", [("cat", "cat"), ("orange", "orange")]),  # colour vs fruit
    ("people wait at the bus stop", [("people", "person")]),                 # not a bus
    ("a skier on the ski slope", [("skier", "person")]),                     # not skis
])
def test_classic_chair_traps(coco, text, expected):
    assert cats(coco, text) == expected


def test_two_word_categories_of_a_small_vocabulary():
    vocab = ObjectVocabulary.from_dict(SCENES, name="scenes")
    assert cats(vocab, "Two red circles, a red disc and a blue square; red and circle alone are not objects.") == [
        ("red circles", "red circle"), ("red disc", "red circle"), ("blue square", "blue square")]


def test_vocabulary_file_and_ambiguity(tmp_path):
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps({"categories": SCENES, "not_objects": ["red circle shaped"]}))
    vocab = ObjectVocabulary.from_file(path)
    assert vocab.name == "shapes" and cats(vocab, "a red circle shaped cake") == []
    with pytest.raises(VocabularyError, match="'disc'.*'a'.*'b'"):
        ObjectVocabulary.from_dict({"a": ["disc"], "b": ["disc"]})
    # a written synonym beats a generated form of another ("discs" is a plural of "disc")
    assert ObjectVocabulary.from_dict({"a": ["disc"], "b": ["discs"]}).lookup("discs") == "b"
    with pytest.raises(VocabularyError, match="unknown category 'nope'"):
        ObjectVocabulary.from_dict({"categories": {"a": []}, "qualifiers": {"baby": ["nope"]}})
    with pytest.raises(VocabularyError, match="not_objects must be a list"):
        ObjectVocabulary({"a": []}, not_objects="a b")
    with pytest.raises(VocabularyError, match="modifier 'light blue' must be a single word"):
        ObjectVocabulary({"a": []}, modifiers=["light blue"])
    with pytest.raises(VocabularyError, match="unknown keys"):
        ObjectVocabulary.from_dict({"categories": {"a": []}, "synonym": {}})


# --- metrics, worked out by hand --------------------------------------------------------------------
def test_metrics_worked_example(coco):
    ann = annotations_from_records([
        {"id": "1", "objects": ["dog", "couch"]},
        {"id": "2", "objects": ["person", "cat"]},
        {"id": "3", "objects": ["car"]},
    ], coco)
    answers = [
        # mentions dog, cat (H), dog again: 3 mentions, 1 hallucinated; objects {dog, cat}; covers dog of {dog, couch}
        {"id": "1", "answer": "A dog and a cat; the dog sleeps.", "tokens": 10},
        # mentions man (person), hot dog (H): 2 mentions, 1 hallucinated; covers person of {person, cat}
        {"id": "2", "answer": "A man eats a hot dog.", "tokens": 8},
        # no object at all: 0 mentions; covers nothing of {car}
        {"id": "3", "answer": "It is sunny.", "tokens": 3},
    ]
    report = score_answers(answers, ann)
    m = report.metrics
    assert m["n_mentions"] == 5 and m["n_hallucinated_mentions"] == 2
    assert m["chair_i"] == pytest.approx(2 / 5)           # every mention counts, the repeated dog twice
    assert m["chair_i_unique"] == pytest.approx(2 / 4)    # objects per answer: {dog, cat} + {person, hot dog}
    assert m["chair_s"] == pytest.approx(2 / 3) and m["hal_rate"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 5)            # dog + person of 5 ground-truth objects
    assert m["objects_per_answer"] == pytest.approx(4 / 3) and m["mentions_per_answer"] == pytest.approx(5 / 3)
    assert m["tokens_per_answer"] == pytest.approx(7.0) and report.length_source == "given"
    first, second, third = report.per_answer
    assert [(x.text, x.hallucinated) for x in first.mentions] == [("dog", False), ("cat", True), ("dog", False)]
    assert first.chair_i == pytest.approx(1 / 3) and third.chair_i is None and third.mentions == []
    assert first.marked() == "A dog and a [[cat]]; the dog sleeps."
    assert second.marked("<", ">") == "A man eats a <hot dog>."
    assert report.top_hallucinated() == [("cat", 1), ("hot dog", 1)]
    assert report.per_category["dog"].mentions == 2 and report.per_category["couch"].in_ground_truth == 1
    assert report.per_category["couch"].covered == 0 and report.per_category["person"].covered == 1
    record = json.loads(json.dumps(report.answer_records()[0]))
    assert record["hallucinated"] == ["cat"] and record["mentions"][1] == {
        "text": "cat", "category": "cat", "start": 12, "end": 15, "hallucinated": True}
    assert json.loads(json.dumps(report.to_dict()))["metrics"]["chair_s"] == pytest.approx(2 / 3)


def test_lengths_by_whitespace_and_undefined_ratios():
    vocab = ObjectVocabulary.from_dict(SCENES)
    ann = annotations_from_records([{"id": "a", "objects": []}, {"id": "b", "objects": []}], vocab)
    report = score_answers([{"id": "a", "answer": "nothing  to see\nhere"}, {"id": "b", "answer": ""}], ann)
    assert report.metrics["tokens_per_answer"] == pytest.approx(2.0) and report.length_source == "whitespace"
    # no mention and no ground-truth object at all: CHAIR_i and recall are undefined, CHAIR_s is 0
    assert report.metrics["chair_i"] is None and report.metrics["recall"] is None and report.metrics["chair_s"] == 0
    mixed = score_answers([{"id": "a", "answer": "one two", "tokens": 5}, {"id": "b", "answer": "x"}], ann)
    assert mixed.length_source == "mixed" and mixed.metrics["tokens_per_answer"] == pytest.approx(3.0)


def test_empty_answer_set_is_an_error(coco, tmp_path):
    ann = annotations_from_records([{"id": "1", "objects": ["dog"]}], coco)
    with pytest.raises(HallucinationDataError, match="no answers"):
        score_answers([], ann)
    empty = tmp_path / "answers.jsonl"
    empty.write_text("\n")
    with pytest.raises(HallucinationDataError, match="answers.jsonl.*no answers"):
        score_answers_file(empty, ann)


# --- annotation sources and answer files --------------------------------------------------------------
def test_records_file_and_answers_file(tmp_path):
    vocab = ObjectVocabulary.from_dict(SCENES, name="scenes")
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"id": "s1", "image": "images/1.png", "question": "Describe.",
                                "objects": ["red circle", "blue square"]}) + "\n\n"
                    + json.dumps({"id": 7, "objects": [{"category": "green triangle"}]}) + "\n")
    ann = load_annotations(data, vocab)
    assert ann["s1"].objects == {"red circle", "blue square"} and ann["s1"].image == "images/1.png"
    assert ann[7].objects == {"green triangle"}   # ids are compared as strings
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"id": "s1", "answer": "A red disc and a green triangle."}) + "\n"
                       + json.dumps({"image_id": 7, "answer": "A green triangle."}) + "\n")
    report = score_answers_file(answers, ann)   # vocabulary: the annotations'
    assert report.metrics["chair_i"] == pytest.approx(1 / 3) and report.metrics["recall"] == pytest.approx(2 / 3)
    assert report.vocabulary == "scenes"
    # object_name maps structured objects (e.g. the sample scenes' {colour, shape} dicts)
    data2 = tmp_path / "scenes.json"
    data2.write_text(json.dumps([{"id": "x", "objects": [{"colour": "red", "shape": "circle"}]}]))
    ann2 = load_annotations(data2, vocab, object_name=lambda o: f"{o['colour']} {o['shape']}")
    assert ann2["x"].objects == {"red circle"}


def coco_instances(tmp_path):
    data = {
        "images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}, {"id": 7, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 42, "category_id": 18}, {"image_id": 42, "category_id": 18},
                        {"image_id": 42, "category_id": 1}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 3, "name": "car"}],
    }
    path = tmp_path / "instances_val2014.json"
    path.write_text(json.dumps(data))
    return path, data


def test_coco_instances_annotations(tmp_path, coco):
    path, _ = coco_instances(tmp_path)
    ann = load_coco_annotations(path, image_root=tmp_path / "val2014")
    assert ann[42].objects == {"dog", "person"} and ann["7"].objects == frozenset()
    assert ann[42].image == str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    assert load_annotation_source(path)[42].objects == {"dog", "person"}   # told apart by content
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"image_id": 42, "answer": "Two dogs and a car."}) + "\n"
                       + json.dumps({"image_id": 7, "answer": "An empty road."}) + "\n")
    report = score_answers_file(answers, path, image_root=tmp_path)
    assert report.metrics["chair_s"] == pytest.approx(1 / 2) and report.metrics["chair_i"] == pytest.approx(1 / 2)
    assert report.metrics["recall"] == pytest.approx(1 / 2)   # dog of {dog, person}; image 7 has no objects


# --- bad inputs ---------------------------------------------------------------------------------------
def test_unknown_category_names_the_record(tmp_path):
    data = tmp_path / "eval.json"
    data.write_text(json.dumps([{"id": "ok", "objects": ["dog"]}, {"id": "bad-7", "objects": ["dog", "unicorn"]}]))
    with pytest.raises(HallucinationDataError, match=r"record 1 \(id 'bad-7'\).*'unicorn'") as info:
        load_annotations(data)
    assert isinstance(info.value, MdpoError)
    with pytest.raises(HallucinationDataError, match="record 0.*missing 'id'"):
        annotations_from_records([{"objects": []}])
    with pytest.raises(HallucinationDataError, match="'x'.*duplicate id"):
        annotations_from_records([{"id": "x", "objects": []}, {"id": "x", "objects": []}])


def test_answer_without_annotation_names_the_id(tmp_path, coco):
    path, data = coco_instances(tmp_path)
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"image_id": 42, "answer": "a dog"}) + "\n"
                       + json.dumps({"image_id": 99, "answer": "a cat"}) + "\n")
    with pytest.raises(HallucinationDataError, match=r"answers.jsonl: record 1 \(id '99'\): no annotation for id '99'"):
        score_answers_file(answers, path)
    answers.write_text(json.dumps({"answer": "a dog"}) + "\n")
    with pytest.raises(HallucinationDataError, match="record 0: no 'id' or 'image_id'"):
        score_answers_file(answers, path)
    answers.write_text("{not json\n")
    with pytest.raises(HallucinationDataError, match="line 1 is not valid JSON"):
        score_answers_file(answers, path)


def test_bad_coco_files(tmp_path):
    path, data = coco_instances(tmp_path)
    data["categories"].append({"id": 99, "name": "unicorn"})
    path.write_text(json.dumps(data))
    with pytest.raises(HallucinationDataError, match="'unicorn'.*not in vocabulary 'coco'"):
        load_coco_annotations(path)
    data["categories"].pop()
    data["annotations"].append({"image_id": 5, "category_id": 1})
    path.write_text(json.dumps(data))
    with pytest.raises(HallucinationDataError, match="annotation 3 refers to image id 5"):
        load_coco_annotations(path)
    with pytest.raises(HallucinationDataError, match="not found"):
        load_coco_annotations(tmp_path / "missing.json")


# --- table and chart ----------------------------------------------------------------------------------
def test_table_and_bars(tmp_path, coco):
    ann = annotations_from_records([{"id": "1", "objects": ["dog"]}], coco)
    base = score_answers([{"id": "1", "answer": "A dog and a cat.", "tokens": 6}], ann)
    tuned = score_answers([{"id": "1", "answer": "A dog.", "tokens": 3}], ann)
    table = format_table({"base": base, "mdpo": tuned})
    lines = table.strip().splitlines()
    assert lines[0] == "| model | CHAIR_s ↓ | CHAIR_i ↓ | recall ↑ | tokens/answer | objects/answer | answers |"
    assert lines[2] == "| base | 100.0 | 50.0 | 100.0 | 6.00 | 2.00 | 1 |"
    assert lines[3] == "| mdpo | 0.0 | 0.0 | 100.0 | 3.00 | 1.00 | 1 |"
    # metrics read back from metrics.json give the same table
    stored = json.loads(json.dumps({"base": base.to_dict(), "mdpo": tuned.metrics}))
    assert format_table(stored) == table
    assert format_category_table({"base": base, "mdpo": tuned}).splitlines() == [
        "| hallucinated object | base | mdpo |", "|---|---:|---:|", "| cat | 1 | 0 |"]
    png = plot_bars({"base": base, "mdpo": tuned}, tmp_path / "plots" / "chair.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_coco_captions_add_objects_as_chair_does(tmp_path):
    path, _ = coco_instances(tmp_path)
    captions = tmp_path / "captions_val2014.json"
    captions.write_text(json.dumps({"annotations": [
        {"image_id": 42, "caption": "A man and his puppy on a sofa."},   # adds couch (person, dog already there)
        {"image_id": 7, "caption": "A road."}, {"image_id": 1000, "caption": "A cat."}]}))   # unknown image: ignored
    ann = load_coco_annotations(path, captions_path=captions)
    assert ann[42].objects == {"person", "dog", "couch"} and ann[7].objects == frozenset()
    captions.write_text(json.dumps({"annotations": [{"image_id": 1000, "caption": "A cat."}]}))
    with pytest.raises(HallucinationDataError, match="no caption belongs to an image"):
        load_coco_annotations(path, captions_path=captions)


def test_coco_file_given_as_records_is_refused(tmp_path):
    path, _ = coco_instances(tmp_path)
    with pytest.raises(HallucinationDataError, match="is a COCO instances file"):
        load_annotations(path)
    pretty = tmp_path / "one.json"
    pretty.write_text(json.dumps({"id": "a", "objects": ["dog"]}, indent=2))
    with pytest.raises(HallucinationDataError, match="one JSON object over several lines"):
        load_annotations(pretty)
    pretty.write_text(json.dumps({"id": "a", "objects": ["dog"]}))   # the same on one line is one JSONL record
    assert load_annotations(pretty)["a"].objects == {"dog"}


def test_negation_is_counted_unless_skipped(coco):
    text = "No, a bird sits here; there is no dog. There isn't a cat, a man without a kite."
    assert [c for _, c in cats(coco, text)] == ["bird", "dog", "cat", "person", "kite"]   # CHAIR: every mention
    kept = [m.category for m in coco.find_mentions(text, skip_negated=True)]
    assert kept == ["bird", "person"]   # dog, cat, kite follow "no", "n't", "without"; "No," ends its clause
    ann = annotations_from_records([{"id": "1", "objects": ["bird", "person"]}], coco)
    answers = [{"id": "1", "answer": text}]
    assert score_answers(answers, ann).metrics["chair_s"] == 1.0
    assert score_answers(answers, ann, skip_negated=True).metrics["chair_i"] == 0.0


def test_synthetic_scenes_end_to_end(tmp_path):
    """make-sample's faithful descriptions hallucinate nothing and cover every object; its rejected
    descriptions invent an object (a hallucination unless the scene already has that colour + shape)."""
    from mdpo.data.sample import make_sample
    from mdpo.eval.chair import scene_object_name, scene_vocabulary

    path = make_sample(tmp_path / "scenes", n=40, seed=3, image_size=24)
    records = [r for r in json.loads(path.read_text()) if r["question_type"] == "describe"]
    assert records
    ann = load_annotations(path, scene_vocabulary(), object_name=scene_object_name)
    chosen = score_answers([{"id": r["id"], "answer": r["chosen"]} for r in records], ann)
    assert chosen.metrics["chair_s"] == 0.0 and chosen.metrics["recall"] == 1.0
    assert chosen.metrics["n_mentions"] == sum(len(r["objects"]) for r in records)
    rejected = score_answers([{"id": r["id"], "answer": r["rejected"]} for r in records], ann)
    for r, scored in zip(records, rejected.per_answer):
        extra = len(scored.mentions) - len(r["objects"])   # +1: an invented object, -1: a dropped one
        assert extra in (1, -1)
        assert scored.hallucinated == (frozenset({scored.mentions[-1].category}) - scored.ground_truth if extra == 1 else frozenset())
    with pytest.raises(HallucinationDataError, match="record 0.*'colour' and 'shape'"):
        annotations_from_records([{"id": "x", "objects": [{"shape": "circle"}]}], scene_vocabulary(),
                                 object_name=scene_object_name)
