"""Deterministic synthetic image-caption data: 1-3 coloured shapes on a simple background.

Sample ``id`` is a pure function of ``(seed, id)``: all randomness comes from
``np.random.default_rng([seed, id])`` consumed in a fixed order (scene, image, captions,
tags), so the data do not depend on sharding, worker count or generation order.

Each sample has an RGB image, 5 distinct captions that name every object's colour and
shape (sometimes its size and position, and the background), a multi-hot label vector
over :data:`LABEL_NAMES` and a noisy bag-of-words tag vector over :data:`TAG_VOCAB`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from xmdist.data.writer import encode_jpeg, encode_json, encode_npy

CAPTIONS_PER_IMAGE = 5
MEMBERS = ("jpg", "json", "labels.npy", "tags.npy")
SUPERSAMPLE = 4  # draw at 4x and downsample for antialiased edges
TAG_DROP_PROB = 0.2

# Word choices: the first entry is preferred (see _pick) so the wording stays mostly consistent.
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "round disc"), "square": ("square",), "triangle": ("triangle",),
    "star": ("star",), "cross": ("cross", "plus sign"), "diamond": ("diamond", "rhombus"),
    "hexagon": ("hexagon",), "heart": ("heart",), "ring": ("ring", "donut"),
    "crescent": ("crescent", "moon"),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (40, 170, 60), "blue": (35, 75, 225), "yellow": (245, 215, 35),
    "purple": (135, 50, 185), "orange": (250, 135, 25), "pink": (250, 135, 200),
    "brown": (125, 75, 35), "cyan": (40, 215, 225), "white": (250, 250, 250), "black": (15, 15, 15),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {c: (c,) for c in COLOURS} | {
    "purple": ("purple", "violet"), "cyan": ("cyan", "turquoise")}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("medium", "medium sized"),
              "large": ("large", "big")}
_SIZE_RADIUS = {"small": (0.08, 0.11), "medium": (0.13, 0.17), "large": (0.21, 0.26)}  # of image side
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "in the upper left corner"), "top": ("at the top",),
    "top right": ("in the top right corner", "in the upper right corner"), "left": ("on the left",),
    "center": ("in the center", "in the middle"), "right": ("on the right",),
    "bottom left": ("in the bottom left corner", "in the lower left corner"),
    "bottom": ("at the bottom",),
    "bottom right": ("in the bottom right corner", "in the lower right corner"),
}  # row-major 3x3 grid of cells
BACKGROUND_WORDS = {"dark": ("dark",), "light": ("light", "pale"), "gray": ("gray", "grey"),
                    "gradient": ("gradient", "shaded"), "striped": ("striped",),
                    "noisy": ("noisy", "grainy")}
# Representative background colours; object colours closer than _MIN_CONTRAST are excluded.
_BG_TONES = {"dark": [(30, 30, 38)], "light": [(228, 224, 212)], "gray": [(128, 128, 128)],
             "gradient": [(45, 45, 55), (125, 125, 130), (205, 205, 210)],
             "striped": [(75, 75, 85), (165, 165, 175)], "noisy": [(128, 128, 128)]}
_MIN_CONTRAST = 90.0
ALLOWED_COLOURS = {bg: tuple(c for c, rgb in COLOURS.items()
                             if min(math.dist(rgb, t) for t in tones) > _MIN_CONTRAST)
                   for bg, tones in _BG_TONES.items()}

SHAPES, BACKGROUNDS, POSITIONS = tuple(SHAPE_WORDS), tuple(BACKGROUND_WORDS), tuple(POSITION_WORDS)
LABEL_NAMES: tuple[str, ...] = (*SHAPES, *COLOURS, "multiple objects", "three objects",
                                *(f"{s} object" for s in SIZE_WORDS),
                                *(f"{b} background" for b in BACKGROUNDS))
_LABEL_INDEX = {name: i for i, name in enumerate(LABEL_NAMES)}

# Caption templates as (one object, several objects). {objs}: object phrases joined with
# commas/"and"; {bg}: background word; {count}: "two"/"three"; {noun}: "shapes"/"objects".
_TEMPLATES = (
    ("{objs}", "{objs}"),
    ("{objs} on a {bg} background", "{objs} on a {bg} background"),
    ("{objs}", "{objs}"),  # every object's position is named (see _POSITIONAL)
    ("a picture of {objs}", "a picture of {count} {noun}: {objs}"),
    ("there is {objs} in the image", "there are {count} {noun} in the image: {objs}"),
    ("a {bg} background with {objs}", "a {bg} background with {count} {noun}: {objs}"),
    ("an image showing {objs}", "an image showing {count} {noun}, {objs}"),
    ("{objs} drawn on a {bg} background", "{count} {noun} drawn on a {bg} background: {objs}"),
)
_POSITIONAL = 2
_COUNT_WORDS = {2: "two", 3: "three"}
_NOUNS = ("shapes", "objects")

STOPWORDS = frozenset("a an and at in of on one the there is are with".split())
NOISE_TAGS = ("2010", "2012", "abstract", "art", "canon", "colorful", "design", "digital",
              "explore", "flickr", "geometry", "graphic", "hdr", "minimal", "nikon", "pattern",
              "photo", "sketch", "vintage", "wallpaper")
_WORD = re.compile(r"[a-z0-9]+")


def content_words(text: str) -> list[str]:
    """Lower-case words of ``text`` without stopwords (the words that become tags)."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


