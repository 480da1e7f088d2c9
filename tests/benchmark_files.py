"""Small benchmark files in the released formats, for the POPE / AMBER / answers-file tests: an AMBER folder
(data/query, annotations.json, relation.json, safe_words.txt) whose figures are worked by hand in
tests/test_amber.py, and POPE questions about a few drawn images."""
import json
from pathlib import Path

AMBER_ANNOTATIONS = [
    {"id": 1, "type": "generative", "truth": ["dog", "grass"], "hallu": ["cat", "car"]},
    {"id": 2, "type": "generative", "truth": ["person", "person"], "hallu": ["bird"]},  # a repeated truth object
    {"id": 3, "type": "discriminative-hallucination", "truth": "yes"},
    {"id": 4, "type": "discriminative-hallucination", "truth": "no"},
    {"id": 5, "type": "discriminative-attribute-state", "truth": "no"},
    {"id": 6, "type": "discriminative-attribute-number", "truth": "yes"},
    {"id": 7, "type": "discriminative-attribute-action", "truth": "no"},
    {"id": 8, "type": "discriminative-relation", "truth": "no"},
    {"id": 9, "type": "relation", "truth": "yes"},
]
AMBER_RELATION = {"dog": ["puppy"], "grass": ["ground"], "cat": ["kitten"], "car": [], "person": ["man", "woman"],
                  "bird": [], "ground": ["floor"], "tree": [], "sign": []}
AMBER_SAFE_WORDS = ["sign", "light"]


def make_amber_dir(root: Path, images: bool = False) -> Path:
    """AMBER's layout under root (data/...); with images, root/image/AMBER_<n>.jpg (tiny, two colours)."""
    data = root / "data"
    (data / "query").mkdir(parents=True, exist_ok=True)
    (data / "annotations.json").write_text(json.dumps(AMBER_ANNOTATIONS))
    (data / "relation.json").write_text(json.dumps(AMBER_RELATION))
    (data / "safe_words.txt").write_text("\n".join(AMBER_SAFE_WORDS))
    image_of = {1: 1, 2: 2, 3: 1, 4: 1, 5: 2, 6: 2, 7: 1, 8: 2, 9: 1}
    queries = [{"id": a["id"], "image": f"AMBER_{image_of[a['id']]}.jpg",
                "query": "Describe this image." if a["type"] == "generative" else f"Is there a thing number {a['id']} in this image?"}
               for a in AMBER_ANNOTATIONS]
    files = {"query_all.json": queries, "query_generative.json": queries[:2], "query_discriminative.json": queries[2:],
             "query_discriminative-existence.json": queries[2:4], "query_discriminative-attribute.json": queries[4:7],
             "query_discriminative-relation.json": queries[7:]}
    for name, rows in files.items():
        (data / "query" / name).write_text(json.dumps(rows, indent=1))
    if images:
        from PIL import Image

        (root / "image").mkdir(exist_ok=True)
        for n, colour in ((1, (200, 30, 30)), (2, (30, 30, 200))):
            Image.new("RGB", (40, 40), colour).save(root / "image" / f"AMBER_{n}.jpg")
    return root


def make_pope_questions(root: Path, n_images: int = 2) -> Path:
    """POPE's format, 3 yes/no pairs per image, images root/img<k>.png."""
    from PIL import Image

    rows = []
    objects = ["dog", "car", "person", "bus", "cat", "kite"]
    for k in range(n_images):
        Image.new("RGB", (40, 40), (60 * k % 255, 120, 200)).save(root / f"img{k}.png")
        for j in range(3):
            for label, name in (("yes", objects[j]), ("no", objects[j + 3])):
                rows.append({"question_id": len(rows) + 1, "image": f"img{k}.png",
                             "text": f"Is there a {name} in the image?", "label": label})
    path = root / "coco_pope_random.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
