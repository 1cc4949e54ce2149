"""Offline vision-language data that can only be answered by looking.

* ``scenes``: 1-3 shapes rendered with Pillow (colour, shape, size, position), with questions about colour,
  shape, count, spatial relations and existence, plus a caption. A scene is a pure function of its seed;
  training seeds and held-out seeds come from disjoint ranges, so the held-out split is by scene seed.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits ("what digit is this?", "is the digit even?").
* ``jsonl:PATH``: the user's own rows ``{"image": path, "prompt": ..., "answer": ...}`` (paths relative to the file).

Images are float32 arrays (C, H, W) in [-1, 1]; black (-1) is the empty background.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanogpt4.errors import UserError
from nanogpt4.utils import iter_jsonl_objects

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 70), "blue": (60, 90, 240), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three")
QUESTION_TYPES = ("colour", "shape", "count", "spatial", "exists")
EVAL_SEED_BASE = 1 << 40  # held-out scene seeds start here; training seeds stay below
MIN_OFFSET = 0.2  # spatial questions only where the centres differ by >= this fraction of the image


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    x: float  # centre, as a fraction of the image
    y: float
    r: float  # half-size, as a fraction of the image

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class VQAItem:
    image: np.ndarray  # (C, H, W) float32 in [-1, 1]
    question: str
    answer: str
    kind: str  # question type: colour, shape, count, spatial, exists, caption, digit, even, custom


# ------------------------------------------------------------------------------------------- scenes
def sample_scene(seed: int) -> list[Shape]:
    """1-3 non-overlapping shapes with distinct (colour, shape) pairs, all decided by ``seed``."""
    rng = random.Random(seed)
    n = rng.randint(1, 3)
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    shapes: list[Shape] = []
    for colour, shape in kinds:
        for _ in range(100):
            r = rng.choice((0.14, 0.19))
            x, y = rng.uniform(r + 0.02, 0.98 - r), rng.uniform(r + 0.02, 0.98 - r)
            if all(max(abs(x - o.x), abs(y - o.y)) > r + o.r + 0.03 for o in shapes):
                shapes.append(Shape(colour, shape, x, y, r))
                break
    return shapes


def render_scene(shapes: list[Shape], size: int, channels: int = 3) -> np.ndarray:
    from PIL import Image, ImageDraw

    scale = 4  # draw large and downsample: anti-aliased edges at any size
    big = size * scale
    img = Image.new("RGB", (big, big), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for s in shapes:
        cx, cy, r = s.x * big, s.y * big, s.r * big
        fill = COLOURS[s.colour]
        if s.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s.shape == "square":
            q = r * 0.9
            draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=fill)
    img = img.resize((size, size), Image.BOX)
    return to_array(img, channels)


def to_array(img, channels: int) -> np.ndarray:
    """A PIL image -> (C, H, W) float32 in [-1, 1]."""
    img = img.convert("L" if channels == 1 else "RGB")
    a = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return a[None] if channels == 1 else a.transpose(2, 0, 1).copy()


def caption(shapes: list[Shape], key=lambda s: s.x) -> str:
    """Objects from left to right (or in ``key`` order): 'a red circle, a blue square and a green triangle'."""
    names = [f"a {s.name}" for s in sorted(shapes, key=key)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def scene_questions(shapes: list[Shape], rng: random.Random) -> dict[str, tuple[str, str]]:
    """One (question, answer) per question type that this scene can ask unambiguously."""
    out: dict[str, tuple[str, str]] = {}
    by_shape = {k: [s for s in shapes if s.shape == k] for k in SHAPES}
    by_colour = {k: [s for s in shapes if s.colour == k] for k in COLOURS}
    unique_shapes = [k for k, v in by_shape.items() if len(v) == 1]
    if unique_shapes:
        k = rng.choice(unique_shapes)
        out["colour"] = (f"what colour is the {k}?", by_shape[k][0].colour)
    unique_colours = [k for k, v in by_colour.items() if len(v) == 1]
    if unique_colours:
        k = rng.choice(unique_colours)
        out["shape"] = (f"what shape is the {k} object?", by_colour[k][0].shape)
    out["count"] = ("how many objects are there?", NUMBERS[len(shapes)])
    spatial = spatial_questions(shapes, rng, 1)
    if spatial:
        out["spatial"] = spatial[0]
    if rng.random() < 0.5:
        s = rng.choice(shapes)
        out["exists"] = (f"is there a {s.name}?", "yes")
    else:
        present = {(s.colour, s.shape) for s in shapes}
        c, k = rng.choice([(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present])
        out["exists"] = (f"is there a {c} {k}?", "no")
    return out


def spatial_questions(shapes: list[Shape], rng: random.Random, n: int,
                      relations: tuple[str, ...] = ("left of", "above")) -> list[tuple[str, str]]:
    """Up to ``n`` distinct relation questions between objects whose centres are clearly apart."""
    pairs = [(a, b, rel) for a in shapes for b in shapes if a is not b for rel in relations
             if abs((a.x - b.x) if rel == "left of" else (a.y - b.y)) >= MIN_OFFSET]
    out = []
    for a, b, rel in rng.sample(pairs, min(n, len(pairs))):
        truth = a.x < b.x if rel == "left of" else a.y < b.y
        out.append((f"is the {a.name} {rel} the {b.name}?", "yes" if truth else "no"))
    return out


def scene_items(seed: int, size: int, channels: int = 3, kinds: tuple[str, ...] | None = None) -> list[VQAItem]:
    """Every question this scene asks (all types, or ``kinds``), plus its caption, on one rendered image."""
    shapes = sample_scene(seed)
    image = render_scene(shapes, size, channels)
    rng = random.Random(seed ^ 0x5EED)
    qa = scene_questions(shapes, rng)
    items = [VQAItem(image, q, a, k) for k, (q, a) in qa.items() if kinds is None or k in kinds]
    if kinds is None or "caption" in kinds:
        items.append(VQAItem(image, "describe the image.", caption(shapes), "caption"))
    return items


def train_scene_conversation(seed: int, size: int, channels: int) -> list[VQAItem]:
    """Every question of training scene ``seed`` plus its caption, in a seed-shuffled order: one multi-turn
    conversation about one image (LLaVA's instruction data is multi-turn for the same reason: one image
    encoding supervises several answers)."""
    if seed >= EVAL_SEED_BASE:
        raise ValueError("training scene seeds must stay below EVAL_SEED_BASE")
    items = scene_items(seed, size, channels)
    shapes, image = sample_scene(seed), items[0].image
    rng = random.Random(seed * 7 + 3)
    # Relations are the hardest type, and the caption (left to right) already teaches horizontal order: the
    # conversation adds up to two more relation questions, one per axis where the scene allows, and the
    # objects listed top to bottom.
    asked = {it.question for it in items}
    extra = spatial_questions(shapes, rng, 1, ("left of",)) + spatial_questions(shapes, rng, 1, ("above",))
    items += [VQAItem(image, q, a, "spatial") for q, a in dict(extra).items() if q not in asked][:2]
    if len(shapes) > 1:
        items.append(VQAItem(image, "list the objects from top to bottom.", caption(shapes, key=lambda s: s.y),
                             "caption_vertical"))
    rng.shuffle(items)
    return items


def eval_scene_items(n_scenes: int, size: int, channels: int) -> list[VQAItem]:
    """The held-out set: every question type of ``n_scenes`` scenes whose seeds training never draws."""
    return [it for i in range(n_scenes) for it in scene_items(EVAL_SEED_BASE + i, size, channels)]


# ------------------------------------------------------------------------------------------- digits
@dataclass
class Digits:
    train_images: np.ndarray  # (N, 8, 8) in [0, 1]
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_digits_split(held_out: float = 0.2, seed: int = 0) -> Digits:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the digits set needs scikit-learn (a nanogpt4 dependency that is missing here): "
                        "pip install scikit-learn, or set multimodal.data=scenes") from None
    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    n_test = int(len(order) * held_out)
    test, train = order[:n_test], order[n_test:]
    images = d.images.astype(np.float32) / 16.0
    return Digits(images[train], d.target[train], images[test], d.target[test])


def digit_image(pixels: np.ndarray, size: int, channels: int, shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """An 8x8 digit scaled up to ``size`` (nearest neighbour), optionally shifted by whole pixels."""
    if size % 8:
        raise UserError(f"digits need multimodal.image_size divisible by 8, got {size}")
    big = np.kron(pixels, np.ones((size // 8, size // 8), dtype=np.float32))
    dy, dx = shift
    if dy or dx:
        big = np.roll(big, (dy, dx), axis=(0, 1))
        if dy > 0:
            big[:dy] = 0
        elif dy < 0:
            big[dy:] = 0
        if dx > 0:
            big[:, :dx] = 0
        elif dx < 0:
            big[:, dx:] = 0
    img = big * 2.0 - 1.0
    return np.repeat(img[None], channels, axis=0).astype(np.float32)


def digit_items(pixels: np.ndarray, label: int, size: int, channels: int,
                shift: tuple[int, int] = (0, 0)) -> list[VQAItem]:
    image = digit_image(pixels, size, channels, shift)
    return [VQAItem(image, "what digit is this?", str(int(label)), "digit"),
            VQAItem(image, "is the digit even?", "yes" if int(label) % 2 == 0 else "no", "even")]


# ------------------------------------------------------------------------------------------- user data
def as_displayed(img):
    """A user's image as a viewer shows it, in 8-bit L or RGB: turned by its EXIF orientation (phone photos),
    16-bit and 32-bit greyscale scaled to 8 bits (``convert`` clips them: a 16-bit PNG came out all white),
    and transparency composited over black, the scenes' background (``convert("RGB")`` would keep whatever
    colour the transparent pixels happen to store)."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and 255 < hi <= 65535):
            a = a / 257.0  # the 16-bit range onto the 8-bit one
        elif img.mode == "F" and lo >= 0 and hi <= 1:
            a = a * 255.0  # floats in [0, 1]
        elif lo < 0 or hi > 255:
            a = (a - lo) * (255.0 / (hi - lo))  # no range to read: stretch the values over 8 bits
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if img.mode in ("L", "RGB"):
        return img
    if "A" in img.mode or "a" in img.mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img.convert("L" if img.mode == "1" else "RGB")


