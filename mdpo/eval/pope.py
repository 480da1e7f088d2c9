"""POPE (Li et al., EMNLP 2023): "Is there a <object> in the image?" yes/no questions, scored as the
field scores them. No model is loaded here; `mdpo.eval.suite` generates answers and writes the outputs (`mdpo-eval pope`).

    parse_yes_no("Yes, there is a dog.")            # "yes"
    pope_metrics(tp=40, fp=10, tn=35, fn=15)          # {"accuracy", "precision", "recall", "f1", "yes_ratio", ...}
    questions = load_pope_questions("coco_pope_random.json")      # POPE's released files (JSONL)
    images = coco_objects_per_image("instances_val2014.json")     # [{"image", "objects"}] in file order
    built = build_pope_questions(images, "adversarial", seed=0)   # POPE's own build, seeded
    write_pope_questions(built, "coco_pope_adversarial.json")
    scores = score_pope(questions, {"1": "Yes", ...})             # {setting: PopeScore}

Question format (POPE's files, one JSON object a line): {"question_id", "image", "text", "label"}, label
"yes" or "no"; an optional "category" (LLaVA's combined file) names the setting. The setting of a file
without it is the one its name contains (coco_pope_random.json -> random), else the file's stem.

Answers are parsed by the rule of LLaVA's `llava/eval/eval_pope.py` (the same as POPE's `evaluate.py`),
which LLaVA-style codebases report with: keep the text before the first ".", drop commas, split on
single spaces; the answer is "no" when one of the words is exactly "No", "no" or "not", else "yes".
So "I don't see one" is "yes" ("don't" is not "not"), an empty answer is "yes", and "No\\nThere is..."
is "yes" (no space after "No"): the rule is kept as it is, because the published numbers use it.

Metrics per setting, "yes" the positive class (`eval_pope`): precision = TP / (TP + FP), recall =
TP / (TP + FN), F1 = 2PR / (P + R), accuracy = (TP + TN) / all, yes-ratio = answers parsed "yes" / all.
A rate whose denominator is 0 is None (the script raises ZeroDivisionError). Answers are matched to
questions by question_id (LLaVA's script zips the two files in order; POPE's matches by position).

The build (`build_pope_questions`) follows POPE's `main.py` and `utils.py`: images with at least
`objects_per_image` (POPE's sample_num, 3) objects; `n_images` of them (img_num, 500) drawn at random;
for each image, for i < objects_per_image: a "yes" question on its i-th object, then a "no" question on
an object it does not have, chosen by the setting:
- random: uniformly among the objects of the drawn images (`random.choice` until one fits);
- popular: the first object, by number of drawn images holding it (most first), not yet asked about
  this image and not in it;
- adversarial: the first such object by how often it co-occurs with the i-th object in the drawn
  images (most first); falling back to random when none is left (as popular does).
Ties keep first-seen order (Python's stable sort, as POPE's). "a"/"an" follows the object's first
letter. POPE draws from the global `random` without a seed; here `seed` fixes the image draw (the same
images for the three settings, as POPE's released files share them) and each setting's draws.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .chair import HallucinationDataError, _iter_json_records, _read_json_object

POPE_SETTINGS = ("random", "popular", "adversarial")
POPE_TEMPLATE = "Is there a {} in the image?"  # POPE's main.py default
POPE_OBJECTS_PER_IMAGE = 3  # POPE's sample_num
POPE_IMAGES = 500  # POPE's img_num
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


class PopeDataError(HallucinationDataError):
    """A POPE question file, COCO file or build request that cannot be used; the message names it."""


# ------------------------------------------------------------------------------------ scoring
def parse_yes_no(text: str) -> str:
    """"yes" or "no" by LLaVA's eval_pope.py rule (module docstring)."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(tp: int, fp: int, tn: int, fn: int) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 ("yes" positive) and yes-ratio of a confusion matrix (eval_pope.py's
    formulas); None where a denominator is 0. Also the four counts and n."""
    n = tp + fp + tn + fn
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = (2 * precision * recall / (precision + recall)
          if precision is not None and recall is not None and precision + recall else None)
    return {"accuracy": ratio(tp + tn, n), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": ratio(tp + fp, n), "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n}


@dataclass(frozen=True)
class PopeQuestion:
    question_id: Any  # as the file writes it (POPE: an int); compared as a string
    image: str
    text: str
    label: str  # "yes" | "no"
    setting: str

    @property
    def key(self) -> str:
        return str(self.question_id)


@dataclass
class PopeScore:
    """One setting's result: metrics (pope_metrics) and each scored question's parsed answer."""

    setting: str
    metrics: dict[str, Any]
    parsed: dict[str, str]  # question key -> "yes" | "no"


def score_pope(questions: Sequence[PopeQuestion], answers: Mapping[str, str]) -> dict[str, PopeScore]:
    """{setting: PopeScore} over the questions that have an answer in `answers` ({question key: text};
    checked beforehand by answers.read_answers_file). Settings in first-seen order."""
    scores: dict[str, PopeScore] = {}
    counts: dict[str, dict[str, int]] = {}
    for q in questions:
        if q.key not in answers:
            continue
        parsed = parse_yes_no(answers[q.key])
        score = scores.setdefault(q.setting, PopeScore(q.setting, {}, {}))
        score.parsed[q.key] = parsed
        c = counts.setdefault(q.setting, {"tp": 0, "fp": 0, "tn": 0, "fn": 0})
        c[("t" if parsed == q.label else "f") + ("p" if parsed == "yes" else "n")] += 1
    for setting, score in scores.items():
        score.metrics = pope_metrics(**counts[setting])
    return scores


# ---------------------------------------------------------------------------------- questions
def setting_of_file(path: str | os.PathLike) -> str:
    """random / popular / adversarial when the file name contains one of them, else the file's stem."""
    stem = Path(path).stem
    found = [s for s in POPE_SETTINGS if s in stem.lower()]
    return found[0] if len(found) == 1 else stem


