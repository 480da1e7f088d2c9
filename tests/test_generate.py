"""Answer generation (`mdpo.eval.generate`) with the tiny model of every family."""
import json

import pytest
import torch

from mdpo.data import BadRecordError, make_sample
from mdpo.errors import MdpoError
from mdpo.eval import generate as gen
from mdpo.eval.generate import (AdapterMismatchError, AnswersFileError, GenerationOptions, generate_answers,
                                generate_batch, load_generation_model, load_questions)
from mdpo.models import PRESETS, apply_lora, build_preset

FAMILIES = list(PRESETS)  # tiny-llava, tiny-qwen2-vl, tiny-qwen2.5-vl, tiny-idefics3, tiny-paligemma
GREEDY = GenerationOptions(max_new_tokens=6, batch_size=3)
SAMPLED = GenerationOptions(max_new_tokens=6, batch_size=3, temperature=1.0, top_p=0.9, seed=3)


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    make_sample(out, n=5, seed=3)
    return load_questions(out / "data.json")


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, name):
    if name not in models:
        models[name] = load_generation_model(name)
    return models[name]


def _lora(name, tmp_path, nonzero=True, seed=0):
    """A peft adapter folder for preset `name` (B drawn away from zero unless nonzero=False)."""
    loaded = build_preset(name, seed=seed)
    model = apply_lora(loaded.model, loaded.family, r=4, alpha=8, dropout=0.0)
    if nonzero:
        gen_ = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen_) * 0.5)
    folder = tmp_path / f"{name}-lora"
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", FAMILIES)
def test_left_padded_batch_gives_one_at_a_time_answers(name, models, questions):
    gm = _model(models, name)
    chunk = questions[:3]
    lengths = {len(gm.collator.encode_prompt(gen._as_record(q), gen.question_image(q))["tokens"]["input_ids"]) for q in chunk}
    assert len(lengths) > 1  # the prompts differ in length: the batch really is padded
    batched = generate_batch(gm, chunk, GREEDY, return_logprobs=True)
    singles = [generate_batch(gm, [q], GREEDY, return_logprobs=True)[0] for q in chunk]
    for b, s in zip(batched, singles):
        assert b.ids == s.ids and b.text == s.text
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(s.logprobs), atol=1e-4, rtol=0)
    # each row saw its own image: the rows' step log-probs differ (a row mix-up would show above)
    assert batched[0].logprobs != batched[1].logprobs
    # sampling: each question's draw comes from its own generator, whatever batch it is in
    sampled = generate_batch(gm, chunk, SAMPLED)
    assert [a.ids for a in sampled] == [generate_batch(gm, [q], SAMPLED)[0].ids for q in chunk]


def test_generation_is_deterministic_and_the_seed_matters(models, questions):
    gm = _model(models, "tiny-qwen2-vl")
    first = [a.ids for a in generate_batch(gm, questions, SAMPLED)]
    again = [a.ids for a in generate_batch(gm, questions, SAMPLED)]
    other = [a.ids for a in generate_batch(gm, questions, GenerationOptions(max_new_tokens=6, temperature=1.0, seed=4))]
    greedy = [a.ids for a in generate_batch(gm, questions, GREEDY)]
    assert first == again
    assert first != other and first != greedy
    assert greedy == [a.ids for a in generate_batch(gm, questions, GREEDY)]
    assert all(len(ids) <= 6 for ids in first)


def test_top_p_keeps_the_nucleus_only():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = set()
    for seed in range(200):
        sampler = gen._RowSampler([torch.Generator().manual_seed(seed)], temperature=1.0, top_p=0.7)
        out = sampler(None, scores.clone())
        assert torch.isinf(out).sum() == 3  # one token left for generate's argmax
        seen.add(int(out.argmax()))
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail (0.15, 0.05) is never drawn


@pytest.mark.parametrize("name", FAMILIES)
def test_a_nonzero_adapter_changes_the_answers_and_a_zero_one_does_not(name, models, questions, tmp_path):
    base = generate_batch(_model(models, name), questions[:2], GREEDY, return_logprobs=True)
    tuned = load_generation_model(name, adapter=_lora(name, tmp_path))
    assert tuned.kind == "adapter" and tuned.has_adapter
    changed = generate_batch(tuned, questions[:2], GREEDY, return_logprobs=True)
    assert [a.logprobs for a in changed] != [a.logprobs for a in base]
    (tmp_path / "zero").mkdir()
    untouched = generate_batch(load_generation_model(name, adapter=_lora(name, tmp_path / "zero", nonzero=False)),
                               questions[:2], GREEDY, return_logprobs=True)
    assert [a.ids for a in untouched] == [a.ids for a in base]
    torch.testing.assert_close(torch.tensor(untouched[0].logprobs), torch.tensor(base[0].logprobs), atol=1e-5, rtol=0)