def load_image(path: Path, size: int, channels: int, where: str,
               fix: str = "paths are relative to the jsonl file") -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if path.is_dir():
        raise UserError(f"{where}: '{path}' is a directory, not an image; give an image file")
    if not path.is_file():
        raise UserError(f"{where}: image '{path}' not found; {fix}")
    try:
        with Image.open(path) as img:
            return to_array(as_displayed(img).resize((size, size), Image.BICUBIC), channels)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{where}: cannot read image '{path}' ({e})") from None


def load_vqa_jsonl(path: str | Path, size: int, channels: int) -> list[VQAItem]:
    """``{"image": path, "prompt": str, "answer": str, "type"?: str}`` per line -> items."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"multimodal data file '{path}' not found")
    items = []
    for line_no, row in iter_jsonl_objects(path):
        where = f"{path}:{line_no}"
        for key in ("image", "prompt", "answer"):
            if not isinstance(row.get(key), str) or (key != "image" and not row[key].strip()):
                raise UserError(f"{where}: field '{key}' must be a non-empty string")
        image = load_image(path.parent / row["image"], size, channels, where)
        items.append(VQAItem(image, row["prompt"], row["answer"], str(row.get("type", "custom"))))
    if not items:
        raise UserError(f"multimodal data file '{path}' has no rows")
    return items