def load_pope_questions(path: str | os.PathLike, setting: str | None = None) -> list[PopeQuestion]:
    """POPE's question file (JSONL or a JSON list of {question_id, image, text, label[, category]}).
    The setting: `setting`, else each record's "category", else `setting_of_file`. A missing field, a
    label other than yes/no or a repeated question_id is a PopeDataError naming the record."""
    path = Path(path)
    if not path.is_file():
        raise PopeDataError(f"POPE questions file not found: {path}")
    default = setting or setting_of_file(path)
    questions, seen = [], {}
    for index, raw in _iter_json_records(path):
        where = f"{path}: record {index}"
        if not isinstance(raw, Mapping):
            raise PopeDataError(f"{where}: not a JSON object but {type(raw).__name__}")
        qid = raw.get("question_id")
        if qid is None or isinstance(qid, (bool, float, dict, list)):
            raise PopeDataError(f"{where}: 'question_id' must be a string or an integer, got {qid!r}")
        where += f" (question_id {qid!r})"
        for key in ("image", "text"):
            if not isinstance(raw.get(key), str) or not raw[key].strip():
                raise PopeDataError(f"{where}: {key!r} must be a non-empty string, got {raw.get(key)!r}")
        label = raw.get("label")
        if label not in ("yes", "no"):
            raise PopeDataError(f"{where}: 'label' must be \"yes\" or \"no\", got {label!r}")
        if str(qid) in seen:
            raise PopeDataError(f"{where}: repeats the question_id of record {seen[str(qid)]}")
        seen[str(qid)] = index
        category = raw.get("category") if setting is None else None
        questions.append(PopeQuestion(qid, raw["image"], raw["text"], label,
                                      category if isinstance(category, str) and category else default))
    if not questions:
        raise PopeDataError(f"{path}: no questions")
    return questions


def coco_objects_per_image(instances_path: str | os.PathLike) -> list[dict[str, Any]]:
    """[{"image": file_name, "image_id", "objects": [category names]}] of a COCO instances file, in its
    "images" order; each image's objects once, in the order its first instance appears (the shape of
    POPE's segmentation/coco_ground_truth_segmentation.json). Images without an instance included."""
    path = Path(instances_path)
    data = _read_json_object(path, "COCO instances")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise PopeDataError(f"{path}: not a COCO instances file (no '{key}' list)")
    names = {c.get("id"): c.get("name") for c in data["categories"] if isinstance(c, Mapping)}
    objects: dict[Any, list[str]] = {}
    files: dict[Any, str] = {}
    for image in data["images"]:
        if not isinstance(image, Mapping) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise PopeDataError(f"{path}: image entry {image!r} has no 'id' or 'file_name'")
        objects[image["id"]], files[image["id"]] = [], image["file_name"]
    for index, inst in enumerate(data["annotations"]):
        image_id, name = inst.get("image_id"), names.get(inst.get("category_id"))
        if image_id not in objects:
            raise PopeDataError(f"{path}: annotation {index} refers to image id {image_id!r}, not in 'images'")
        if not isinstance(name, str):
            raise PopeDataError(f"{path}: annotation {index} has unknown category id {inst.get('category_id')!r}")
        if name not in objects[image_id]:
            objects[image_id].append(name)
    return [{"image": files[i], "image_id": i, "objects": objs} for i, objs in objects.items()]


def _question_text(template: str, name: str) -> str:
    """POPE's create_question: "an" before a vowel. POPE's own code calls template.replace("a", "an"),
    which would also write "imange"; its released files read "an umbrella in the image", so only the
    article is changed here."""
    if name[:1] in ("a", "e", "i", "o", "u"):
        template = re.sub(r"\ba \{\}", "an {}", template)
    return template.format(name)