def test_answers_file_resumes_without_regenerating(models, questions, tmp_path, monkeypatch):
    gm = _model(models, "tiny-llava")
    out = tmp_path / "answers.jsonl"
    options = GenerationOptions(max_new_tokens=5, batch_size=2)
    rows = generate_answers(gm, questions, out, options, progress=False)
    assert [r["id"] for r in rows] == [q.sample_id for q in questions]
    assert set(rows[0]) == set(gen.ANSWER_FIELDS)
    assert all(0 <= r["tokens"] <= 5 and r["seconds"] >= 0 for r in rows)
    whole = out.read_text()
    # an interrupted run: two rows written, the third cut short mid-line
    lines = whole.splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:10])
    calls = []
    real = gen.generate_batch
    monkeypatch.setattr(gen, "generate_batch", lambda g, qs, *a, **k: calls.append([q.sample_id for q in qs]) or real(g, qs, *a, **k))
    again = generate_answers(gm, questions, out, options, progress=False)
    assert sorted(i for c in calls for i in c) == [q.sample_id for q in questions[2:]]
    assert [(r["id"], r["answer"], r["tokens"]) for r in again] == [(r["id"], r["answer"], r["tokens"]) for r in rows]
    calls.clear()
    generate_answers(gm, questions, out, options, progress=False)  # all there: nothing generated
    assert calls == []
    with pytest.raises(AnswersFileError, match="options"):
        generate_answers(gm, questions, out, GenerationOptions(max_new_tokens=7), progress=False)


def test_blank_and_corrupted_images_are_other_inputs(models, questions, tmp_path):
    from mdpo.data import CorruptionConfig

    gm = _model(models, "tiny-llava")
    options = GenerationOptions(max_new_tokens=4)
    lp = {v: [a.logprobs for a in generate_batch(gm, questions[:2], options, return_logprobs=True,
                                                 images=[gen.question_image(q, v, CorruptionConfig()) for q in questions[:2]])]
          for v in gen.IMAGE_VARIANTS}
    assert lp["image"] != lp["blank"] and lp["image"] != lp["corrupted"]
    blank = gen.question_image(questions[0], "blank")
    assert blank.size == gen.question_image(questions[0]).size and blank.getcolors() == [(blank.size[0] ** 2, (255, 255, 255))]


def test_missing_image_and_bad_questions_are_named(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    cases = [({"id": "q1", "image": "missing.png", "question": "What?"}, "missing.png"),
             ({"id": "q2", "image": "ok.png"}, "question"),
             ({"id": "q3", "question": "What?"}, "missing image")]
    for record, needle in cases:
        path = tmp_path / f"{record['id']}.jsonl"
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(BadRecordError, match=needle) as info:
            load_questions(path)
        assert record["id"] in str(info.value) and str(path) in str(info.value)
        assert isinstance(info.value, MdpoError)


def test_an_adapter_of_another_base_model_is_refused(models, tmp_path):
    # another family, same layer names and sizes (tiny Qwen2-VL vs tiny LLaVA): its saved processor says so
    qwen = _lora("tiny-qwen2-vl", tmp_path)
    build_preset("tiny-qwen2-vl").processor.save_pretrained(qwen)
    with pytest.raises(AdapterMismatchError, match=r"qwen2-vl.*tiny-llava") as info:
        load_generation_model("tiny-llava", adapter=qwen)
    assert str(qwen) in str(info.value)
    # another family with other layer names, no processor beside it: the LoRA matrices do not fit
    idefics = _lora("tiny-idefics3", tmp_path)
    with pytest.raises(AdapterMismatchError, match="not a linear layer of the base"):
        load_generation_model("tiny-llava", adapter=idefics)
    # the same preset with other random weights: the run's config.json beside final/ says so
    run = tmp_path / "run"
    final = _lora("tiny-llava", tmp_path, seed=7).rename(run.mkdir() or run / "final")
    (run / "config.json").write_text(json.dumps({"seed": 7, "model": {"preset": "tiny-llava"}}))
    with pytest.raises(AdapterMismatchError, match="--preset-seed 7"):
        load_generation_model("tiny-llava", adapter=final)
    with pytest.raises(AdapterMismatchError, match="--model tiny-llava"):
        load_generation_model("tiny-paligemma", adapter=final)
    assert load_generation_model("tiny-llava", adapter=final, preset_seed=7).label == "run"
    with pytest.raises(AdapterMismatchError, match="neither a peft adapter"):
        load_generation_model("tiny-llava", adapter=tmp_path)


def test_a_full_fine_tuning_final_folder_is_compared_as_is(models, questions, tmp_path):
    """`--adapter <run>/final` of a full fine-tuning run: the whole model folder, loaded beside the base;
    another architecture is refused naming both."""
    from mdpo.models import save_preset

    base_dir = save_preset("tiny-llava", tmp_path / "base", seed=0)
    tuned = build_preset("tiny-llava", seed=0)
    with torch.no_grad():
        for p in tuned.model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    tuned.model.save_pretrained(tmp_path / "run" / "final")
    tuned.processor.save_pretrained(tmp_path / "run" / "final")
    base = load_generation_model(base_dir)
    full = load_generation_model(base_dir, adapter=tmp_path / "run" / "final")
    assert full.label == "run" and full.kind == "full model"
    chunk = questions[:3]
    again = load_generation_model(tmp_path / "run" / "final")  # the same folder as a base gives the same answers
    answers = [g.ids for g in generate_batch(full, chunk, GREEDY)]
    assert answers == [g.ids for g in generate_batch(again, chunk, GREEDY)]
    assert answers != [g.ids for g in generate_batch(base, chunk, GREEDY)]
    other = save_preset("tiny-qwen2-vl", tmp_path / "qwen", seed=0)
    with pytest.raises(AdapterMismatchError, match="another architecture"):
        load_generation_model(base_dir, adapter=other)
