"""Scenes with a language prior: rendered objects that co-occur, exact object lists, and the pieces
of the toy reproduction of mDPO (`benchmarks/reproduce.py`): a small LLaVA-shaped model that can
learn to see, an on-policy sampler, exact mention labels, preference pairs and CHAIR-style scores.

The world. Eight object categories, each a fixed colour and shape ("red circle", "blue square", ...),
named by a two-word phrase. Four of them are *cues* and each cue has a *partner*:

    red circle -> blue square,  green triangle -> yellow star,
    purple diamond -> orange circle,  cyan square -> pink triangle

Training scenes (`kind="train"`) carry the co-occurrence: per pair the cue is present with p = 0.35,
its partner then with p = `cooccurrence` (0.9), and without the cue with p = 0.08. The answer to
"What is in the image?" lists the objects in the category order above, so the partner comes right
after its cue: a model that is unsure whether the partner is there can fall back on "the partner
always follows the cue" -- the language prior. Held-out scenes are `balanced` (every category
independently, p = 0.3: no co-occurrence), `cue_only` (a cue without its partner) and
`partner_only` (a partner without its cue): the "trap" scenes where the prior is wrong.

Images are 56 px (the tiny LLaVA processor's size: 4 x 4 patches of 14 px), light noisy background,
objects 11-18 px with jittered colour, never overlapping. Every record keeps its exact object list
(`objects`: category names), so the mention labels are exact and CHAIR has no annotation noise.

Everything is a pure function of its seed (`random.Random(seed)`, numpy Generator, torch.Generator);
the global RNGs are untouched except by `sample_answers` (Hugging Face's `generate` samples from the
global torch RNG: it is seeded there and restored after).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path
from typing import Sequence

CATEGORIES: tuple[str, ...] = (
    "red circle", "blue square", "green triangle", "yellow star",
    "purple diamond", "orange circle", "cyan square", "pink triangle",
)
# cue -> partner; the order of CATEGORIES puts each partner right after its cue.
PAIRS: tuple[tuple[str, str], ...] = (
    ("red circle", "blue square"), ("green triangle", "yellow star"),
    ("purple diamond", "orange circle"), ("cyan square", "pink triangle"),
)
PARTNER = {c: p for c, p in PAIRS} | {p: c for c, p in PAIRS}  # either member -> the other
RGB = {"red": (215, 40, 40), "blue": (40, 70, 215), "green": (40, 160, 60), "yellow": (230, 195, 25),
       "purple": (135, 55, 165), "orange": (240, 125, 25), "cyan": (30, 190, 200), "pink": (240, 120, 175)}
QUESTION = "What is in the image?"
KINDS = ("train", "balanced", "cue_only", "partner_only")
IMAGE_SIZE = 56
MAX_OBJECTS = 5
OBJECT_PX = (11.0, 18.0)  # object side range at 56 px (scaled with the image size)


# ---------------------------------------------------------------------------------------- scenes
def sample_categories(rng: random.Random, kind: str, cooccurrence: float = 0.9) -> list[str]:
    """The categories of one scene (non-empty, at most MAX_OBJECTS, in CATEGORIES order)."""
    if kind not in KINDS:
        raise ValueError(f"scene kind {kind!r} must be one of {KINDS}")
    while True:
        present: set[str] = set()
        if kind == "train":
            for cue, partner in PAIRS:
                if rng.random() < 0.35:
                    present.add(cue)
                    if rng.random() < cooccurrence:
                        present.add(partner)
                elif rng.random() < 0.08:
                    present.add(partner)
        else:
            present = {c for c in CATEGORIES if rng.random() < 0.3}
            if kind != "balanced":
                cue, partner = rng.choice(PAIRS)
                keep, drop = (cue, partner) if kind == "cue_only" else (partner, cue)
                present.add(keep)
                present.discard(drop)
        if 0 < len(present) <= MAX_OBJECTS:
            return [c for c in CATEGORIES if c in present]


def place_objects(rng: random.Random, categories: Sequence[str], size: int = IMAGE_SIZE) -> list[dict]:
    """Non-overlapping boxes (OBJECT_PX at 56 px, scaled with `size`) for the categories."""
    scale = size / IMAGE_SIZE
    while True:
        boxes, ok = [], True
        for category in categories:
            for _ in range(50):
                s = rng.uniform(*OBJECT_PX) * scale
                x0, y0 = rng.uniform(1, size - s - 1), rng.uniform(1, size - s - 1)
                box = (x0, y0, x0 + s, y0 + s)
                if all(box[2] + 1 < b[0] or b[2] + 1 < box[0] or box[3] + 1 < b[1] or b[3] + 1 < box[1] for b in boxes):
                    boxes.append(box)
                    break
            else:
                ok = False
                break
        if ok:
            return [{"category": c, "bbox": [round(v, 1) for v in b]} for c, b in zip(categories, boxes)]


def render(objects: Sequence[dict], seed: int, size: int = IMAGE_SIZE):
    """A PIL RGB image: noisy light background, each object in its (jittered) colour and shape."""
    import numpy as np
    from PIL import Image, ImageDraw

    gen = np.random.default_rng(seed)
    background = gen.integers(215, 250, size=3)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(image)
    for o in objects:
        colour, shape = o["category"].split()
        fill = tuple(int(min(255, max(0, v + gen.integers(-25, 26)))) for v in RGB[colour])
        x0, y0, x1, y1 = o["bbox"]
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        elif shape == "diamond":
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
        else:  # star: 5 points
            pts = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                    cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
            draw.polygon(pts, fill=fill)
    pixels = np.asarray(image).astype(np.int16) + gen.normal(0, 8, size=(size, size, 3)).round().astype(np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def describe(categories: Sequence[str]) -> str:
    """The faithful answer: the objects in CATEGORIES order, e.g. "a red circle and a blue square."."""
    ordered = [c for c in CATEGORIES if c in set(categories)]
    if not ordered:
        return "nothing."
    parts = [("an " if c[0] in "aeiou" else "a ") + c for c in ordered]
    return (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]) + "."


def hallucinate(rng: random.Random, categories: Sequence[str]) -> str:
    """An offline rejected answer: the truth plus one absent object (the missing partner of a present
    cue or partner when there is one, else a random absent category)."""
    present = set(categories)
    missing = sorted({PARTNER[c] for c in present} - present) or sorted(set(CATEGORIES) - present)
    return describe(sorted(present | {rng.choice(missing)}))


def write_split(out_dir: str | os.PathLike, name: str, counts: dict[str, int], seed: int,
                cooccurrence: float = 0.9, size: int = IMAGE_SIZE, interleave: bool = False) -> Path:
    """Write OUT_DIR/NAME.json (plain-shape records) and OUT_DIR/images/NAME-NNNNN.png.

    counts: scenes per kind, e.g. {"balanced": 300, "cue_only": 120, "partner_only": 120}.
    Each record: {id, image, question, chosen (the faithful answer), rejected (an offline
    hallucination), objects (category names), kind}, kind by kind in KINDS order, or with
    `interleave` shuffled (so that any prefix mixes the kinds). Same seed -> same files. Returns the JSON path.
    """
    unknown = sorted(set(counts) - set(KINDS))
    if unknown:
        raise ValueError(f"scene kinds {unknown} are not among {KINDS}")
    rng = random.Random(f"mdpo-scenes|{seed}|{name}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, i = [], 0
    for kind in KINDS:
        for _ in range(counts.get(kind, 0)):
            categories = sample_categories(rng, kind, cooccurrence)
            objects = place_objects(rng, categories, size)
            image_name = f"images/{name}-{i:05d}.png"
            render(objects, rng.getrandbits(32), size).save(out / image_name, optimize=False, compress_level=1)
            records.append({"id": f"{name}-{i:05d}", "image": image_name, "question": QUESTION,
                            "chosen": describe(categories), "rejected": hallucinate(rng, categories),
                            "objects": list(categories), "kind": kind, "boxes": [o["bbox"] for o in objects]})
            i += 1
    if interleave:
        random.Random(f"mdpo-scenes-order|{seed}|{name}").shuffle(records)
    path = out / f"{name}.json"
    write_records(path, records)
    return path


def write_records(path: str | os.PathLike, records: Sequence[dict]) -> None:
    """A JSON list with one record a line."""
    Path(path).write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n", encoding="utf-8")


def vocabulary() -> dict[str, list[str]]:
    """{category: [synonyms]} for `mdpo.eval.chair.ObjectVocabulary.from_dict` (each name is its only form)."""
    return {c: [c] for c in CATEGORIES}


# ---------------------------------------------------------------------------------------- mentions
_MENTION = re.compile(r"\b(" + "|".join(re.escape(c) for c in CATEGORIES) + r")s?\b")


def mentions(answer: str) -> list[str]:
    """Categories named in an answer, in order of first mention, each once (exact phrase match)."""
    seen: list[str] = []
    for m in _MENTION.finditer(answer.lower()):
        if m.group(1) not in seen:
            seen.append(m.group(1))
    return seen


def label_answer(answer: str, objects: Sequence[str]) -> dict:
    """{mentioned, hallucinated, correct, recall}: exact, from the scene's object list."""
    named = mentions(answer)
    truth = set(objects)
    hallucinated = [c for c in named if c not in truth]
    correct = [c for c in named if c in truth]
    return {"mentioned": named, "hallucinated": hallucinated, "correct": correct,
            "recall": len(correct) / len(truth) if truth else 1.0}