def _caption_words() -> set[str]:
    phrases = [*_COUNT_WORDS.values(), *_NOUNS, *(re.sub(r"\{\w+\}", " ", t) for p in _TEMPLATES for t in p)]
    for table in (SHAPE_WORDS, COLOUR_WORDS, SIZE_WORDS, POSITION_WORDS, BACKGROUND_WORDS):
        phrases += [w for words in table.values() for w in words]
    return {w for p in phrases for w in content_words(p)}


TAG_VOCAB: tuple[str, ...] = tuple(sorted(_caption_words() | set(NOISE_TAGS)))
_TAG_INDEX = {w: i for i, w in enumerate(TAG_VOCAB)}
assert not _caption_words() & set(NOISE_TAGS), "noise tags must not be caption words"


@dataclass(frozen=True)
class SceneObject:
    """One shape; ``cx``, ``cy`` and ``radius`` are fractions of the image side."""
    shape: str
    colour: str
    size: str  # key of SIZE_WORDS
    position: str  # key of POSITION_WORDS: the grid cell holding the centre
    cx: float
    cy: float
    radius: float
    angle: float  # rotation in degrees


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str  # key of BACKGROUND_WORDS


@dataclass(frozen=True)
class SyntheticSample:
    id: int
    scene: Scene
    image: Image.Image
    captions: tuple[str, ...]
    labels: np.ndarray  # uint8 (len(LABEL_NAMES),)
    tags: np.ndarray  # uint8 (len(TAG_VOCAB),)


def _layout(rng: np.random.Generator, n: int) -> list[tuple[str, str, float, float, float]]:
    """(size, cell, cx, cy, radius) for n objects in distinct cells without overlaps."""
    for attempt in range(50):
        last = attempt == 49  # last resort: small unjittered objects in distinct cells never overlap
        sizes = ["small"] * n if last else [str(s) for s in rng.choice(list(SIZE_WORDS), n)]
        if sizes.count("large") > 1:
            continue
        jitter = 0.0 if last else 0.04
        cells = rng.choice(len(POSITIONS), n, replace=False)
        out = []
        for size, cell in zip(sizes, cells):
            r = float(rng.uniform(*_SIZE_RADIUS[size]))
            row, col = divmod(int(cell), 3)
            centre = (np.array([col, row]) + 0.5) / 3 + rng.uniform(-jitter, jitter, 2)
            cx, cy = centre.clip(r + 0.01, 0.99 - r)
            out.append((size, POSITIONS[cell], float(cx), float(cy), r))
        if all(math.dist(a[2:4], b[2:4]) > a[4] + b[4] + 0.02 for i, a in enumerate(out) for b in out[i + 1:]):
            return out
    raise AssertionError("unreachable: the last attempt always fits")


def sample_scene(rng: np.random.Generator) -> Scene:
    """Random background and 1-3 objects with distinct (shape, colour) pairs."""
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    colours = ALLOWED_COLOURS[background]
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    kinds: list[tuple[str, str]] = []
    while len(kinds) < n:
        kind = (SHAPES[rng.integers(len(SHAPES))], colours[rng.integers(len(colours))])
        if kind not in kinds:
            kinds.append(kind)
    objects = tuple(SceneObject(shape, colour, size, cell, cx, cy, r, float(rng.uniform(-15, 15)))
                    for (shape, colour), (size, cell, cx, cy, r) in zip(kinds, _layout(rng, n)))
    return Scene(objects, background)


def _regular(radii: Sequence[float]) -> list[tuple[float, float]]:
    """Unit-scale polygon with vertices at equal angular steps, the first pointing up."""
    step = 2 * math.pi / len(radii)
    return [(r * math.sin(i * step), -r * math.cos(i * step)) for i, r in enumerate(radii)]


