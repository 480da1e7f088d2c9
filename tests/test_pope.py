"""POPE (mdpo/eval/pope.py): LLaVA's answer rule on hand-worked answers, the metrics on a confusion matrix
worked by hand, and POPE's question build on a small synthetic COCO file."""
import json

import pytest

from mdpo.eval.pope import (PopeDataError, build_pope_questions, co_occurrence, coco_objects_per_image,
                            load_pope_questions, parse_yes_no, pope_metrics, popular_order, score_pope,
                            write_pope_questions)


@pytest.mark.parametrize("answer, parsed", [
    ("Yes, there is a dog.", "yes"),
    ("No.", "no"),
    ("There is not a dog.", "no"),
    ("I don't see one", "yes"),          # "don't" is not "not": the reference rule says yes
    ("", "yes"),                         # an empty answer: no "no" word
    ("No, there is no dog.", "no"),      # the comma is dropped, "No" is a word
    ("Yes. But no cat.", "yes"),         # only the first sentence counts
    ("Nope", "yes"),                     # not one of "No" / "no" / "not"
    ("NO", "yes"),                       # case matters
    ("No\nThere is a dog", "yes"),       # words split on single spaces only, as the script
])
def test_llava_answer_rule(answer, parsed):
    assert parse_yes_no(answer) == parsed


def test_metrics_on_a_hand_worked_confusion_matrix():
    # 10 questions: 6 labelled yes (4 answered yes: TP 4, FN 2), 4 labelled no (1 answered yes: FP 1, TN 3)
    m = pope_metrics(tp=4, fp=1, tn=3, fn=2)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["recall"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6))  # 0.7272...
    assert m["f1"] == pytest.approx(8 / 11)
    assert m["yes_ratio"] == pytest.approx(5 / 10)
    assert pope_metrics(0, 0, 3, 2)["precision"] is None  # nothing answered yes: undefined, not 0


def test_score_pope_builds_that_matrix_from_answers(tmp_path):
    labels = ["yes"] * 6 + ["no"] * 4
    answers = ["Yes", "Yes, a dog.", "I don't see one", "yes", "No.", "There is not.",  # yes-labelled: 4 yes, 2 no
               "Yes", "No", "no, none", "No, there is not."]                            # no-labelled: 1 yes, 3 no
    path = tmp_path / "coco_pope_random.json"
    path.write_text("".join(json.dumps({"question_id": i + 1, "image": "a.jpg", "text": "Is there a dog in the image?",
                                        "label": label}) + "\n" for i, label in enumerate(labels)))
    questions = load_pope_questions(path)
    assert {q.setting for q in questions} == {"random"}  # from the file name
    scores = score_pope(questions, {str(i + 1): a for i, a in enumerate(answers)})
    assert scores["random"].metrics == pope_metrics(tp=4, fp=1, tn=3, fn=2)


def _synthetic_coco(tmp_path):
    """7 images, 6 with at least 3 objects; 'person' in 5, 'car' in 4, 'dog' in 3, 'chair' (always with a dog),
    'cat' and 'kite' in 2, 'zebra' and 'bus' in 1; image 6 (one object) is never drawn."""
    images = {1: ["person", "car", "dog"], 2: ["dog", "chair", "person"], 3: ["car", "person", "cat"],
              4: ["person", "dog", "chair", "car"], 5: ["car", "person", "kite"], 6: ["bus"],
              7: ["zebra", "bus", "kite", "cat"]}
    names = ["person", "car", "dog", "chair", "cat", "kite", "bus", "zebra"]
    data = {"images": [{"id": i, "file_name": f"img{i}.jpg"} for i in images],
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)],
            "annotations": [{"image_id": i, "category_id": names.index(o) + 1} for i, objs in images.items() for o in objs]
                           + [{"image_id": 1, "category_id": 1}]}  # a second person: listed once
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, images


