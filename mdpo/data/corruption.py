"""The corrupted image m_l of mDPO's conditional preference, Pillow only.

The corrupted image of a record is a pure function of (seed, sample id, epoch): every random number
comes from a `random.Random` seeded with a BLAKE2b hash of those three values (never the global RNG),
so the policy and the reference see the same image, in any process, and reference log-probs can be
cached. With `same_every_epoch=True` the epoch is ignored (one corrupted image per record).

Strategies (the paper's Table 3):
- `crop` (default): keep a random region of `area` = 1–20 % of the image with aspect ratio in
  `aspect` = [3/4, 4/3], resized back to the original size. `area=(0.2, 0.5)` is the paper's 20–50 %.
- `random_image`: another record's image (deterministic pick, never the record's own image file),
  resized to the original size so every branch has the same number of image tokens.
- `moco_v2`: MoCo-v2's augmentation: RandomResizedCrop(scale 0.2–1) → ColorJitter(0.4, 0.4, 0.4, 0.1)
  with p = 0.8 → grayscale with p = 0.2 → Gaussian blur σ ∈ [0.1, 2] with p = 0.5 → horizontal flip
  with p = 0.5.
- `none`: the original image (a control).
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Sequence

STRATEGIES = ("crop", "random_image", "moco_v2", "none")


@dataclass(frozen=True)
class CorruptionConfig:
    strategy: str = "crop"  # crop | random_image | moco_v2 | none
    area: tuple[float, float] = (0.01, 0.2)  # fraction of the image area a crop keeps (paper: 1–20 %)
    aspect: tuple[float, float] = (3 / 4, 4 / 3)  # width / height range of the crop
    seed: int = 0
    same_every_epoch: bool = False  # True: the epoch does not change the corrupted image

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"CorruptionConfig.strategy={self.strategy!r} must be one of {STRATEGIES}")
        object.__setattr__(self, "area", tuple(float(a) for a in self.area))
        object.__setattr__(self, "aspect", tuple(float(a) for a in self.aspect))
        low, high = self.area
        if len(self.area) != 2 or not 0 < low <= high <= 1:
            raise ValueError(f"CorruptionConfig.area={self.area} must satisfy 0 < low ≤ high ≤ 1")
        a_low, a_high = self.aspect
        if len(self.aspect) != 2 or not 0 < a_low <= a_high:
            raise ValueError(f"CorruptionConfig.aspect={self.aspect} must satisfy 0 < low ≤ high")

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide every corrupted image (for the reference-log-prob cache key)."""
        return asdict(self)


def corruption_rng(config: CorruptionConfig, sample_id: str, epoch: int, purpose: str = "") -> random.Random:
    """A private RNG for one (seed, sample id, epoch[, purpose]); the global RNGs are never touched."""
    effective_epoch = 0 if config.same_every_epoch else int(epoch)
    key = f"mdpo-corruption|{config.seed}|{sample_id}|{effective_epoch}|{purpose}".encode("utf-8")
    return random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))


def _sample_box(rng: random.Random, width: int, height: int, area: tuple[float, float], aspect: tuple[float, float]):
    """RandomResizedCrop's box sampling (torchvision's algorithm), with the kept fraction checked
    *after* rounding so the returned box always lies in `area` when such a box exists.

    returns: (left, top, right, bottom) in pixels.
    """
    total = width * height
    log_low, log_high = math.log(aspect[0]), math.log(aspect[1])
    for _ in range(20):
        target = total * rng.uniform(*area)
        ratio = math.exp(rng.uniform(log_low, log_high))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height and area[0] <= w * h / total <= area[1]:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    # Fallback (tiny or very elongated images, where the aspect range and the area range cannot both
    # hold): the box closest to a random area of the range, aspect ratio as close to 1 as possible.
    fraction = rng.uniform(*area)
    target = total * fraction
    best = None
    for h in range(1, height + 1):
        for w in (max(1, min(width, int(target / h))), max(1, min(width, int(math.ceil(target / h))))):
            frac = w * h / total
            score = (0 if area[0] <= frac <= area[1] else 1, abs(frac - fraction), abs(math.log(w / h)))
            if best is None or score < best[0]:
                best = (score, w, h)
    _, w, h = best
    left = rng.randint(0, width - w)
    top = rng.randint(0, height - h)
    return left, top, left + w, top + h


def crop_box(size: tuple[int, int], sample_id: str, epoch: int, config: CorruptionConfig) -> tuple[int, int, int, int]:
    """The box the `crop` strategy keeps for this (seed, sample id, epoch): (left, top, right, bottom).

    size: (width, height) of the original image. The kept area w·h / (W·H) lies in `config.area`
    (whenever the image has enough pixels for that) and w / h in about `config.aspect`.
    """
    width, height = size
    return _sample_box(corruption_rng(config, sample_id, epoch, "crop"), width, height, config.area, config.aspect)