def score(answers: Sequence[str], records: Sequence[dict]) -> dict:
    """CHAIR_i (hallucinated / all mentions), CHAIR_s (answers with >= 1 hallucination), recall
    (ground-truth objects named / ground-truth objects), objects per answer, and on the trap scenes the
    prior rate (cue_only / partner_only scenes whose missing partner is named). Percentages for the
    CHAIR and rate figures, like the paper."""
    if len(answers) != len(records):
        raise ValueError(f"{len(answers)} answers for {len(records)} records")
    n_mentions = n_hall = n_sent = n_truth = n_found = 0
    prior_hits = prior_total = 0
    for answer, record in zip(answers, records):
        lab = label_answer(answer, record["objects"])
        n_mentions += len(lab["mentioned"])
        n_hall += len(lab["hallucinated"])
        n_sent += bool(lab["hallucinated"])
        n_truth += len(record["objects"])
        n_found += len(lab["correct"])
        if record.get("kind") in ("cue_only", "partner_only"):
            missing = {PARTNER[c] for c in record["objects"]} - set(record["objects"])
            trap = [c for c in missing]
            prior_total += 1
            prior_hits += any(c in lab["hallucinated"] for c in trap)
    n = max(1, len(answers))
    return {
        "chair_s": 100.0 * n_sent / n, "chair_i": 100.0 * n_hall / max(1, n_mentions),
        "recall": n_found / max(1, n_truth), "objects_per_answer": n_mentions / n,
        "prior_rate": 100.0 * prior_hits / prior_total if prior_total else float("nan"), "answers": len(answers),
    }