def _heart(points: int = 64) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # y in [-12, 17]
    return [(float(a) / 18, (float(b) - 2.5) / 18) for a, b in zip(x, y)]


_W = 0.33  # half arm width of the cross
# Polygons in unit coordinates (y down), all within the unit circle so radius bounds the shape.
_POLYGONS = {
    "square": [(-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)],
    "diamond": [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)],  # taller than wide: never a rotated square
    "triangle": _regular([1.0] * 3),
    "hexagon": _regular([1.0] * 6),
    "star": _regular([1.0, 0.45] * 5),
    "cross": [(-_W, -0.94), (_W, -0.94), (_W, -_W), (0.94, -_W), (0.94, _W), (_W, _W),
              (_W, 0.94), (-_W, 0.94), (-_W, _W), (-0.94, _W), (-0.94, -_W), (-_W, -_W)],
    "heart": _heart(),
}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float) -> None:
    """Draw ``shape`` as 255 on an "L" mask (holes as 0), centred at (cx, cy) with radius r."""
    def disc(x: float, y: float, rr: float, fill: int) -> None:
        draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=fill)

    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))

    def place(x: float, y: float) -> tuple[float, float]:  # unit coordinates -> rotated pixels
        return cx + r * (c * x - s * y), cy + r * (s * x + c * y)

    if shape in _POLYGONS:
        draw.polygon([place(x, y) for x, y in _POLYGONS[shape]], fill=255)
    elif shape == "circle":
        disc(cx, cy, r, 255)
    elif shape == "ring":
        disc(cx, cy, r, 255)
        disc(cx, cy, 0.55 * r, 0)
    elif shape == "crescent":  # a disc with an offset disc cut out, opening up-right (rotated)
        disc(cx, cy, r, 255)
        disc(*place(0.32, -0.32), 0.85 * r, 0)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size*SUPERSAMPLE)^2 x 3 uint8 background; brightness jittered slightly per image."""
    big = size * SUPERSAMPLE
    tones = np.array(_BG_TONES[kind], dtype=np.float32) + rng.integers(-12, 13)
    if kind == "gradient":
        t = np.linspace(0.0, 1.0, big, dtype=np.float32)[:, None, None]
        arr = np.broadcast_to(tones[0] + t * (tones[-1] - tones[0]), (big, big, 3))
        arr = np.rot90(arr, k=int(rng.integers(4)))  # one of four directions
    elif kind == "striped":
        width = int(rng.integers(3, 7)) * SUPERSAMPLE
        y, x = np.mgrid[0:big, 0:big]
        coord = [y, x, x + y][int(rng.integers(3))]  # horizontal, vertical or diagonal stripes
        arr = tones[(coord // width) % 2]
    elif kind == "noisy":  # per output pixel noise, upsampled so downsampling keeps it
        small = tones[0] + rng.normal(0.0, 22.0, (size, size, 1)).astype(np.float32)
        arr = np.repeat(np.repeat(small, SUPERSAMPLE, 0), SUPERSAMPLE, 1)
    else:
        arr = np.broadcast_to(tones[0], (big, big, 3))
    return np.ascontiguousarray(np.clip(arr, 0, 255).astype(np.uint8))


def render_image(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` at SUPERSAMPLE x resolution and downsample to an RGB image_size^2 image."""
    big = image_size * SUPERSAMPLE
    canvas = Image.fromarray(_background(scene.background, image_size, rng), "RGB")
    for obj in scene.objects:
        mask = Image.new("L", (big, big), 0)
        _draw_shape(ImageDraw.Draw(mask), obj.shape, obj.cx * big, obj.cy * big, obj.radius * big, obj.angle)
        canvas.paste(COLOURS[obj.colour], mask=mask)
    return canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _pick(options: Sequence[str], rng: np.random.Generator, preferred: float = 0.8) -> str:
    """The first option with probability ``preferred``, else a uniformly chosen alternative."""
    if len(options) == 1 or rng.random() < preferred:
        return options[0]
    return options[1 + int(rng.integers(len(options) - 1))]