def _rgb(image):
    from .records import to_rgb

    return to_rgb(image)


def _moco_v2(image, rng: random.Random):
    """MoCo-v2 augmentation (Chen et al., 2020) in Pillow; every choice drawn from `rng`."""
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    width, height = image.size
    box = _sample_box(rng, width, height, (0.2, 1.0), (3 / 4, 4 / 3))
    out = image.crop(box).resize((width, height), Image.BICUBIC)
    if rng.random() < 0.8:  # ColorJitter(brightness 0.4, contrast 0.4, saturation 0.4, hue 0.1), random order
        factors = {
            "brightness": rng.uniform(0.6, 1.4),
            "contrast": rng.uniform(0.6, 1.4),
            "saturation": rng.uniform(0.6, 1.4),
            "hue": rng.uniform(-0.1, 0.1),
        }
        order = list(factors)
        rng.shuffle(order)
        for name in order:
            if name == "brightness":
                out = ImageEnhance.Brightness(out).enhance(factors[name])
            elif name == "contrast":
                out = ImageEnhance.Contrast(out).enhance(factors[name])
            elif name == "saturation":
                out = ImageEnhance.Color(out).enhance(factors[name])
            else:  # rotate the hue channel by hue · 360°
                shift = int(round(factors[name] * 255)) % 256
                h, s, v = out.convert("HSV").split()
                h = h.point(lambda x: (x + shift) % 256)
                out = Image.merge("HSV", (h, s, v)).convert("RGB")
    if rng.random() < 0.2:
        out = ImageOps.grayscale(out).convert("RGB")
    if rng.random() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    return out


class ImagePool:
    """Candidate images for `random_image`: (sample id, image path) pairs sorted by id, so the pick
    does not depend on the order records were loaded in."""

    def __init__(self, records: Sequence[Any]):
        entries = {}
        pairs = (records.image_entries() if hasattr(records, "image_entries")  # a RecordTable: no record read
                 else ((record.sample_id, record.image_path) for record in records))
        for sample_id, image_path in pairs:
            entries.setdefault(str(sample_id), str(image_path))
        self.entries = sorted(entries.items())
        self.path_of = dict(self.entries)
        if len({path for _, path in self.entries}) < 2:
            raise ValueError("random_image needs a pool with at least two different image files")

    def pick(self, sample_id: str, own_path: str | None, rng: random.Random) -> str:
        """A path drawn with `rng` among the pool's images other than the record's own image file."""
        own_path = own_path if own_path is not None else self.path_of.get(sample_id)
        for _ in range(64):
            sid, path = self.entries[rng.randrange(len(self.entries))]
            if sid != sample_id and path != own_path:
                return path
        others = [path for sid, path in self.entries if sid != sample_id and path != own_path]
        if not others:
            raise ValueError(f"random_image: no image in the pool other than sample {sample_id!r}'s own")
        return others[rng.randrange(len(others))]


def corrupt_image(
    image,
    sample_id: str,
    epoch: int,
    config: CorruptionConfig = CorruptionConfig(),
    pool: ImagePool | Sequence[Any] | None = None,
    own_path: str | None = None,
):
    """The corrupted image m_l of one record: a function of (config.seed, sample_id, epoch) only.

    image: the record's original PIL image (any mode; the result is RGB and keeps its size).
    pool: for `random_image`, an ImagePool or the records to draw from (required there).
    own_path: the record's image file, never picked by `random_image` (two records may share a file).
    """
    from PIL import Image

    image = _rgb(image)
    strategy = config.strategy
    if strategy == "none":
        return image
    if strategy == "crop":
        box = crop_box(image.size, sample_id, epoch, config)
        return image.crop(box).resize(image.size, Image.BICUBIC)
    if strategy == "moco_v2":
        return _moco_v2(image, corruption_rng(config, sample_id, epoch, "moco_v2"))
    # random_image
    if pool is None:
        raise ValueError("corrupt_image: strategy 'random_image' needs pool= (the dataset's records or an ImagePool)")
    if not isinstance(pool, ImagePool):
        pool = ImagePool(pool)
    path = pool.pick(sample_id, own_path, corruption_rng(config, sample_id, epoch, "random_image"))
    from .records import decode_rgb

    other = decode_rgb(path)  # a huge image is decoded reduced, as the record's own image is
    return other.resize(image.size, Image.BICUBIC) if other.size != image.size else other
