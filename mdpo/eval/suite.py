"""`mdpo-eval pope`, `mdpo-eval amber` and `mdpo-eval suite`: the field's hallucination benchmarks for a
base model and its adapters side by side, or for answers written elsewhere.

    mdpo-eval pope --questions coco_pope_random.json --questions coco_pope_popular.json \\
        --image-root val2014 --model M --adapter A --out out/pope
    mdpo-eval pope --coco-annotations instances_val2014.json --setting adversarial --out out/pope   # build only
    mdpo-eval pope --questions coco_pope_random.json --answers answers.jsonl --out out/pope           # no model
    mdpo-eval amber --amber-dir AMBER --image-root AMBER/image --model M --adapter A --out out/amber
    mdpo-eval suite --chair eval.json --pope coco_pope_random.json --amber AMBER --model M --out out/all

Every benchmark writes OUT/metrics.json (no timings: a second run writes the same file), OUT/table.md,
OUT/<benchmark>.png, OUT/<model>/... (the answers, in the benchmark's own format, and the raw
generations under generated/, kept for resuming) and OUT/timing.json. The suite runs each benchmark
into OUT/<benchmark>/ and writes OUT/table.md and OUT/metrics.json with one row per model over all
of them. Scoring is `pope.py` / `amber.py` / `chair.py`; answers files are read by `answers.py`.

Generation: batched, greedy by default, resumable (`generate.generate_answers`), shared over the
processes of `torchrun --nproc_per_node N -m mdpo.eval pope ...` or `accelerate launch -m
mdpo.eval pope ...` (each its share, gathered in question order, rank 0 writes). Yes/no questions
use `--yes-no-max-new-tokens` (default 10: the parser reads the first sentence), descriptions
`--max-new-tokens`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..errors import MdpoError
from .generate import GenerationOptions, Question, generate_answers, load_generation_model, resolve_processes, throughput

YES_NO_MAX_NEW_TOKENS = 10


class SuiteArgumentError(MdpoError, ValueError):
    """Arguments of `mdpo-eval pope / amber / suite` that cannot be used together; the message names them."""


# ------------------------------------------------------------------------------------- shared
def _questions(items: Sequence[tuple[str, str, str]], image_root: str | os.PathLike, suffix: str = "") -> list[Question]:
    """generate.Question objects from (id, image file, text); `suffix` appended on a new line."""
    text = (lambda t: f"{t}\n{suffix}") if suffix else (lambda t: t)
    return [Question(i, sid, image, image if os.path.isabs(image) else os.path.join(str(image_root), image), text(t))
            for i, (sid, image, t) in enumerate(items)]


def check_question_images(questions: Sequence[Question], source: str) -> None:
    """Every image a model will be asked about exists and decodes; checked before any model loads.
    Each file is checked once (POPE asks 6 questions per image)."""
    from ..data.records import _Reason, check_image_file

    seen: set[str] = set()
    for q in questions:
        if q.image_path in seen:
            continue
        try:
            check_image_file(q.image_path)
        except _Reason as reason:
            raise SuiteArgumentError(f"{source}: question {q.sample_id!r}: {reason} (--image-root names the image folder)") from None
        seen.add(q.image_path)


def each_model(model: str | None, adapters: Sequence[str], *, preset_seed: int, device, dtype, taken: set[str],
               log: Callable[[str], None]) -> Iterator[tuple[str, Any]]:
    """(label, GenerationModel) for the base, then each adapter, as `mdpo-eval hallucination` loads them:
    the first adapter's run config renders every model's prompts, labels unique. Delete the model at
    the end of the loop body, so that two are never held at once."""
    from .hallucination import _unique, run_config_of

    if model is None and adapters:
        raise SuiteArgumentError("--adapter needs --model (the base model the adapters were trained on)")
    prompt_source = next((a for a in adapters if run_config_of(a) is not None), None)
    prompt_config = run_config_of(prompt_source) if prompt_source is not None else None
    for adapter in ([None] if model is not None else []) + list(adapters):
        gm = load_generation_model(model, adapter, device=device, dtype=dtype, preset_seed=preset_seed,
                                   prompt_config=prompt_config)
        label = _unique("base" if adapter is None else gm.label, taken)
        log(f"{label}: {gm.source} ({gm.kind}, {gm.family}, {gm.device})")
        yield label, gm
        del gm


def answers_label(path: str, taken: set[str]) -> str:
    """A table label for an answers file: its stem, or its folder's name for a file called answers.*."""
    from .hallucination import _unique

    p = Path(path)
    stem = p.stem
    return _unique(p.parent.name if stem in ("answers", "responses") and p.parent.name else stem, taken)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ------------------------------------------------------------------------------------------ POPE