def _object_phrase(obj: SceneObject, rng: np.random.Generator, with_position: bool) -> str:
    words = [_pick(SIZE_WORDS[obj.size], rng)] if rng.random() < 0.35 else []
    words += [_pick(COLOUR_WORDS[obj.colour], rng), _pick(SHAPE_WORDS[obj.shape], rng)]
    det = "one" if rng.random() < 0.15 else ("an" if words[0][0] in "aeiou" else "a")
    if with_position:
        words.append(_pick(POSITION_WORDS[obj.position], rng))
    return " ".join([det, *words])


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _caption(scene: Scene, template: int, rng: np.random.Generator) -> str:
    objs = list(scene.objects)
    if len(objs) > 1 and rng.random() < 0.5:  # vary the order objects are named in
        objs = [objs[i] for i in rng.permutation(len(objs))]
    phrases = [_object_phrase(o, rng, template == _POSITIONAL or rng.random() < 0.2) for o in objs]
    text = _TEMPLATES[template][len(objs) > 1]
    return text.format(objs=_join(phrases), bg=_pick(BACKGROUND_WORDS[scene.background], rng),
                       count=_COUNT_WORDS.get(len(objs), ""), noun=_pick(_NOUNS, rng, 0.5)) + "."


def make_captions(scene: Scene, rng: np.random.Generator, n: int = CAPTIONS_PER_IMAGE) -> tuple[str, ...]:
    """``n`` distinct captions, from different templates while there are enough of them."""
    captions: list[str] = []
    order = rng.permutation(len(_TEMPLATES))
    for attempt in range(100 * n):
        caption = _caption(scene, int(order[attempt % len(order)]), rng)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == n:
                return tuple(captions)
    raise RuntimeError(f"could not make {n} distinct captions for {scene}")


def scene_labels(scene: Scene) -> np.ndarray:
    """uint8 multi-hot vector over LABEL_NAMES."""
    names = {f"{scene.background} background"}
    for o in scene.objects:
        names |= {o.shape, o.colour, f"{o.size} object"}
    if len(scene.objects) > 1:
        names.add("multiple objects")
    if len(scene.objects) == 3:
        names.add("three objects")
    labels = np.zeros(len(LABEL_NAMES), dtype=np.uint8)
    labels[[_LABEL_INDEX[n] for n in sorted(names)]] = 1
    return labels


def caption_tags(captions: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """uint8 bag of words over TAG_VOCAB: caption words kept with p=0.8 plus 1-3 noise tags."""
    words = sorted({w for c in captions for w in content_words(c)})
    kept = [w for w, u in zip(words, rng.random(len(words))) if u >= TAG_DROP_PROB]
    noise = rng.choice(NOISE_TAGS, size=int(rng.integers(1, 4)), replace=False)
    tags = np.zeros(len(TAG_VOCAB), dtype=np.uint8)
    tags[[_TAG_INDEX[w] for w in [*kept, *noise]]] = 1
    return tags


def generate_sample(seed: int, sample_id: int, image_size: int = 64) -> SyntheticSample:
    """Sample ``sample_id`` of the synthetic data set with the given seed (deterministic)."""
    rng = np.random.default_rng([seed, sample_id])
    scene = sample_scene(rng)
    image = render_image(scene, image_size, rng)
    captions = make_captions(scene, rng)
    return SyntheticSample(sample_id, scene, image, captions, scene_labels(scene), caption_tags(captions, rng))


def assign_split(sample_id: int, num_val: int, num_test: int) -> str:
    """Ids [0, test) are test, [test, test + val) are val, the rest train."""
    if sample_id < num_test:
        return "test"
    return "val" if sample_id < num_test + num_val else "train"


def encode_sample(sample: SyntheticSample, split: str) -> dict[str, bytes]:
    """Tar members (extension -> bytes) of one sample, as in shards/README.md."""
    meta = {"id": sample.id, "split": split, "captions": list(sample.captions)}
    return {"jpg": encode_jpeg(sample.image, quality=90), "json": encode_json(meta),
            "labels.npy": encode_npy(sample.labels), "tags.npy": encode_npy(sample.tags)}


def make_record(sample_id: int, *, seed: int, image_size: int, num_val: int,
                num_test: int) -> tuple[str, str, dict[str, bytes]]:
    """(key, split, members) of one sample; picklable entry point for worker pools."""
    split = assign_split(sample_id, num_val, num_test)
    return f"{sample_id:09d}", split, encode_sample(generate_sample(seed, sample_id, image_size), split)


def info_fields(seed: int, image_size: int) -> dict[str, Any]:
    """The ``_info.json`` fields describing the synthetic source (besides members/splits)."""
    return {"source": "synthetic", "seed": seed, "image_size": image_size,
            "captions_per_image": CAPTIONS_PER_IMAGE, "label_names": list(LABEL_NAMES),
            "tag_vocab": list(TAG_VOCAB)}
