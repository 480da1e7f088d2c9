"""`mdpo-eval hallucination`: a base model and its trained adapters / checkpoints side by side on one
question set, scored for object hallucination (CHAIR, recall, length), image reliance and, for
preference data, the held-out conditional margin.

    mdpo-eval hallucination --model tiny-llava --adapter outputs/tiny-cpu/final \\
        --data sample_data/eval.json --out outputs/hallucination

For every model (the base first, then each --adapter, in order) and for every --answers file:
1. answers to every question with its own image (`generate.generate_answers`, resumable), scored by
   `chair.score_answers` against the annotations: `--data`'s own `objects`, or COCO instances
   (`--coco-annotations`, keyed by the questions' `image_id` or image file name);
2. image reliance (models only; `--no-reliance` skips it): the same questions with the image replaced
   by a blank one and by the training corruption (`mdpo.data.corrupt_image` with the run's
   CorruptionConfig, epoch 0). Reported: how often the answer changes, and recall / CHAIR_i of those
   answers against the real image's objects (a model that looks at the image loses recall on a blank);
3. for preference records (`chosen` and `rejected` in --data) and a model with an adapter: the held-out
   mDPO metrics of `mdpo.evaluate.evaluate` (conditional margin and accuracy, reward margin), the
   reference being the base (adapters disabled).

Writes OUT/metrics.json (everything above, no timings: a second run writes the same file byte for
byte), OUT/table.md, OUT/chair.png (CHAIR_i, CHAIR_s, recall per model), OUT/<model>/answers.jsonl (each
answer with its mentions, hallucinated ones marked [[so]]), OUT/<model>/generated/*.jsonl (the raw
generations, kept for resuming) and OUT/timing.json (generation throughput).

Vocabulary: COCO's 80 categories for COCO annotations; for `mdpo-data make-sample` scenes (objects
with a `shape`) their three shapes (circle, square, triangle); for `mdpo.data.scenes` records their
eight two-word categories; or `--vocabulary FILE` (chair.ObjectVocabulary.from_file).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import MdpoError
from .generate import (GenerationOptions, Question, adapter_weight_shapes, generate_answers, load_generation_model,
                       load_questions, throughput)

SAMPLE_SHAPES = ("circle", "square", "triangle")  # mdpo.data.sample's shapes
RELIANCE_VARIANTS = ("blank", "corrupted")


class HallucinationEvalError(MdpoError, ValueError):
    """Arguments of `mdpo-eval hallucination` that cannot be used together; the message names them."""


# ------------------------------------------------------------------------------------ annotations
def choose_vocabulary(questions: Sequence[Question], vocabulary: str | None = None):
    """(ObjectVocabulary, object_name) for the questions' `objects` (see the module docstring)."""
    from . import chair

    if vocabulary not in (None, "auto"):
        if vocabulary == "coco":
            return chair.ObjectVocabulary.coco(), None
        return chair.ObjectVocabulary.from_file(vocabulary), None
    objects = [o for q in questions for o in (q.meta.get("objects") or [])]
    if objects and all(isinstance(o, dict) and "shape" in o for o in objects):
        return chair.ObjectVocabulary.from_dict({s: [] for s in SAMPLE_SHAPES}, name="sample-shapes"), lambda o: o["shape"]
    from ..data import scenes

    if objects and all(isinstance(o, str) and o in scenes.CATEGORIES for o in objects):
        return chair.ObjectVocabulary.from_dict({c: [] for c in scenes.CATEGORIES}, name="scenes"), None
    return chair.ObjectVocabulary.coco(), None


def load_ground_truth(questions: Sequence[Question], data: str, coco_annotations: str | None = None,
                      image_root: str | None = None, vocabulary: str | None = None):
    """(Annotations, {question id: annotation key}) for the questions, checked before any generation:
    a question whose image has no annotation is a HallucinationDataError naming it."""
    from . import chair

    if coco_annotations is not None:
        vocab = chair.ObjectVocabulary.coco() if vocabulary in (None, "auto", "coco") else chair.ObjectVocabulary.from_file(vocabulary)
        annotations = chair.load_coco_annotations(coco_annotations, vocab, image_root=image_root)
        by_file = {os.path.basename(a.image): key for key, a in annotations.items() if a.image}
        keys = {}
        for q in questions:
            key = q.meta.get("image_id")
            key = str(key) if key is not None else by_file.get(os.path.basename(q.image))
            if key is None or key not in annotations:
                raise chair.HallucinationDataError(
                    f"{data}: question {q.index} (id {q.sample_id!r}): image {q.image!r} "
                    f"{'(image_id ' + str(q.meta['image_id']) + ') ' if 'image_id' in q.meta else ''}"
                    f"has no annotation in {coco_annotations}")
            keys[q.sample_id] = key
        return annotations, keys
    vocab, object_name = choose_vocabulary(questions, vocabulary)
    missing = [q for q in questions if "objects" not in q.meta]
    if missing:
        raise chair.HallucinationDataError(
            f"{data}: question {missing[0].index} (id {missing[0].sample_id!r}) has no 'objects' list; give the "
            "ground truth in --data or COCO instances with --coco-annotations")
    records = [{"id": q.sample_id, "image": q.image, "question": q.question, "objects": q.meta["objects"]} for q in questions]
    annotations = chair.annotations_from_records(records, vocab, object_name=object_name, source=str(data))
    return annotations, {q.sample_id: q.sample_id for q in questions}