def pope_question_sets(questions_files: Sequence[str] = (), coco_annotations: str | None = None,
                       settings: Sequence[str] = (), *, seed: int = 0, n_images: int | None = 500,
                       objects_per_image: int = 3) -> dict[str, dict[str, Any]]:
    """{set name: {"questions": [PopeQuestion], "source": ..., "records": POPE-format dicts or None}}:
    each --questions file (split by its "category" when it has several), or each built setting."""
    from . import pope

    if bool(questions_files) == bool(coco_annotations):
        raise SuiteArgumentError("give POPE questions with --questions FILE or build them with --coco-annotations FILE "
                                 "--setting random|popular|adversarial (one of the two)")
    sets: dict[str, dict[str, Any]] = {}
    if coco_annotations:
        if not settings:
            raise SuiteArgumentError("--coco-annotations needs --setting random|popular|adversarial (repeat it, or 'all')")
        chosen = list(pope.POPE_SETTINGS) if "all" in settings else list(dict.fromkeys(settings))
        images = pope.coco_objects_per_image(coco_annotations)
        for setting in chosen:
            records = pope.build_pope_questions(images, setting, seed=seed, n_images=n_images,
                                                objects_per_image=objects_per_image)
            questions = [pope.PopeQuestion(r["question_id"], r["image"], r["text"], r["label"], setting) for r in records]
            sets[setting] = {"questions": questions, "records": records,
                             "source": f"built from {coco_annotations} (seed {seed}, {n_images or 'all'} images, "
                                       f"{objects_per_image} objects each)"}
        return sets
    for path in questions_files:
        for q in pope.load_pope_questions(path):
            entry = sets.setdefault(q.setting, {"questions": [], "records": None, "source": str(path)})
            if entry["source"] != str(path):
                raise SuiteArgumentError(f"{path}: its setting {q.setting!r} is also that of {entry['source']}; "
                                         "give each setting once")
            entry["questions"].append(q)
    return sets


