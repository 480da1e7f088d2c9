"""`mdpo-eval hallucination` (mdpo.eval.hallucination) on the synthetic scenes, a tiny LLaVA and a
LoRA adapter trained for two steps; COCO-style annotations; answers written elsewhere."""
import json
from pathlib import Path

import pytest

from mdpo.config import load_config
from mdpo.data import make_sample
from mdpo.errors import MdpoError
from mdpo.eval.chair import HallucinationDataError
from mdpo.eval.generate import GenerationOptions, load_generation_model, generate_batch, load_questions
from mdpo.eval.hallucination import HallucinationEvalError, evaluate_hallucination
from mdpo.eval.cli import main as mdpo_eval
from mdpo.train import train

OPTIONS = GenerationOptions(max_new_tokens=8, batch_size=4)


def _train(root: Path, name: str, *overrides: str) -> None:
    train(load_config(None, [
        f"output_dir={root / name}", f"data.path={root / 'scenes' / 'data.json'}",
        f"data.eval_path={root / 'scenes' / 'eval.json'}", "data.max_length=256", "model.preset=tiny-llava",
        "model.lora_r=4", "model.lora_alpha=8", "seed=0", "epochs=1", "max_steps=2", "micro_batch_size=2",
        "effective_batch_size=4", "lr=0.01", "save_every=1", "tensorboard=false", "plots=false", "progress_bar=false",
        *overrides,
    ]))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step mDPO run of tiny-llava (seed 0) on 8 scenes with 4 held-out ones: final/ and step-2;
    CHAIR of generated held-out answers logged at every evaluation (eval_generate_every=1)."""
    root = tmp_path_factory.mktemp("hal")
    make_sample(root / "scenes", n=8, seed=11, n_eval=4)
    _train(root, "run", "eval_every=1", "eval_generate_every=1")
    return root


def test_eval_generate_every_logs_chair_and_changes_nothing_else(run):
    rows = [json.loads(line) for line in (run / "run" / "eval_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert 0 <= r["generate/recall"] <= 1 and 0 <= r["generate/chair_s"] <= 1 and r["generate/tokens_per_answer"] <= 32
    assert rows[0]["generate/tokens_per_answer"] != rows[-1]["generate/tokens_per_answer"]  # the policy, not the base
    # the same run without it: the same losses, bit for bit (greedy generation draws no random number)
    _train(run, "plain", "eval_every=1")
    losses = lambda name: [json.loads(line) for line in (run / name / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["loss/total"] for r in losses("run")] == [r["loss/total"] for r in losses("plain")]
    plain = [json.loads(line) for line in (run / "plain" / "eval_metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if not k.startswith("generate/")} for r in rows] == plain


def _external_answers(root: Path) -> Path:
    """Answers 'from another tool' keyed by id: one names a shape the scene lacks, one a shape it has."""
    records = json.loads((root / "scenes" / "eval.json").read_text())
    absent = next(s for s in ("circle", "square", "triangle") if s not in {o["shape"] for o in records[0]["objects"]})
    present = records[1]["objects"][0]["shape"]
    path = root / "elsewhere.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": records[0]["id"], "answer": f"I see a {absent} here."},
        {"id": records[1]["id"], "answer": f"Two {present}s."},
    ]) + "\n")
    return path


def _run(root, out, **kwargs):
    return evaluate_hallucination(out, str(root / "scenes" / "eval.json"), model="tiny-llava",
                                  adapters=[str(root / "run" / "final")], answers=[str(_external_answers(root))],
                                  allow_partial=True, options=OPTIONS, progress=False, log=lambda _: None, **kwargs)


def test_whole_run_is_reproduced_bit_for_bit(run, tmp_path):
    first = _run(run, tmp_path / "a")
    second = _run(run, tmp_path / "b")
    assert (tmp_path / "a" / "metrics.json").read_bytes() == (tmp_path / "b" / "metrics.json").read_bytes()
    assert (tmp_path / "a" / "table.md").read_text() == (tmp_path / "b" / "table.md").read_text()
    assert first == second
    assert list(first["models"]) == ["elsewhere", "base", "run"]
    for name in ("chair.png", "table.md", "timing.json", "base/answers.jsonl", "run/answers.jsonl", "elsewhere/answers.jsonl"):
        assert (tmp_path / "a" / name).is_file(), name
    base, tuned = first["models"]["base"], first["models"]["run"]
    assert base["metrics"]["n_answers"] == tuned["metrics"]["n_answers"] == 4
    assert base["metrics"]["tokens_per_answer"] <= 8
    for entry in (base, tuned):
        for variant in ("blank", "corrupted"):
            assert 0 <= entry["reliance"][variant]["answer_changed"] <= 1
    assert "preference" not in base  # the base is its own reference: nothing to measure
    # the held-out figures are the training run's last evaluation (same pairs, same weights, live reference)
    last = json.loads((run / "run" / "eval_metrics.jsonl").read_text().splitlines()[-1])
    for key in ("rewards/conditional_margins", "rewards/margins", "rewards/conditional_accuracies"):
        assert tuned["preference"][key] == pytest.approx(last[key], abs=1e-5), key
    assert tuned["preference"]["rewards/conditional_margins"] != 0
    table = (tmp_path / "a" / "table.md").read_text()
    assert "| base |" in table and "| run |" in table and "Image reliance" in table and "conditional margin" in table


def test_answers_from_elsewhere_are_scored_and_marked(run, tmp_path):
    result = evaluate_hallucination(tmp_path, str(run / "scenes" / "eval.json"), answers=[str(_external_answers(run))],
                                    allow_partial=True, progress=False, log=lambda _: None)
    metrics = result["models"]["elsewhere"]["metrics"]
    # answer 1: one hallucinated mention; answer 2: one correct mention, written "Ns"
    assert (metrics["n_mentions"], metrics["n_hallucinated_mentions"], metrics["chair_s"]) == (2, 1, 0.5)
    rows = [json.loads(line) for line in (tmp_path / "elsewhere" / "answers.jsonl").read_text().splitlines()]
    assert "[[" in rows[0]["marked_answer"] and "[[" not in rows[1]["marked_answer"]
    assert rows[0]["hallucinated"] and not rows[1]["hallucinated"]


def test_a_checkpoint_answers_like_the_final_adapter_of_the_same_step(run):
    questions = load_questions(run / "scenes" / "eval.json")
    final = load_generation_model("tiny-llava", adapter=run / "run" / "final")
    step = load_generation_model("tiny-llava", adapter=run / "run" / "checkpoints" / "step-000002")
    base = load_generation_model("tiny-llava")
    assert step.kind == "checkpoint" and step.label.endswith("step-000002")
    a, b, c = (generate_batch(m, questions, OPTIONS, return_logprobs=True) for m in (final, step, base))
    assert [x.ids for x in a] == [x.ids for x in b]
    flat = lambda answers: [v for x in answers for v in x.logprobs]  # noqa: E731
    assert flat(a) == pytest.approx(flat(b), abs=1e-5)
    assert flat(a) != flat(c)  # two steps at lr 1e-2 moved the model


def _coco(root: Path):
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 32), (200, 10, 10)).save(root / name)
    instances = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
                 "categories": [{"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}],
                 "annotations": [{"image_id": 1, "category_id": 18}, {"image_id": 2, "category_id": 17}]}
    (root / "instances.json").write_text(json.dumps(instances))
    return root / "instances.json"


def test_coco_annotations_by_image_id_or_file_name(tmp_path):
    instances = _coco(tmp_path)
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"id": "q1", "image_id": 1, "image": "a.png", "question": "Describe the image."}) + "\n"
                         + json.dumps({"id": "q2", "image": "b.png", "question": "Describe the image."}) + "\n")
    answers = tmp_path / "lmms.jsonl"
    answers.write_text(json.dumps({"image_id": 1, "answer": "A dog and a cat."}) + "\n")
    result = evaluate_hallucination(tmp_path / "out", str(questions), model="tiny-llava", answers=[str(answers)],
                                    coco_annotations=str(instances), image_root=str(tmp_path), reliance=False,
                                    allow_partial=True, options=GenerationOptions(max_new_tokens=4), progress=False,
                                    log=lambda _: None)
    assert result["vocabulary"] == "coco" and result["models"]["base"]["metrics"]["n_answers"] == 2
    scored = result["models"]["lmms"]["metrics"]
    assert (scored["n_mentions"], scored["n_hallucinated_mentions"], scored["recall"]) == (2, 1, 1.0)
    # a question whose image has no annotation: named before anything is generated
    questions.write_text(json.dumps({"id": "q3", "image_id": 3, "image": "a.png", "question": "Describe."}) + "\n")
    with pytest.raises(HallucinationDataError, match=r"q3.*a\.png.*image_id 3.*instances\.json"):
        evaluate_hallucination(tmp_path / "out2", str(questions), model="no-such-model", coco_annotations=str(instances),
                               image_root=str(tmp_path), progress=False, log=lambda _: None)


def test_bad_input_is_named(run, tmp_path):
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "r7", "image": "x.png", "question": "What?", "objects": ["dog", "unicorn"]}) + "\n")
    with pytest.raises(HallucinationDataError, match=r"r7.*unknown object category 'unicorn'"):
        evaluate_hallucination(tmp_path / "o", str(bad), model="tiny-llava", progress=False, log=lambda _: None)
    with pytest.raises(HallucinationEvalError, match="--adapter needs --model"):
        evaluate_hallucination(tmp_path / "o", str(bad), adapters=[str(run / "run" / "final")], progress=False)
    with pytest.raises(MdpoError, match="missing.png"):
        (tmp_path / "m.jsonl").write_text(json.dumps({"id": "m1", "image": "missing.png", "question": "What?"}) + "\n")
        evaluate_hallucination(tmp_path / "o", str(tmp_path / "m.jsonl"), model="tiny-llava", progress=False)


def test_command_line_subcommands_and_the_old_form(run, tmp_path, capsys):
    data = str(run / "scenes" / "eval.json")
    ckpt = str(run / "run" / "checkpoints" / "step-000002")
    code = mdpo_eval(["hallucination", "--model", "tiny-llava", "--adapter", ckpt, "--data", data, "--out",
                      str(tmp_path / "h"), "--max-new-tokens", "6", "--no-reliance", "--no-progress"])
    assert code == 0 and "| run_step-000002 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "h" / "metrics.json").read_text())["models"]["run_step-000002"]["kind"] == "checkpoint"
    # the preference scoring keeps its old form, and `preference` names it
    assert mdpo_eval([ckpt, "--data", data, "--out", str(tmp_path / "p1.json")]) == 0
    assert mdpo_eval(["preference", ckpt, "--data", data, "--out", str(tmp_path / "p2.json")]) == 0
    assert json.loads((tmp_path / "p1.json").read_text()) == json.loads((tmp_path / "p2.json").read_text())
    # an adapter of another base model: one line naming it, exit code 2
    code = mdpo_eval(["hallucination", "--model", "tiny-qwen2-vl", "--adapter", str(run / "run" / "final"),
                      "--data", data, "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "final" in err and "--model tiny-llava" in err