def test_pope_build_follows_its_definitions(tmp_path):
    path, truth = _synthetic_coco(tmp_path)
    images = coco_objects_per_image(path)
    assert images[0]["objects"] == ["person", "car", "dog"] and images[5]["objects"] == ["bus"]
    eligible = [im for im in images if len(im["objects"]) >= 3]
    # popular: by number of images holding the object; adversarial: by co-occurrence with the object
    assert popular_order(eligible) == ["person", "car", "dog", "chair", "cat", "kite", "zebra", "bus"]
    assert co_occurrence(eligible)["dog"][:3] == ["person", "car", "chair"]  # 3, 2, 2 images: ties in first-seen order
    assert co_occurrence(eligible)["chair"] == ["dog", "person", "car"]
    for setting in ("random", "popular", "adversarial"):
        questions = build_pope_questions(images, setting, seed=3, n_images=None)
        assert len(questions) == 6 * 3 * 2 and [q["question_id"] for q in questions] == list(range(1, 37))
        assert [q["label"] for q in questions[:6]] == ["yes", "no"] * 3
        by_file = {f"img{i}.jpg": set(objs) for i, objs in truth.items()}
        for q in questions:
            name = q["text"].removeprefix("Is there a ").removeprefix("n ").removesuffix(" in the image?")
            assert (name in by_file[q["image"]]) == (q["label"] == "yes"), q  # no "no" question names an annotated object
        for start in range(0, len(questions), 6):  # never the same object twice about one image
            asked = [q["text"] for q in questions[start:start + 6]]
            assert len(set(asked)) == 6
    # popular on img1 (person, car, dog): its "no" questions name the most frequent absent objects, in order
    popular = build_pope_questions(images, "popular", n_images=None)
    assert [q["text"] for q in popular[:6] if q["label"] == "no"] == [
        f"Is there a {o} in the image?" for o in ("chair", "cat", "kite")]
    # adversarial on img2 (dog, chair, person): the "no" after dog is car, the absent object dog co-occurs with
    # most (person is present); after chair, whose list [dog, person, car] is all present or asked: a random
    # absent object; after person, whose list starts car, dog, chair (asked or present), then cat
    adversarial = build_pope_questions(images, "adversarial", n_images=None)
    img2 = [q["text"] for q in adversarial if q["image"] == "img2.jpg"]
    assert img2[:3] == ["Is there a dog in the image?", "Is there a car in the image?", "Is there a chair in the image?"]
    assert img2[4] == "Is there a person in the image?"
    assert img2[5] in {f"Is there a {o} in the image?" for o in ("cat", "kite", "zebra", "bus")}


def test_pope_build_is_seeded_and_shareable(tmp_path):
    path, _ = _synthetic_coco(tmp_path)
    images = coco_objects_per_image(path)
    a = write_pope_questions(build_pope_questions(images, "random", seed=7, n_images=None), tmp_path / "a.json")
    b = write_pope_questions(build_pope_questions(images, "random", seed=7, n_images=None), tmp_path / "b.json")
    assert a.read_bytes() == b.read_bytes()
    others = {write_pope_questions(build_pope_questions(images, "random", seed=s, n_images=None), tmp_path / f"{s}.json").read_bytes()
              for s in range(8, 14)}
    assert any(o != a.read_bytes() for o in others)  # the seed matters
    reread = load_pope_questions(a, setting="random")  # POPE's own format reads back
    assert len(reread) == 36 and reread[0].label == "yes"
    # "an" before a vowel, and the rest of the template untouched
    q = build_pope_questions([{"image": "x.jpg", "objects": ["umbrella"]}, {"image": "y.jpg", "objects": ["apple"]}],
                             "random", n_images=None, objects_per_image=1)
    assert q[0]["text"] == "Is there an umbrella in the image?" and q[1]["text"] == "Is there an apple in the image?"
    with pytest.raises(PopeDataError, match="only 6 image"):
        build_pope_questions(images, "random", n_images=7)
    assert len(build_pope_questions(images, "random", seed=1, n_images=5, objects_per_image=1)) == 10  # 5 of 6 drawn


def test_bad_question_files_are_named(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "maybe"}) + "\n")
    with pytest.raises(PopeDataError, match=r"q\.jsonl: record 0 \(question_id 1\): 'label'"):
        load_pope_questions(path)