def evaluate_pope(
    out_dir: str | os.PathLike,
    *,
    questions_files: Sequence[str] = (),
    coco_annotations: str | None = None,
    settings: Sequence[str] = (),
    seed: int = 0,
    n_images: int | None = 500,
    objects_per_image: int = 3,
    image_root: str | None = None,
    model: str | None = None,
    adapters: Sequence[str] = (),
    answers: Sequence[str] = (),
    allow_partial: bool = False,
    options: GenerationOptions = GenerationOptions(max_new_tokens=YES_NO_MAX_NEW_TOKENS),
    prompt_suffix: str = "",
    preset_seed: int = 0,
    device=None,
    dtype: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """POPE for each model and answers file (module docstring). -> metrics.json's dict. Without a model
    or answers, only the built question files are written (OUT/questions/coco_pope_<setting>.json).
    `options.max_new_tokens` is the yes/no answer length."""
    from . import pope
    from .answers import coverage_note, read_answers_file

    main = resolve_processes()[0] == 0
    out = Path(out_dir)
    sets = pope_question_sets(questions_files, coco_annotations, settings, seed=seed, n_images=n_images,
                              objects_per_image=objects_per_image)
    if main:
        for name, entry in sets.items():
            if entry["records"] is not None:
                pope.write_pope_questions(entry["records"], out / "questions" / f"coco_pope_{name}.json")
    if model is None and not answers:
        if adapters:
            raise SuiteArgumentError("--adapter needs --model (the base model the adapters were trained on)")
        if not coco_annotations:
            raise SuiteArgumentError("nothing to evaluate: give --model (and --adapter ...) or --answers FILE")
        log(f"POPE questions written to {out / 'questions'} (no --model or --answers: nothing scored)")
        return {"benchmark": "pope", "question_sets": _set_summary(sets), "models": {}}
    all_questions = [q for entry in sets.values() for q in entry["questions"]]
    root = image_root or (Path(questions_files[0]).parent if questions_files else ".")
    results: dict[str, dict] = {}
    timing: dict[str, dict] = {}
    taken: set[str] = set()

    for path in answers:
        keys = [q.key for q in all_questions]
        if len(set(keys)) != len(keys):
            raise SuiteArgumentError("the question sets repeat question ids, so one --answers file cannot say which set an "
                                     "answer belongs to: score each set in its own call (or use a file with unique ids)")
        answer_set = read_answers_file(path, expected_ids=keys, id_keys=("question_id",), text_keys=("text", "answer"),
                                       allow_partial=allow_partial, questions_source=", ".join(e["source"] for e in sets.values()))
        label = answers_label(path, taken)
        results[label] = {"kind": "answers", "source": str(path), "coverage": answer_set.coverage(),
                          **_pope_entry(sets, answer_set.texts)}

    if model is not None:
        items = {name: _questions([(q.key, q.image, q.text) for q in e["questions"]], root, prompt_suffix)
                 for name, e in sets.items()}
        check_question_images([q for qs in items.values() for q in qs], ", ".join(e["source"] for e in sets.values()))
    for label, gm in each_model(model, adapters, preset_seed=preset_seed, device=device, dtype=dtype, taken=taken, log=log):
        texts: dict[str, dict[str, str]] = {}
        timing[label] = {}
        for name, questions in items.items():
            rows = generate_answers(gm, questions, out / label / "generated" / f"{name}.jsonl", options,
                                    progress=progress, desc=f"{label}: POPE {name}")
            texts[name] = {r["id"]: r["answer"] for r in rows}
            timing[label][name] = throughput(rows)
        scores = {}
        for name, e in sets.items():  # set by set: question ids may repeat across POPE's files
            scores.update(_pope_entry({name: e}, texts[name])["settings"])
        results[label] = {"kind": gm.kind, "source": gm.source, "family": gm.family, "settings": scores,
                          "average": _pope_average(scores)}
        if main:  # LLaVA's answer format (+ the parsed answer and the label): `--answers` scores it again
            for name, e in sets.items():
                _jsonl(out / label / f"answers-{name}.jsonl",
                       [{"question_id": q.question_id, "prompt": asked.question, "text": texts[name][q.key],
                         "parsed": pope.parse_yes_no(texts[name][q.key]), "label": q.label}
                        for q, asked in zip(e["questions"], items[name])])
        del gm
    summary = {"benchmark": "pope", "question_sets": _set_summary(sets), "prompt_suffix": prompt_suffix,
               "options": dataclasses.asdict(options), "answer_rule": "llava/eval/eval_pope.py", "models": results}
    summary = json.loads(json.dumps(summary))
    if main:
        _write_json(out / "metrics.json", summary)
        notes = [coverage_note(n, m.get("coverage")) for n, m in results.items()]
        counts = ", ".join(f"{n}: {len(e['questions'])} questions" for n, e in sets.items())
        (out / "table.md").write_text(f"POPE ({counts}; percentages, \"yes\" the positive class)\n\n" + pope.format_pope_table(results)
                                      + "".join(f"\nPartial: {n}\n" for n in notes if n))
        pope.plot_pope(results, out / "pope.png")
        _write_json(out / "timing.json", timing)
    return summary


def _set_summary(sets) -> dict:
    return {name: {"source": e["source"], "questions": len(e["questions"]),
                   "yes": sum(q.label == "yes" for q in e["questions"])} for name, e in sets.items()}


def _pope_entry(sets, texts: dict[str, str]) -> dict:
    """{"settings": {set: metrics + expected}} of the answered questions, and their average."""
    from . import pope

    settings = {}
    for name, e in sets.items():
        scores = pope.score_pope([dataclasses.replace(q, setting=name) for q in e["questions"]], texts)
        metrics = scores[name].metrics if name in scores else pope.pope_metrics(0, 0, 0, 0)
        settings[name] = {**metrics, "expected": len(e["questions"])}
    return {"settings": settings, "average": _pope_average(settings)}


def _pope_average(settings: dict) -> dict:
    """Mean accuracy and F1 over the settings (None when one is undefined)."""
    out = {}
    for key in ("accuracy", "f1"):
        values = [m[key] for m in settings.values()]
        out[key] = None if not values or any(v is None for v in values) else sum(values) / len(values)
    return out


# ----------------------------------------------------------------------------------------- AMBER
def evaluate_amber(
    out_dir: str | os.PathLike,
    amber_dir: str,
    *,
    task: str = "all",
    image_root: str | None = None,
    model: str | None = None,
    adapters: Sequence[str] = (),
    answers: Sequence[str] = (),
    allow_partial: bool = False,
    options: GenerationOptions = GenerationOptions(),
    yes_no_max_new_tokens: int = YES_NO_MAX_NEW_TOKENS,
    prompt_suffix: str = "",
    preset_seed: int = 0,
    device=None,
    dtype: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """AMBER for each model and answers file (module docstring). -> metrics.json's dict.
    `options.max_new_tokens` is the description length; yes/no questions get `yes_no_max_new_tokens`
    and `prompt_suffix` (e.g. LLaVA's "Answer the question using a single word or phrase.")."""
    from . import amber
    from .answers import coverage_note, read_answers_file

    if model is None and not answers:
        raise SuiteArgumentError("nothing to evaluate: give --model (and --adapter ...) or --answers FILE")
    main = resolve_processes()[0] == 0
    out = Path(out_dir)
    data = amber.load_amber(amber_dir, task)
    tools = amber.text_tools()
    if tools.label:
        log(f"AMBER generative scores {tools.label}: nouns by {tools.nouns_by}, synonyms by {tools.synonyms_by}")
    query_file = str(data.root / "query" / amber.AMBER_TASKS[task])
    results: dict[str, dict] = {}
    timing: dict[str, dict] = {}
    responses: dict[str, list] = {}
    scored: dict[str, list] = {}
    taken: set[str] = set()
    for path in answers:
        answer_set = read_answers_file(path, expected_ids=[q.id for q in data.queries], id_keys=("id",),
                                       text_keys=("response",), allow_partial=allow_partial, questions_source=query_file)
        report = amber.score_amber(data, answer_set.texts, tools)
        label = answers_label(path, taken)
        results[label] = {"kind": "answers", "source": str(path), "coverage": answer_set.coverage(), **report.to_dict()}
        responses[label], scored[label] = report.responses, report.per_answer
    if model is not None:
        root = image_root or str(data.root.parent / "image")
        gen_q = _questions([(str(q.id), q.image, q.query) for q in data.queries if q.generative], root)
        yn_q = _questions([(str(q.id), q.image, q.query) for q in data.queries if not q.generative], root, prompt_suffix)
        check_question_images(gen_q + yn_q, query_file)
        yn_options = dataclasses.replace(options, max_new_tokens=yes_no_max_new_tokens)
    for label, gm in each_model(model, adapters, preset_seed=preset_seed, device=device, dtype=dtype, taken=taken, log=log):
        texts, timing[label] = {}, {}
        for kind, questions, opts in (("generative", gen_q, options), ("discriminative", yn_q, yn_options)):
            if questions:
                rows = generate_answers(gm, questions, out / label / "generated" / f"{kind}.jsonl", opts,
                                        progress=progress, desc=f"{label}: AMBER {kind}")
                texts.update({r["id"]: r["answer"] for r in rows})
                timing[label][kind] = throughput(rows)
        report = amber.score_amber(data, texts, tools)
        results[label] = {"kind": gm.kind, "source": gm.source, "family": gm.family, **report.to_dict()}
        responses[label] = report.responses
        scored[label] = report.per_answer
        del gm
    summary = {"benchmark": "amber", "amber_dir": str(amber_dir), "task": task, "queries": len(data.queries),
               "prompt_suffix": prompt_suffix, "options": dataclasses.asdict(options),
               "yes_no_max_new_tokens": yes_no_max_new_tokens, "scored_as": "AMBER inference.py",
               "generative_label": tools.label, "models": results}
    summary = json.loads(json.dumps(summary))
    if main:
        for label in results:  # AMBER's format, yes/no normalised: its inference.py reads it as it is
            (out / label).mkdir(parents=True, exist_ok=True)
            (out / label / "responses.json").write_text(json.dumps(responses[label], indent=1) + "\n")
            _jsonl(out / label / "scored.jsonl", scored[label])
        _write_json(out / "metrics.json", summary)
        notes = [coverage_note(n, m.get("coverage")) for n, m in results.items()]
        (out / "table.md").write_text(f"AMBER, task {task} ({len(data.queries)} queries; inference.py's figures, %)\n\n"
                                      + amber.format_amber_table(results) + "".join(f"\nPartial: {n}\n" for n in notes if n))
        amber.plot_amber(results, out / "amber.png")
        _write_json(out / "timing.json", timing)
    return summary


# ----------------------------------------------------------------------------------------- suite
SUITE_COLUMNS = (  # (benchmark, metrics.json key, path into the benchmark's model entry, table header, table path)
    ("chair", "chair_s", ("metrics", "chair_s"), "CHAIR_s ↓", None),
    ("chair", "chair_i", ("metrics", "chair_i"), "CHAIR_i ↓", None),
    ("chair", "recall", ("metrics", "recall"), "recall ↑", None),
    ("pope", "accuracy", ("average", "accuracy"), "POPE acc ↑", None),
    ("pope", "f1", ("average", "f1"), "POPE F1 ↑", None),
    ("amber", "chair", ("generative", "chair"), "AMBER CHAIR ↓", ("generative", "printed", "chair")),
    ("amber", "cover", ("generative", "cover"), "Cover ↑", ("generative", "printed", "cover")),
    ("amber", "hal", ("generative", "hal"), "Hal ↓", ("generative", "printed", "hal")),
    ("amber", "cog", ("generative", "cog"), "Cog ↓", ("generative", "printed", "cog")),
    ("amber", "accuracy", ("discriminative", "discriminative", "accuracy"), "AMBER acc ↑",
     ("discriminative", "discriminative", "printed", "accuracy")),
    ("amber", "f1", ("discriminative", "discriminative", "f1"), "AMBER F1 ↑", ("discriminative", "discriminative", "printed", "f1")),
)


def _dig(entry, path):
    for key in path:
        if not isinstance(entry, dict) or key not in entry:
            return None
        entry = entry[key]
    return entry


def format_suite_table(summaries: dict[str, dict]) -> str:
    """One row per model over every benchmark that ran (percentages; POPE averaged over its settings)."""
    ran = [c for c in SUITE_COLUMNS if c[0] in summaries]
    names = list(dict.fromkeys(n for s in summaries.values() for n in s["models"]))
    header = "| model | " + " | ".join(c[3] for c in ran) + " |"
    rows = [header, "|---|" + "|".join("---:" for _ in ran) + "|"]
    for name in names:
        cells = []
        for bench, _, path, _, printed in ran:  # AMBER: its script's printed percentages
            entry = summaries[bench]["models"].get(name)
            v = _dig(entry, printed or path)
            cells.append("—" if entry is None else "n/a" if v is None else f"{v:.1f}" if printed else f"{100 * v:.1f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = []
    if "pope" in summaries:
        notes.append("POPE: mean over " + ", ".join(summaries["pope"]["question_sets"]) + " (per setting: pope/table.md)")
    if summaries.get("amber", {}).get("generative_label"):
        from .amber import WITHOUT_VECTORS

        notes.append(f"AMBER generative figures {WITHOUT_VECTORS} (README); discriminative as AMBER's script")
    return "\n".join(rows) + "\n" + "".join(f"\n{n}" for n in notes) + ("\n" if notes else "")


def evaluate_suite(out_dir: str | os.PathLike, *, chair_data: str | None = None, chair_coco: str | None = None,
                   chair_image_root: str | None = None, pope_questions: Sequence[str] = (), pope_coco: str | None = None,
                   pope_settings: Sequence[str] = (), pope_image_root: str | None = None, amber_dir: str | None = None,
                   amber_task: str = "all", amber_image_root: str | None = None, model: str | None = None,
                   adapters: Sequence[str] = (), options: GenerationOptions = GenerationOptions(),
                   yes_no_max_new_tokens: int = YES_NO_MAX_NEW_TOKENS, prompt_suffix: str = "", seed: int = 0,
                   preset_seed: int = 0, device=None, dtype: str | None = None, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict:
    """Each asked benchmark into OUT/<benchmark>/ (CHAIR without the image-reliance and preference runs of
    `mdpo-eval hallucination`), then OUT/table.md and OUT/metrics.json over all. Each benchmark loads
    the models itself (one at a time)."""
    from .hallucination import evaluate_hallucination

    if model is None:
        raise SuiteArgumentError("mdpo-eval suite needs --model (answers files are scored by mdpo-eval pope / amber / hallucination)")
    if not (chair_data or pope_questions or pope_coco or amber_dir):
        raise SuiteArgumentError("mdpo-eval suite: name at least one benchmark (--chair, --pope / --pope-coco, --amber)")
    out = Path(out_dir)
    common = dict(model=model, adapters=adapters, preset_seed=preset_seed, device=device, dtype=dtype,
                  progress=progress, log=log)
    summaries: dict[str, dict] = {}
    if chair_data:
        summaries["chair"] = evaluate_hallucination(out / "chair", chair_data, coco_annotations=chair_coco,
                                                    image_root=chair_image_root, options=options, reliance=False,
                                                    preference=False, **common)
    if pope_questions or pope_coco:
        summaries["pope"] = evaluate_pope(out / "pope", questions_files=pope_questions, coco_annotations=pope_coco,
                                          settings=pope_settings or (["all"] if pope_coco else []), seed=seed,
                                          image_root=pope_image_root, prompt_suffix=prompt_suffix,
                                          options=dataclasses.replace(options, max_new_tokens=yes_no_max_new_tokens), **common)
    if amber_dir:
        summaries["amber"] = evaluate_amber(out / "amber", amber_dir, task=amber_task, image_root=amber_image_root,
                                            options=options, yes_no_max_new_tokens=yes_no_max_new_tokens,
                                            prompt_suffix=prompt_suffix, **common)
    combined = {"benchmarks": list(summaries), "models": {  # fractions; None where not measured
        name: {bench: {key: _dig(s["models"].get(name), path) for b, key, path, _, _ in SUITE_COLUMNS if b == bench}
               for bench, s in summaries.items()}
        for name in dict.fromkeys(n for s in summaries.values() for n in s["models"])}}
    if "amber" in summaries:
        combined["amber_generative_label"] = summaries["amber"]["generative_label"]
    if resolve_processes()[0] == 0:
        _write_json(out / "metrics.json", combined)
        (out / "table.md").write_text("Hallucination benchmarks (percentages; per benchmark: <benchmark>/table.md)\n\n"
                                      + format_suite_table(summaries))
    return combined


# ------------------------------------------------------------------------------------------- CLI
def _common_arguments(parser, *, answers: bool = True, descriptions: bool = True) -> None:
    parser.add_argument("--model", help="base model: a local model folder or a preset name (tiny-llava, ...)")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="a LoRA adapter folder (<output_dir>/final) or a checkpoint (<output_dir>/checkpoints/step-N); repeat for several")
    if answers:
        parser.add_argument("--allow-partial", action="store_true",
                            help="score an --answers file that answers only some questions (the tables say how many)")
    parser.add_argument("--out", required=True, help="output folder (resumes what an interrupted run left there)")
    if descriptions:
        parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens of a description (default 64)")
    parser.add_argument("--yes-no-max-new-tokens", type=int, default=YES_NO_MAX_NEW_TOKENS,
                        help=f"new tokens of a yes/no answer (default {YES_NO_MAX_NEW_TOKENS}: the parser reads the first sentence)")
    parser.add_argument("--prompt-suffix", default="", help="text added on a new line after every yes/no question, e.g. "
                        "'Answer the question using a single word or phrase.' (LLaVA's POPE prompt)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed; also POPE's build seed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--preset-seed", type=int, default=0, help="random-weight seed of a preset --model")
    parser.add_argument("--device", help="cuda | cpu (default: cuda when available; under torchrun each process its GPU)")
    parser.add_argument("--dtype", help="bfloat16 | float32 | ... (default: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--no-progress", action="store_true")


def _options(args, max_new_tokens: int) -> GenerationOptions:
    return GenerationOptions(max_new_tokens=max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             seed=args.seed, batch_size=args.batch_size)


def build_pope_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="mdpo-eval pope", description="POPE yes/no object probing: accuracy, precision, recall, F1 (\"yes\" positive) "
        "and yes-ratio per setting, answers parsed as LLaVA's eval_pope.py parses them.",
        epilog="e.g. mdpo-eval pope --questions coco_pope_adversarial.json --image-root val2014 --model M --adapter A --out out/pope")
    parser.add_argument("--questions", action="append", default=[], metavar="FILE",
                        help="POPE question file (JSONL of {question_id, image, text, label}); repeat for several settings")
    parser.add_argument("--coco-annotations", metavar="FILE", help="build the questions from a COCO instances file, as POPE does")
    parser.add_argument("--setting", action="append", default=[], choices=["random", "popular", "adversarial", "all"],
                        help="negative sampling of the build; repeat for several")
    parser.add_argument("--pope-images", type=int, default=500, help="images drawn for the build (POPE: 500)")
    parser.add_argument("--objects-per-image", type=int, default=3, help="yes (and no) questions per image (POPE: 3)")
    parser.add_argument("--image-root", metavar="DIR", help="folder of the images (default: the questions file's folder)")
    parser.add_argument("--answers", action="append", default=[], metavar="FILE",
                        help="JSONL of {question_id, text} generated elsewhere (LLaVA's format), scored without a model")
    _common_arguments(parser, descriptions=False)
    return parser


def build_amber_parser():
    import argparse

    from .amber import AMBER_TASKS

    parser = argparse.ArgumentParser(
        prog="mdpo-eval amber", description="AMBER: generative CHAIR, Cover, Hal, Cog and discriminative accuracy, precision, "
        "recall, F1 (existence, attribute, relation), computed as AMBER's inference.py computes them.",
        epilog="e.g. mdpo-eval amber --amber-dir AMBER --image-root AMBER/image --model M --adapter A --out out/amber")
    parser.add_argument("--amber-dir", required=True, help="AMBER's repository folder (holding data/query, data/annotations.json, ...)")
    parser.add_argument("--task", default="all", choices=list(AMBER_TASKS), help="which query file (inference.py's a, g, d, de, da, dr)")
    parser.add_argument("--image-root", metavar="DIR", help="AMBER's images (default: <amber-dir>/image)")
    parser.add_argument("--answers", action="append", default=[], metavar="FILE",
                        help="AMBER's response format ([{id, response}]) generated elsewhere, scored without a model")
    _common_arguments(parser)
    return parser


def build_suite_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="mdpo-eval suite", description="CHAIR, POPE and AMBER for a base model and its adapters in one call: each "
        "benchmark's own outputs under OUT/<benchmark>/, and one table over all of them.",
        epilog="e.g. mdpo-eval suite --chair eval.json --pope coco_pope_adversarial.json --pope-image-root val2014 "
               "--amber AMBER --model M --adapter A --out out/suite")
    parser.add_argument("--chair", metavar="FILE", help="CHAIR questions ({id, image, question[, objects]}), as hallucination's --data")
    parser.add_argument("--coco-annotations", metavar="FILE", help="CHAIR's ground truth from COCO instances")
    parser.add_argument("--chair-image-root", metavar="DIR")
    parser.add_argument("--pope", action="append", default=[], metavar="FILE", help="POPE question file; repeat for several")
    parser.add_argument("--pope-coco", metavar="FILE", help="build POPE's questions from COCO instances (all three settings)")
    parser.add_argument("--pope-image-root", metavar="DIR")
    parser.add_argument("--amber", metavar="DIR", help="AMBER's repository folder")
    parser.add_argument("--amber-task", default="all")
    parser.add_argument("--amber-image-root", metavar="DIR")
    _common_arguments(parser, answers=False)
    return parser


def _run(prog: str, args, fn: Callable[[Any], dict], table: Path) -> int:
    from .processes import eval_processes

    started = time.perf_counter()
    procs = eval_processes(args.device)
    try:
        fn(procs.device)
    except (MdpoError, ValueError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        procs.finish()
    if procs.main:
        if table.is_file():
            print(table.read_text(), end="")
        print(f"{prog}: {time.perf_counter() - started:.1f} s; written to {args.out}")
    return 0


def pope_main(argv: list[str] | None = None) -> int:
    args = build_pope_parser().parse_args(argv)
    return _run("mdpo-eval pope", args, lambda device: evaluate_pope(
        args.out, questions_files=args.questions, coco_annotations=args.coco_annotations, settings=args.setting,
        seed=args.seed, n_images=args.pope_images, objects_per_image=args.objects_per_image, image_root=args.image_root,
        model=args.model, adapters=args.adapter, answers=args.answers, allow_partial=args.allow_partial,
        options=_options(args, args.yes_no_max_new_tokens), prompt_suffix=args.prompt_suffix, preset_seed=args.preset_seed,
        device=device, dtype=args.dtype, progress=not args.no_progress), Path(args.out) / "table.md")


def amber_main(argv: list[str] | None = None) -> int:
    args = build_amber_parser().parse_args(argv)
    return _run("mdpo-eval amber", args, lambda device: evaluate_amber(
        args.out, args.amber_dir, task=args.task, image_root=args.image_root, model=args.model, adapters=args.adapter,
        answers=args.answers, allow_partial=args.allow_partial, options=_options(args, args.max_new_tokens),
        yes_no_max_new_tokens=args.yes_no_max_new_tokens, prompt_suffix=args.prompt_suffix, preset_seed=args.preset_seed,
        device=device, dtype=args.dtype, progress=not args.no_progress), Path(args.out) / "table.md")


def suite_main(argv: list[str] | None = None) -> int:
    args = build_suite_parser().parse_args(argv)
    return _run("mdpo-eval suite", args, lambda device: evaluate_suite(
        args.out, chair_data=args.chair, chair_coco=args.coco_annotations, chair_image_root=args.chair_image_root,
        pope_questions=args.pope, pope_coco=args.pope_coco, pope_image_root=args.pope_image_root, amber_dir=args.amber,
        amber_task=args.amber_task, amber_image_root=args.amber_image_root, model=args.model, adapters=args.adapter,
        options=_options(args, args.max_new_tokens), yes_no_max_new_tokens=args.yes_no_max_new_tokens,
        prompt_suffix=args.prompt_suffix, seed=args.seed, preset_seed=args.preset_seed, device=device, dtype=args.dtype,
        progress=not args.no_progress), Path(args.out) / "table.md")
