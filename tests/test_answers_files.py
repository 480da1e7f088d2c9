"""`--answers FILE` for CHAIR, POPE and AMBER through one reader (mdpo/eval/answers.py): no model and no
image needed; a second answer to a question is refused (CHAIR counted it twice); a file answering only
some questions is refused unless --allow-partial, and then every table says how many were scored."""
import json

import pytest

from benchmark_files import make_amber_dir, make_pope_questions
from mdpo.eval.answers import AnswersDataError
from mdpo.eval.hallucination import evaluate_hallucination
from mdpo.eval.suite import evaluate_amber, evaluate_pope
from mdpo.eval.cli import main as mdpo_eval

CHAIR_ANSWERS = [{"id": "q1", "answer": "A dog and a cat."}, {"id": "q2", "answer": "A car."},
                 {"id": "q3", "answer": "A person."}, {"id": "q4", "answer": "A bus."}]


def _write(path, rows, jsonl=True):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows))
    return path


@pytest.fixture
def chair_questions(tmp_path):
    """4 questions whose images are NOT on disk: scoring answers never reads one."""
    rows = [{"id": f"q{i}", "image": f"missing-{i}.jpg", "question": "Describe the image.", "objects": [obj]}
            for i, obj in zip(range(1, 5), ("dog", "car", "person", "bus"))]
    return _write(tmp_path / "questions.jsonl", rows)


def _chair(out, questions, answers, **kw):
    return evaluate_hallucination(out, str(questions), answers=[str(answers)], progress=False, log=lambda _: None, **kw)


def test_chair_answers_need_no_image_and_no_model(tmp_path, chair_questions):
    result = _chair(tmp_path / "o", chair_questions, _write(tmp_path / "a.jsonl", CHAIR_ANSWERS))
    metrics = result["models"]["a"]["metrics"]
    assert (metrics["n_answers"], metrics["chair_s"]) == (4, 0.25)  # one answer of 4 names a cat
    assert result["models"]["a"]["coverage"] == {"answered": 4, "expected": 4, "partial": False}


def test_a_duplicate_answer_is_refused_by_every_benchmark(tmp_path, chair_questions):
    with pytest.raises(AnswersDataError, match=r"dup\.jsonl: record 4 \(id 'q1'\): a second answer .*record 0"):
        _chair(tmp_path / "o", chair_questions, _write(tmp_path / "dup.jsonl", CHAIR_ANSWERS + [CHAIR_ANSWERS[0]]))
    questions = make_pope_questions(tmp_path)
    answers = [{"question_id": i, "text": "Yes"} for i in range(1, 13)] + [{"question_id": 5, "text": "No"}]
    with pytest.raises(AnswersDataError, match=r"record 12 \(id 5\): a second answer"):
        evaluate_pope(tmp_path / "p", questions_files=[str(questions)], answers=[str(_write(tmp_path / "p.jsonl", answers))],
                      log=lambda _: None)
    amber = make_amber_dir(tmp_path / "amber")
    responses = [{"id": i, "response": "Yes"} for i in range(1, 10)] + [{"id": 9, "response": "No"}]
    with pytest.raises(AnswersDataError, match=r"record 9 \(id 9\): a second answer"):
        evaluate_amber(tmp_path / "a", str(amber), answers=[str(_write(tmp_path / "r.json", responses, jsonl=False))],
                       log=lambda _: None)
    # the command line: one line, exit code 2
    code = mdpo_eval(["pope", "--questions", str(questions), "--answers", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "c")])
    assert code == 2


def test_a_partial_file_needs_allow_partial_and_then_says_so(tmp_path, chair_questions, capsys):
    partial = _write(tmp_path / "part.jsonl", CHAIR_ANSWERS[:3])
    with pytest.raises(AnswersDataError, match=r"answers 3 of the 4 questions .*'q4'.*--allow-partial"):
        _chair(tmp_path / "o", chair_questions, partial)
    result = _chair(tmp_path / "o", chair_questions, partial, allow_partial=True)
    assert result["models"]["part"]["coverage"] == {"answered": 3, "expected": 4, "partial": True}
    assert result["models"]["part"]["metrics"]["chair_s"] == pytest.approx(1 / 3)
    assert "part: 3 of 4 questions answered" in (tmp_path / "o" / "table.md").read_text()

    questions = make_pope_questions(tmp_path)
    answers = _write(tmp_path / "pope.jsonl", [{"question_id": i, "text": "No"} for i in range(1, 11)])  # 10 of 12
    with pytest.raises(AnswersDataError, match="answers 10 of the 12"):
        evaluate_pope(tmp_path / "p", questions_files=[str(questions)], answers=[str(answers)], log=lambda _: None)
    result = evaluate_pope(tmp_path / "p", questions_files=[str(questions)], answers=[str(answers)], allow_partial=True,
                           log=lambda _: None)
    scored = result["models"]["pope"]["settings"]["random"]
    assert (scored["n"], scored["expected"], scored["tn"], scored["fn"]) == (10, 12, 5, 5)
    table = (tmp_path / "p" / "table.md").read_text()
    assert "| 10 of 12 |" in table and "pope: 10 of 12 questions answered" in table

    amber = make_amber_dir(tmp_path / "amber")
    responses = _write(tmp_path / "resp.json", [{"id": 1, "response": "A dog."}, {"id": 3, "response": "Yes"}], jsonl=False)
    code = mdpo_eval(["amber", "--amber-dir", str(amber), "--answers", str(responses), "--out", str(tmp_path / "a")])
    assert code == 2 and "--allow-partial" in capsys.readouterr().err
    code = mdpo_eval(["amber", "--amber-dir", str(amber), "--answers", str(responses), "--allow-partial", "--out", str(tmp_path / "a")])
    assert code == 0
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["models"]["resp"]["coverage"] == {"answered": 2, "expected": 9, "partial": True}
    assert metrics["generative_label"] == "without vector synonyms"
    table = (tmp_path / "a" / "table.md").read_text()
    assert "resp: 2 of 9 questions answered" in table and "without vector synonyms" in table
    assert json.loads((tmp_path / "a" / "resp" / "responses.json").read_text()) == [
        {"id": 1, "response": "A dog."}, {"id": 3, "response": "Yes"}]


def test_unknown_ids_and_bad_records_are_named(tmp_path, chair_questions):
    with pytest.raises(AnswersDataError, match=r"record 0 \(id 'q9'\): no question with this id"):
        _chair(tmp_path / "o", chair_questions, _write(tmp_path / "x.jsonl", [{"id": "q9", "answer": "A dog."}]))
    with pytest.raises(AnswersDataError, match=r"record 0 \(id 'q1'\): the answer \('answer'\) must be a string"):
        _chair(tmp_path / "o", chair_questions, _write(tmp_path / "y.jsonl", [{"id": "q1", "answer": 3}]))