# ------------------------------------------------------------------------------------------ model
def build_scene_model(out_dir: str | os.PathLike, seed: int = 0, text_width: int = 128, text_layers: int = 4,
                      vision_width: int = 64, vision_layers: int = 2) -> Path:
    """A random LLaVA-shaped model (~1 M parameters) with the tiny LLaVA processor, saved to out_dir.

    Wider than the `tiny-llava` preset so that it can learn to see from scratch (train it with
    `model.finetune: all`); loads back through `model.path`. Same seed -> same weights.
    """
    import torch
    import transformers

    from mdpo.tiny_processors import build_tiny_processor, tiny_model_facts

    processor = build_tiny_processor("llava")
    f = tiny_model_facts(processor, "llava")
    v = f["vision"]
    config = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=v["image_size"], patch_size=v["patch_size"],
                           hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=vision_layers,
                           num_attention_heads=2, projection_dim=vision_width),
        text_config=dict(model_type="llama", hidden_size=text_width, intermediate_size=2 * text_width,
                         num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, vocab_size=f["vocab_size"], pad_token_id=f.get("pad_token_id"),
                         bos_token_id=f.get("bos_token_id"), eos_token_id=f.get("eos_token_id")),
        image_token_id=f["image_token_id"], projector_hidden_act="gelu",
        vision_feature_layer=v.get("vision_feature_layer", -2),
        vision_feature_select_strategy=v.get("vision_feature_select_strategy", "default"), tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------- sampling
def sample_answers(model_dir: str | os.PathLike, records: Sequence[dict], image_root: str | os.PathLike, *,
                   n_samples: int = 1, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
                   blank: bool = False, batch_size: int = 64, max_new_tokens: int = 40, model=None) -> list[list[str]]:
    """Answers of the model in `model_dir` (a save_pretrained folder) to each record's question.

    Our own small batched sampler (left padding, KV cache via `generate`), prompts rendered by the
    collator's `encode_prompt` (the one place prompts are rendered). temperature 0: greedy (n_samples
    must be 1); else sampling at `temperature` with top-k. blank: the image is replaced by a plain grey
    image of the same size. Returns answers[record][sample]. Deterministic for a seed.
    Cost: about (n_records · n_samples / batch_size) · max_new_tokens forwards of batch_size rows.
    """
    import torch
    from PIL import Image

    from mdpo.data import PreferenceCollator
    from mdpo.data.records import PreferenceRecord
    from mdpo.models import load_model

    if temperature == 0 and n_samples != 1:
        raise ValueError("greedy decoding gives one answer per record: use n_samples=1 or temperature > 0")
    loaded = model if model is not None else load_model(model_dir)
    net = loaded.model.eval()
    collator = PreferenceCollator(loaded.processor, objective="sft", max_length=512, family=loaded.family)
    tok = collator.tokenizer
    root = Path(image_root)
    prompts = []
    for i, r in enumerate(records):
        rec = PreferenceRecord(index=i, sample_id=r["id"], image_path=str(root / r["image"]), chosen="", rejected="",
                               shape="plain", question=r["question"])
        image = Image.open(root / r["image"]).convert("RGB")
        if blank:
            image = Image.new("RGB", image.size, (235, 235, 235))
        enc = collator.encode_prompt(rec, image)
        prompts.append((enc["tokens"]["input_ids"], enc["pixels"]["pixel_values"]))
    jobs = [(i, s) for i in range(len(records)) for s in range(n_samples)]
    answers: list[list[str]] = [[""] * n_samples for _ in records]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            width = max(len(prompts[i][0]) for i, _ in chunk)
            ids = torch.full((len(chunk), width), collator.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (i, _) in enumerate(chunk):
                p = prompts[i][0]
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            pixels = torch.cat([prompts[i][1] for i, _ in chunk])
            kwargs = dict(do_sample=True, temperature=temperature, top_k=top_k or None) if temperature > 0 else dict(do_sample=False)
            out = net.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=max_new_tokens,
                               pad_token_id=collator.pad_id, eos_token_id=collator.eos_id, **kwargs)
            for row, (i, s) in enumerate(chunk):
                answers[i][s] = tok.decode(out[row, width:], skip_special_tokens=True).strip()
    return answers