def _counts_in_order(images: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for image in images:
        for o in image["objects"]:
            counts[o] = counts.get(o, 0) + 1
    return counts


def co_occurrence(images: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """{object: the objects seen with it in an image, most co-occurrences first} (POPE's
    compute_co_occurrence; ties in first-seen order)."""
    co: dict[str, dict[str, int]] = {}
    for image in images:
        for o in image["objects"]:
            row = co.setdefault(o, {})
            for other in image["objects"]:
                if other != o:
                    row[other] = row.get(other, 0) + 1
    return {o: [name for name, _ in sorted(row.items(), key=lambda kv: kv[1], reverse=True)] for o, row in co.items()}


def popular_order(images: Sequence[Mapping[str, Any]]) -> list[str]:
    """Objects by the number of images holding them, most first (ties in first-seen order)."""
    return [name for name, _ in sorted(_counts_in_order(images).items(), key=lambda kv: kv[1], reverse=True)]


def build_pope_questions(
    images: Sequence[Mapping[str, Any]],
    setting: str,
    *,
    seed: int = 0,
    n_images: int | None = POPE_IMAGES,
    objects_per_image: int = POPE_OBJECTS_PER_IMAGE,
    template: str = POPE_TEMPLATE,
) -> list[dict[str, Any]]:
    """POPE's questions for `images` ([{"image", "objects"}], e.g. coco_objects_per_image) in one
    setting (module docstring). n_images None: every eligible image, in order. -> records of POPE's
    format, question_id from 1."""
    if setting not in POPE_SETTINGS:
        raise PopeDataError(f"setting {setting!r} must be one of {', '.join(POPE_SETTINGS)}")
    if objects_per_image < 1:
        raise PopeDataError(f"objects per image {objects_per_image} must be at least 1")
    eligible = [im for im in images if len(im["objects"]) >= objects_per_image]
    if n_images is None:
        drawn = eligible
    else:
        if len(eligible) < n_images:
            raise PopeDataError(f"only {len(eligible)} image(s) have at least {objects_per_image} objects; "
                                f"{n_images} asked for (lower --pope-images or --objects-per-image)")
        drawn = random.Random(seed).sample(eligible, n_images)
    pool = list(_counts_in_order(drawn))
    popular = popular_order(drawn)
    co = co_occurrence(drawn)
    rng = random.Random(f"{seed}:{setting}")  # str seeds are hashed with SHA-512: the same in every process
    questions: list[dict[str, Any]] = []

    def ask(image, name, label):
        questions.append({"question_id": len(questions) + 1, "image": image["image"],
                          "text": _question_text(template, name), "label": label})

    for image in drawn:
        present, asked = set(image["objects"]), []
        for i in range(objects_per_image):
            positive = image["objects"][i]
            asked.append(positive)
            ask(image, positive, "yes")
            fits = lambda o: o not in asked and o not in present  # noqa: E731
            ranked = popular if setting == "popular" else co.get(positive, []) if setting == "adversarial" else []
            negative = next((o for o in ranked if fits(o)), None)
            if negative is None:
                if not any(fits(o) for o in pool):
                    raise PopeDataError(f"image {image['image']!r}: no absent object left for question {i + 1} "
                                        f"(lower --objects-per-image)")
                negative = rng.choice(pool)
                while not fits(negative):
                    negative = rng.choice(pool)
            asked.append(negative)
            ask(image, negative, "no")
    return questions


def write_pope_questions(questions: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """POPE's format: one JSON object a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(dict(q)) + "\n" for q in questions), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- reporting
def format_pope_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: one row per (model, setting): accuracy, precision, recall, F1, yes-ratio (%), answers."""
    header = "| model | setting | accuracy ↑ | precision ↑ | recall ↑ | F1 ↑ | yes ratio | answers |"
    rows = [header, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, entry in results.items():
        for setting, m in entry["settings"].items():
            cells = ["n/a" if m[k] is None else f"{100 * m[k]:.1f}" for k in METRICS]
            answered = str(m["n"]) if m["n"] == m.get("expected", m["n"]) else f"{m['n']} of {m['expected']}"
            rows.append(f"| {name} | {setting} | " + " | ".join(cells) + f" | {answered} |")
    return "\n".join(rows) + "\n"


def plot_pope(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """PNG: F1 and accuracy (%) per setting, one bar per model (matplotlib's Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(results)
    settings = list(dict.fromkeys(s for entry in results.values() for s in entry["settings"]))
    groups = [(s, k) for s in settings for k in ("f1", "accuracy")]
    fig = Figure(figsize=(max(5.0, 1.2 + 0.4 * len(names) * len(groups)), 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        values = [results[name]["settings"].get(s, {}).get(k) for s, k in groups]
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(groups))]
        bars = ax.bar(xs, [100 * v if v is not None else 0.0 for v in values], width, label=name)
        for bar, value in zip(bars, values):
            ax.annotate("n/a" if value is None else f"{100 * value:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{s}\n{'F1' if k == 'f1' else 'accuracy'}" for s, k in groups], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 120)
    ax.legend(fontsize=8, frameon=False, loc="upper center", ncol=min(len(names), 4))
    ax.set_title("POPE", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
