"""A small synthetic preference dataset: rendered scenes, image-dependent questions, faithful
chosen answers and hallucinated rejected ones (`mdpo-data make-sample`).

Each scene is a light background with 1–4 shapes (circle, square, triangle) in distinct cells of a
3×3 grid, each with a colour. Questions ask for a count, a colour, whether an object is there, where
an object is, or a description, so the answer can only be known from the image. The rejected answer
changes one fact (a wrong count, colour or position, a missing or an invented object). Every record
keeps the scene's exact object list (`objects`: shape, colour, position, bbox in pixels) for
hallucination metrics.

Output: OUT_DIR/data.json (a JSON list of plain-shape records) and OUT_DIR/images/NNNNN.png, and with
n_eval > 0 a held-out OUT_DIR/eval.json (images/eval-NNNNN.png), drawn after the training records so
that data.json does not depend on n_eval. The random generator is `random.Random(seed)`: the same
seed writes the same files.

`make_scene_sample` (`mdpo-data make-sample OUT_DIR --scenes`) also writes OUT_DIR/scenes/: the
co-occurrence scenes of `mdpo.data.scenes` (a language prior to fall into) for the README's main job,
with a small random LLaVA-shaped model to train on them (see that function).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 170),
    "orange": (245, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
# 3×3 grid cells, named as a person would name them.
POSITIONS = {
    (0, 0): "top left", (1, 0): "top", (2, 0): "top right",
    (0, 1): "left", (1, 1): "center", (2, 1): "right",
    (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right",
}
NUMBERS = ("zero", "one", "two", "three", "four", "five")
QUESTION_TYPES = ("count", "colour", "existence", "position", "describe")


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _count_sentence(shape: str, n: int) -> str:
    if n == 0:
        return f"There are no {_plural(shape, 2)} in the image."
    verb = "is" if n == 1 else "are"
    return f"There {verb} {NUMBERS[n]} {_plural(shape, n)} in the image."


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _describe(objects: list[dict]) -> str:
    parts = [f"{_a(o['colour'])} {o['shape']} at the {o['position']}" for o in objects]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"The image shows {listed}."


def render_scene(objects: list[dict], size: int, background: tuple[int, int, int]):
    """Draw the objects (each with a pixel bbox) on a plain background; returns a PIL RGB image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for o in objects:
        x0, y0, x1, y1 = o["bbox"]
        fill = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def _scene(rng: random.Random, size: int) -> list[dict]:
    cells = rng.sample(sorted(POSITIONS), rng.randint(1, 4))
    cell = size / 3
    objects = []
    for cx, cy in cells:
        extent = rng.uniform(0.55, 0.8) * cell
        mx = cx * cell + (cell - extent) / 2 + rng.uniform(-0.08, 0.08) * cell
        my = cy * cell + (cell - extent) / 2 + rng.uniform(-0.08, 0.08) * cell
        bbox = [int(round(mx)), int(round(my)), int(round(mx + extent)), int(round(my + extent))]
        objects.append({"shape": rng.choice(SHAPES), "colour": rng.choice(sorted(COLOURS)),
                        "position": POSITIONS[(cx, cy)], "bbox": bbox})
    return objects


def _question(rng: random.Random, objects: list[dict]) -> tuple[str, str, str, str]:
    """(question type, question, faithful answer, hallucinated answer) for a scene."""
    kind = rng.choice(QUESTION_TYPES)
    if kind == "count":
        shape = rng.choice(SHAPES)
        n = sum(o["shape"] == shape for o in objects)
        wrong = rng.choice([k for k in range(0, 5) if k != n])
        return kind, f"How many {_plural(shape, 2)} are there in the image?", _count_sentence(shape, n), _count_sentence(shape, wrong)
    if kind == "colour":
        target = rng.choice(objects)
        others = [c for c in sorted(COLOURS) if c != target["colour"]]
        q = f"What colour is the {target['shape']} at the {target['position']}?"
        return kind, q, f"The {target['shape']} is {target['colour']}.", f"The {target['shape']} is {rng.choice(others)}."
    if kind == "existence":
        present = {(o["colour"], o["shape"]) for o in objects}
        if rng.random() < 0.5:
            target = rng.choice(objects)
            q = f"Is there {_a(target['colour'])} {target['shape']} in the image?"
            return (kind, q, f"Yes, there is {_a(target['colour'])} {target['shape']} at the {target['position']}.",
                    f"No, there is no {target['colour']} {target['shape']} in the image.")
        absent = sorted((c, s) for c in COLOURS for s in SHAPES if (c, s) not in present)
        colour, shape = rng.choice(absent)
        free = [p for p in POSITIONS.values() if p not in {o["position"] for o in objects}]
        q = f"Is there {_a(colour)} {shape} in the image?"
        return (kind, q, f"No, there is no {colour} {shape} in the image.",
                f"Yes, there is {_a(colour)} {shape} at the {rng.choice(free)}.")
    if kind == "position":
        target = rng.choice(objects)
        wrong = rng.choice([p for p in POSITIONS.values() if p != target["position"]])
        q = f"Where is the {target['colour']} {target['shape']}?"
        return kind, q, f"The {target['colour']} {target['shape']} is at the {target['position']}.", \
            f"The {target['colour']} {target['shape']} is at the {wrong}."
    # describe: the rejected description invents one object (or drops one when the scene is full)
    chosen = _describe(objects)
    used = {o["position"] for o in objects}
    free = [p for p in POSITIONS.values() if p not in used]
    invented = {"shape": rng.choice(SHAPES), "colour": rng.choice(sorted(COLOURS)), "position": rng.choice(free)}
    hallucinated = objects + [invented] if len(objects) < 4 or rng.random() < 0.5 else objects[:-1]
    return kind, "Describe the image.", chosen, _describe(hallucinated)