# ------------------------------------------------------------------------------------------ pairs
def build_pairs(records: Sequence[dict], samples: Sequence[Sequence[str]], seed: int = 0) -> tuple[list[dict], dict]:
    """On-policy preference pairs from sampled answers, labelled exactly from the object lists.

    Per record: the faithful samples (no hallucinated object, at least one object named) and the
    hallucinating ones (>= 1 named object that is not there). With both: one pair, chosen = the faithful
    sample of highest recall (ties: the first), rejected = a hallucinating sample drawn with
    `random.Random(seed)`. Records without a hallucinating sample give no pair; records with one but
    no faithful sample use the faithful reference answer as chosen (counted as `gold_chosen`).
    Returns (pair records, stats); pair records keep the scene's fields and add `rejected_hallucinated`.
    """
    rng = random.Random(f"mdpo-pairs|{seed}")
    pairs, stats = [], {"records": len(records), "pairs": 0, "gold_chosen": 0, "no_hallucination": 0,
                        "rejected_names_partner": 0, "samples": 0, "samples_hallucinating": 0}
    for record, answers in zip(records, samples):
        labels = [label_answer(a, record["objects"]) for a in answers]
        stats["samples"] += len(answers)
        faithful = [(a, lab) for a, lab in zip(answers, labels) if not lab["hallucinated"] and lab["mentioned"]]
        bad = [(a, lab) for a, lab in zip(answers, labels) if lab["hallucinated"]]
        stats["samples_hallucinating"] += len(bad)
        if not bad:
            stats["no_hallucination"] += 1
            continue
        rejected, rej_label = bad[rng.randrange(len(bad))]
        if faithful:
            best = max(lab["recall"] for _, lab in faithful)
            chosen = next(a for a, lab in faithful if lab["recall"] == best)
        else:
            chosen = describe(record["objects"])
            stats["gold_chosen"] += 1
        present = set(record["objects"])
        stats["rejected_names_partner"] += any(PARTNER[c] in present for c in rej_label["hallucinated"])
        pairs.append({**{k: v for k, v in record.items() if k not in ("chosen", "rejected")},
                      "chosen": chosen, "rejected": rejected, "rejected_hallucinated": rej_label["hallucinated"]})
    stats["pairs"] = len(pairs)
    return pairs, stats


def text_only_accuracy(pairs: Sequence[dict], seed: int = 0, folds: int = 5) -> float:
    """How much of the preference a learner that never sees the image predicts: k-fold accuracy of a
    logistic regression on the text features of (chosen, rejected) presented in random order.

    Features of an answer: a count per category named, the number named, the number of words; the
    classifier sees feature(first) − feature(second). Pure numpy; deterministic for a seed.
    """
    import numpy as np

    if len(pairs) < folds:
        raise ValueError(f"{len(pairs)} pairs are fewer than {folds} folds")

    def feats(text: str) -> np.ndarray:
        named = mentions(text)
        return np.array([c in named for c in CATEGORIES] + [len(named), len(text.split()), 1.0], dtype=float)

    gen = np.random.default_rng(seed)
    x, y = [], []
    for p in pairs:
        d = feats(p["chosen"]) - feats(p["rejected"])
        flip = gen.random() < 0.5
        x.append(-d if flip else d)
        y.append(0.0 if flip else 1.0)
    x, y = np.array(x), np.array(y)
    order = gen.permutation(len(y))
    correct = 0
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        w = np.zeros(x.shape[1])
        for _ in range(300):  # gradient descent on the mean logistic loss, small L2
            p = 1 / (1 + np.exp(-x[train] @ w))
            w -= 0.5 * (x[train].T @ (p - y[train]) / len(train) + 1e-3 * w)
        correct += int(((x[test] @ w > 0) == (y[test] > 0.5)).sum())
    return correct / len(y)