# -------------------------------------------------------------------------------------- the run
def run_config_of(adapter: str | os.PathLike):
    """The TrainConfig of the run an adapter (`<run>/final`: `<run>/config.json`) or a checkpoint
    (its own config.json) comes from; None when there is none."""
    from .generate import _run_config

    adapter = Path(adapter)
    if (adapter / "adapter_config.json").is_file():
        return _run_config(adapter.parent / "config.json")
    return _run_config(adapter / "config.json")


def _unique(label: str, taken: set[str]) -> str:
    label = re.sub(r"[^A-Za-z0-9._+-]+", "_", label).strip("_") or "model"
    name, n = label, 2
    while name in taken:
        name, n = f"{label}-{n}", n + 1
    taken.add(name)
    return name


def _score(rows: Sequence[dict], annotations, keys: dict[str, str] | None, source: str):
    from . import chair

    answers = [{"id": keys[r["id"]] if keys else r["id"], "answer": r["answer"], "tokens": r["tokens"]} for r in rows]
    return chair.score_answers(answers, annotations, source=source)


def _reliance(base_rows, variant_rows, report) -> dict:
    changed = sum(a["answer"] != b["answer"] for a, b in zip(base_rows, variant_rows))
    return {"answer_changed": changed / len(base_rows), "recall": report.metrics["recall"],
            "chair_i": report.metrics["chair_i"], "tokens_per_answer": report.metrics["tokens_per_answer"]}


def _preference_metrics(gm, data: str, image_root: str | None, base_model, micro_batch_size: int) -> dict | None:
    """The held-out mDPO metrics of a model with an adapter (or a full fine-tuning checkpoint, against
    `base_model`) on the preference records of `data` (`mdpo.evaluate.evaluate`, live reference)."""
    import types

    from ..components import make_collator, make_corruption, make_criterion
    from ..config import TrainConfig
    from ..data import load_records
    from ..evaluate import evaluate
    from ..scoring import SequenceScorer

    cfg = gm.run_config or TrainConfig()
    loaded = types.SimpleNamespace(processor=gm.processor, family=gm.family, adapter=gm.adapter)
    records = load_records(data, image_root=image_root, processor=gm.processor, max_length=cfg.data.max_length).records
    extra = {"shared_prefix": cfg.model.shared_prefix} if hasattr(cfg.model, "shared_prefix") else {}
    scorer = SequenceScorer(gm.model, gm.adapter, average=cfg.loss.average_logprobs, impl=cfg.kernel_impl, **extra)
    reference_model = None if gm.has_adapter else base_model
    metrics = evaluate(scorer, make_criterion(cfg), records, make_collator(cfg, loaded, make_corruption(cfg), records),
                       micro_batch_size=micro_batch_size, device=gm.device, reference_model=reference_model)
    return {"objective": cfg.objective, **metrics}