def _write_records(path: Path, records: list[dict]) -> None:
    # A JSON list with one record a line: easy to read, diff and grep.
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n", encoding="utf-8")


def _make_records(rng: random.Random, out: Path, n: int, image_size: int, prefix: str) -> list[dict]:
    records = []
    for i in range(n):
        objects = _scene(rng, image_size)
        background = tuple(rng.randint(225, 250) for _ in range(3))
        image_name = f"images/{prefix}{i:05d}.png"
        render_scene(objects, image_size, background).save(out / image_name, optimize=False, compress_level=1)
        kind, question, chosen, rejected = _question(rng, objects)
        records.append({
            "id": f"sample-{prefix}{i:05d}", "image": image_name, "question": question, "chosen": chosen,
            "rejected": rejected, "question_type": kind, "objects": objects,
        })
    return records


def make_sample(out_dir: str | os.PathLike, n: int = 200, seed: int = 0, image_size: int = 64, n_eval: int = 0) -> Path:
    """Write n records and their images to out_dir (and n_eval held-out ones); returns data.json's path."""
    if n <= 0:
        raise ValueError(f"n={n} must be positive")
    if n_eval < 0:
        raise ValueError(f"n_eval={n_eval} must be 0 or more")
    if image_size < 24:
        raise ValueError(f"image_size={image_size} must be at least 24 pixels")
    rng = random.Random(seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / "data.json"
    _write_records(path, _make_records(rng, out, n, image_size, prefix=""))
    if n_eval:
        _write_records(out / "eval.json", _make_records(rng, out, n_eval, image_size, prefix="eval-"))
    return path


def make_scene_sample(out_dir: str | os.PathLike, seed: int = 0, n_sft: int = 2000, n_pairs: int = 600,
                      n_eval: int = 200) -> Path:
    """The main job's scene data in OUT_DIR/scenes/ (see `mdpo.data.scenes`); returns that folder.

    - sft.json: n_sft co-occurrence scenes; chosen = the faithful answer (what `objective: sft` trains on);
    - pairs.json: n_pairs other scenes as offline preference pairs: chosen = the faithful answer,
      rejected = it plus one absent object, the missing partner of a present object when there is one
      (the language prior's hallucination);
    - eval.json: n_eval held-out scenes, half balanced, a quarter each cue-without-partner and
      partner-without-cue (trap scenes) in a shuffled order, with pairs of the same kind and the exact `objects` lists
      that `mdpo-eval hallucination` scores against;
    - model/: a random LLaVA-shaped model (`scenes.build_scene_model`) for `configs/tiny-cpu-sft.yaml`.
    Same seed -> same files. About 2 ms per image.
    """
    from . import scenes

    if min(n_sft, n_pairs, n_eval) <= 0:
        raise ValueError(f"n_sft={n_sft}, n_pairs={n_pairs}, n_eval={n_eval} must all be positive")
    folder = Path(out_dir) / "scenes"
    scenes.write_split(folder, "sft", {"train": n_sft}, seed=seed)
    scenes.write_split(folder, "pairs", {"train": n_pairs}, seed=seed)
    quarter = n_eval // 4
    scenes.write_split(folder, "eval", {"balanced": n_eval - 2 * quarter, "cue_only": quarter, "partner_only": quarter}, seed=seed,
                       interleave=True)  # the trainer's `eval_generate_every` answers the first questions: a mix
    scenes.build_scene_model(folder / "model", seed=seed)
    return folder