def evaluate_hallucination(
    out_dir: str | os.PathLike,
    data: str,
    *,
    model: str | None = None,
    adapters: Sequence[str] = (),
    answers: Sequence[str] = (),
    coco_annotations: str | None = None,
    image_root: str | None = None,
    vocabulary: str | None = None,
    options: GenerationOptions = GenerationOptions(),
    reliance: bool = True,
    preference: bool = True,
    preset_seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    quantization: str = "none",
    progress: bool = True,
    log: Callable[[str], None] = print,
    allow_partial: bool = False,
) -> dict:
    """Run the whole evaluation (module docstring) and write its files to `out_dir`. -> metrics.json's dict.

    answers: files of `{id or image_id, answer[, tokens]}` scored without a model (and without reading
    an image): one answer per question (or per image, for COCO annotations), checked by
    `answers.read_answers_file`; a file answering only some is refused unless `allow_partial`.
    Under several processes (`torchrun`, `accelerate launch`) generation is shared over them and only
    rank 0 writes files; every process returns the same dict."""
    from . import chair
    from .answers import read_answers_file
    from .generate import resolve_processes
    from ..components import make_corruption
    from ..data import CorruptionConfig

    if model is None and adapters:
        raise HallucinationEvalError("--adapter needs --model (the base model the adapters were trained on)")
    if model is None and not answers:
        raise HallucinationEvalError("nothing to evaluate: give --model (and --adapter ...) or --answers FILE")
    main = resolve_processes()[0] == 0
    out = Path(out_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    questions = load_questions(data, image_root, check_images=model is not None)  # answers alone read no image
    annotations, keys = load_ground_truth(questions, data, coco_annotations, image_root, vocabulary)
    is_preference = all("chosen" in q.meta and "rejected" in q.meta for q in questions)
    for adapter in adapters:  # an unreadable or unsafe adapter file is named before any model generates
        if (Path(adapter) / "adapter_config.json").is_file():
            adapter_weight_shapes(Path(adapter))
    taken: set[str] = set()
    results: dict[str, dict] = {}
    reports: dict[str, Any] = {}
    timing: dict[str, dict] = {}

    # --- answers written elsewhere: scored as they are (their ids are the annotations' ids)
    for path in answers:
        stem = Path(path).stem
        label = _unique(Path(path).parent.name if stem == "answers" and Path(path).parent.name else stem, taken)
        answer_set = read_answers_file(path, expected_ids=list(keys.values()), id_keys=("id", "image_id"),
                                       aliases={q: k for q, k in keys.items() if q != k}, allow_partial=allow_partial,
                                       questions_source=str(data))
        report = chair.score_answers([{**record, "id": key} for key, record in answer_set.records.items()],
                                     annotations, source=str(path))
        reports[label] = report
        results[label] = {"kind": "answers", "source": str(path), "coverage": answer_set.coverage(), **report.to_dict()}
        if main:
            _write_scored(out / label / "answers.jsonl", report, None)

    # --- models: the base, then each adapter / checkpoint. The first run found among the adapters
    # decides the prompt settings and the corruption for every model, the base included.
    prompt_source = next((a for a in adapters if run_config_of(a) is not None), None)
    prompt_config = run_config_of(prompt_source) if prompt_source is not None else None
    corruption = make_corruption(prompt_config) if prompt_config is not None else CorruptionConfig()
    base = None
    specs = ([None] if model is not None else []) + list(adapters)
    for adapter in specs:
        gm = load_generation_model(model, adapter, device=device, dtype=dtype, preset_seed=preset_seed,
                                   prompt_config=prompt_config, quantization=quantization)
        label = _unique("base" if adapter is None else gm.label, taken)
        folder = out / label
        log(f"{label}: {gm.source} ({gm.kind}, {gm.family}, {gm.device})")
        rows = generate_answers(gm, questions, folder / "generated" / "answers-image.jsonl", options,
                                progress=progress, desc=f"{label}: answers")
        report = _score(rows, annotations, keys, str(folder / "answers.jsonl"))
        reports[label] = report
        entry = {"kind": gm.kind, "source": gm.source, "family": gm.family, **report.to_dict()}
        timing[label] = {"image": throughput(rows)}
        if reliance:
            entry["reliance"] = {}
            for variant in RELIANCE_VARIANTS:
                used = corruption if variant == "corrupted" else None
                vrows = generate_answers(gm, questions, folder / "generated" / f"answers-{variant}.jsonl", options,
                                         variant=variant, corruption=used, progress=progress, desc=f"{label}: {variant} image")
                entry["reliance"][variant] = _reliance(rows, vrows, _score(vrows, annotations, keys, variant))
                timing[label][variant] = throughput(vrows)
        if preference and is_preference and (gm.has_adapter or (gm.kind == "checkpoint" and base is not None)):
            entry["preference"] = _preference_metrics(gm, data, image_root, base.model if base else None,
                                                      options.batch_size)
        results[label] = entry
        if main:
            _write_scored(folder / "answers.jsonl", report, rows)
        if adapter is None:
            base = gm
        else:
            del gm  # one adapted model in memory at a time besides the base

    summary = {
        "data": str(data), "questions": len(questions),
        "annotations": str(coco_annotations) if coco_annotations else str(data),
        "vocabulary": annotations.vocabulary.name, "options": asdict(options),
        "corruption": corruption.fingerprint() if reliance and specs else None,
        "prompts_from": "collator defaults" if prompt_source is None else f"the run config of {prompt_source}",
        "models": results,
    }
    summary = json.loads(json.dumps(summary, default=list))
    if not main:
        return summary
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(format_tables(summary, reports))
    chair.plot_bars(reports, out / "chair.png")
    (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    return summary


def _write_scored(path: Path, report, rows: Sequence[dict] | None) -> None:
    """answers.jsonl: chair's record of each answer (mentions, marked text) + the generation's fields."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, record in enumerate(report.answer_records()):
        if rows is not None:
            row = rows[i]
            record = {**record, "id": row["id"], "image": row["image"], "question": row["question"],
                      "finished": row["finished"], "seconds": row["seconds"]}
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def format_tables(summary: dict, reports: dict) -> str:
    """table.md: chair.format_table, then image reliance and preference margins where measured, and the
    most hallucinated categories per model."""
    from . import chair

    from .answers import coverage_note

    parts = [f"Object hallucination on {summary['data']} ({summary['questions']} questions, vocabulary "
             f"{summary['vocabulary']}; percentages)\n", chair.format_table(reports)]
    models = summary["models"]
    notes = [coverage_note(name, m.get("coverage")) for name, m in models.items()]
    parts += [f"Partial: {note}" for note in notes if note]
    if any("reliance" in m for m in models.values()):
        parts += ["\nImage reliance: answers with a blank image and with the training corruption\n",
                  "| model | changed (blank) | recall (blank) | CHAIR_i (blank) | changed (corrupted) | recall (corrupted) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, m in models.items():
            if "reliance" in m:
                b, c = m["reliance"]["blank"], m["reliance"]["corrupted"]
                parts.append(f"| {name} | {_pct(b['answer_changed'])} | {_pct(b['recall'])} | {_pct(b['chair_i'])} | "
                             f"{_pct(c['answer_changed'])} | {_pct(c['recall'])} |")
    if any("preference" in m for m in models.values()):
        parts += ["\nHeld-out preference pairs (reference: the base model)\n",
                  "| model | conditional margin | conditional accuracy | reward margin | accuracy | pairs |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, m in models.items():
            p = m.get("preference")
            if p:
                cell = lambda k: "n/a" if p.get(k) is None else f"{p[k]:.4f}"  # noqa: E731
                parts.append(f"| {name} | {cell('rewards/conditional_margins')} | {cell('rewards/conditional_accuracies')} | "
                             f"{cell('rewards/margins')} | {cell('rewards/accuracies')} | {p['pairs']} |")
    parts.append("\nMost hallucinated categories (answers hallucinating them)\n")
    for name, m in models.items():
        top = ", ".join(f"{c} ({n})" for c, n in m["top_hallucinated"][:5]) or "none"
        parts.append(f"- {name}: {top}")
    return "\n".join(p.rstrip("\n") if p.endswith("\n\n") else p for p in parts) + "\n"


# ---------------------------------------------------------------------------- during training
TRAINING_QUESTIONS = 16  # held-out questions answered at an `eval_generate_every` evaluation
TRAINING_OPTIONS = GenerationOptions(max_new_tokens=32, batch_size=8)  # greedy: draws no random number
_TRAINING_SETS: dict[tuple, tuple] = {}


def training_generation_metrics(cfg, loaded, model, device, synced_gpus: bool | None = None) -> dict[str, float]:
    """`eval_generate_every`: greedy answers of the policy `model` (LoRA on, dropout off) to the first
    TRAINING_QUESTIONS held-out questions of `cfg.data.eval_path`, scored against their `objects`.
    -> {"generate/chair_i", "generate/chair_s", "generate/recall", "generate/tokens_per_answer",
    "generate/objects_per_answer"} (undefined rates left out; the same on every process). The model's
    train/eval mode and its generation_config are restored after; no global RNG is drawn from, so the
    run's losses do not change. Under several processes (a torch.distributed group) each answers its
    share, with the same number of generate calls everywhere (`sharded_generate`; synced_gpus for the
    sharding engines). Costs one generate call per 8 questions of at most 32 new tokens."""
    from .generate import clean_generation_config, sharded_generate, wrap_model

    key = (cfg.data.eval_path, cfg.data.image_root)
    if key not in _TRAINING_SETS:
        questions = load_questions(cfg.data.eval_path, cfg.data.image_root)[:TRAINING_QUESTIONS]
        _TRAINING_SETS[key] = (questions, *load_ground_truth(questions, cfg.data.eval_path))
    questions, annotations, keys = _TRAINING_SETS[key]
    base = loaded.adapter.unwrap(model)
    was_training, shipped = model.training, base.generation_config
    gm = wrap_model(model, loaded.processor, loaded.family, loaded.adapter, device, prompt_config=cfg)
    model.eval()
    base.generation_config = clean_generation_config(gm)
    try:
        answers = sharded_generate(gm, questions, TRAINING_OPTIONS, synced_gpus=synced_gpus)
        rows = [{"id": q.sample_id, "answer": a.text, "tokens": len(a.ids)} for q, (a, _) in zip(questions, answers)]
    finally:
        model.train(was_training)
        base.generation_config = shipped
    metrics = _score(rows, annotations, keys, f"{cfg.data.eval_path} (generated during training)").metrics
    names = ("chair_i", "chair_s", "recall", "tokens_per_answer", "objects_per_answer")
    return {f"generate/{k}": float(metrics[k]) for k in names if metrics[k] is not None}


# ------------------------------------------------------------------------------------------- CLI
def build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="mdpo-eval hallucination",
        description="Generate answers with a base model and its trained adapters / checkpoints, side by side, and score "
                    "them for object hallucination (CHAIR_i, CHAIR_s, recall, length), image reliance and preference margins.",
        epilog="e.g. mdpo-eval hallucination --model tiny-llava --adapter outputs/tiny-cpu/final "
               "--data sample_data/eval.json --out outputs/hallucination")
    parser.add_argument("--model", help="base model: a local model folder or a preset name (tiny-llava, ...)")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="a LoRA adapter folder (<output_dir>/final) or a checkpoint (<output_dir>/checkpoints/step-N); repeat for several")
    parser.add_argument("--answers", action="append", default=[], metavar="FILE",
                        help="JSONL of {id or image_id, answer[, tokens]} generated elsewhere, scored as it is (no model, "
                             "no image read); repeat for several")
    parser.add_argument("--allow-partial", action="store_true",
                        help="score an --answers file that answers only some questions (the table says how many)")
    parser.add_argument("--data", required=True, help="questions: JSON list / JSONL of {id, image, question[, objects]} (e.g. sample_data/eval.json)")
    parser.add_argument("--coco-annotations", metavar="FILE", help="COCO instances file (instances_val2014.json) as the ground truth")
    parser.add_argument("--image-root", metavar="DIR", help="folder the image paths are relative to (default: --data's folder)")
    parser.add_argument("--vocabulary", help="coco | a vocabulary JSON file (default: chosen from the annotations)")
    parser.add_argument("--out", required=True, help="output folder (resumes what an interrupted run left there)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (each question's draw depends on it and its id)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--preset-seed", type=int, default=0, help="random-weight seed of a preset --model (mdpo-train uses the run's seed)")
    parser.add_argument("--no-reliance", action="store_true", help="skip the blank / corrupted image generations")
    parser.add_argument("--no-preference", action="store_true", help="skip the held-out preference metrics")
    parser.add_argument("--device", help="cuda | cpu (default: cuda when available)")
    parser.add_argument("--dtype", help="bfloat16 | float32 | ... (default: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--quantization", choices=["none", "nf4", "int8"], default="none",
                        help="load the base's language model quantised through bitsandbytes, for every model of the "
                             "evaluation (the base and each adapter / checkpoint, whatever its run used); default none")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .processes import eval_processes

    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    procs = eval_processes(args.device)  # one, or the torchrun / accelerate launch group
    try:
        options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                    seed=args.seed, batch_size=args.batch_size)
        summary = evaluate_hallucination(
            args.out, args.data, model=args.model, adapters=args.adapter, answers=args.answers,
            coco_annotations=args.coco_annotations, image_root=args.image_root, vocabulary=args.vocabulary,
            options=options, reliance=not args.no_reliance, preference=not args.no_preference,
            preset_seed=args.preset_seed, device=procs.device, dtype=args.dtype, quantization=args.quantization,
            progress=not args.no_progress, allow_partial=args.allow_partial)
    except (MdpoError, ValueError, FileNotFoundError) as exc:
        print(f"mdpo-eval hallucination: error: {exc}", file=sys.stderr)
        return 2
    finally:
        procs.finish()
    if not procs.main:
        return 0
    print(Path(args.out, "table.md").read_text(), end="")
    print(f"{len(summary['models'])} model(s) in {time.perf_counter() - started:.1f} s; written to {args.out} "
          "(metrics.json, table.md, chair.png, <model>/answers.jsonl, timing.json)")
    return 0
