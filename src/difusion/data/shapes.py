"""`shapes`: a procedural, infinite, captioned data set of coloured shapes.

The spec is fixed (the design notes; evaluators rely on it):

- canvas 32x32 RGB by default (64x64 optional; every length below scales with the
  canvas: factor k = size / 32), black background;
- six colours with exact RGB values (`COLORS`); three filled shapes (`SHAPES`):
  circle of diameter 8-13 px, axis-aligned square of side 7-12 px, upright isosceles
  triangle of base 9-14 px and height equal to the base;
- one object ("a red circle") or two ("a red circle to the left of a blue square", the
  relation one of `RELATIONS`); two objects do not overlap, differ in colour or shape,
  and their centres differ by at least 10 px along the relation's axis.

Choices within the spec (documented so the scorer can rely on them too):

- An object of size s occupies exactly an s x s pixel box (`bbox` = [left, top, right,
  bottom), right/bottom exclusive) inside the canvas; `center` = box centre (may end in
  .5). A pixel belongs to a shape when its centre lies in it (circle), or for the
  triangle when row j of the box (0 = top) covers the columns whose centres are within
  (j + 1) / 2 of the vertical axis, so the apex row is 1 or 2 px wide and the base row
  is the full base. Shapes are drawn without antialiasing: every pixel is black or
  exactly one of the six colours.
- Two objects: their boxes are at least k px apart (1 px at 32: they never touch, so
  same-coloured objects stay separate blobs), and the relation's axis dominates: the
  centre offset along it is larger than along the other axis.
- Attributes (JSON-able) of an item:
  {"size": 32, "objects": [{"color", "shape", "rgb", "center": [x, y], "size", "bbox"},
  ...], "relation": None | "to the left of" | ...}; with two objects, the caption reads
  objects[0] <relation> objects[1].
- Item i of `ShapesDataset(seed=s)` depends on (s, i) only, through a small splitmix64
  generator of our own (stable across numpy / Python versions).
- `label` (with `label=True`): colour index * 3 + shape index of objects[0] (the
  subject of the caption, the only object of a one-object image): 18 classes.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 60, 230),
    "yellow": (235, 220, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 210, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
# size range (inclusive, px) at the 32x32 canvas: circle diameter, square side, triangle base
SIZE_RANGES: dict[str, tuple[int, int]] = {
    "circle": (8, 13),
    "square": (7, 12),
    "triangle": (9, 14),
}
MIN_SEPARATION = 10  # px at 32x32, between centres along the relation's axis
MIN_GAP = 1  # px at 32x32, between the two boxes (our choice: objects never touch)
BASE_SIZE = 32
DEFAULT_SIZE = 32
CLASS_NAMES: list[str] = [f"{c} {s}" for c in COLORS for s in SHAPES]

_COLOR_NAMES = list(COLORS)
# relation -> (axis: 0 = x / 1 = y, sign: +1 when objects[0] has the smaller coordinate)
AXIS = {"to the left of": (0, 1), "to the right of": (0, -1), "above": (1, 1), "below": (1, -1)}
INVERSE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


# ----------------------------------------------------------------------------- random


class _Rng:
    """splitmix64: tiny, fast enough, and the same on every platform and version."""

    _MASK = (1 << 64) - 1

    def __init__(self, seed: int, index: int):
        self.state = (seed * 0x9E3779B97F4A7C15 + index * 0xD1B54A32D192ED03 + 1) & self._MASK
        for _ in range(2):
            self.next()

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & self._MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self._MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self._MASK
        return z ^ (z >> 31)

    def random(self) -> float:
        return (self.next() >> 11) / float(1 << 53)

    def randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi] (inclusive)."""
        return lo + self.next() % (hi - lo + 1)

    def choice(self, seq):
        return seq[self.randint(0, len(seq) - 1)]


# ----------------------------------------------------------------------------- geometry


def _scale(size: int) -> float:
    return size / BASE_SIZE


def size_range(shape: str, size: int = DEFAULT_SIZE) -> tuple[int, int]:
    """Allowed object size (px, inclusive) of `shape` on a `size` canvas."""
    lo, hi = SIZE_RANGES[shape]
    k = _scale(size)
    return round(lo * k), round(hi * k)


def shape_mask(shape: str, s: int) -> np.ndarray:
    """Boolean [s, s] mask of a shape filling an s x s box (exact integer rasterisation)."""
    j, i = np.mgrid[0:s, 0:s]  # row, column
    if shape == "circle":
        return (2 * i + 1 - s) ** 2 + (2 * j + 1 - s) ** 2 <= s * s
    if shape == "square":
        return np.ones((s, s), dtype=bool)
    if shape == "triangle":
        return np.abs(2 * i + 1 - s) <= j + 1
    raise ValueError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")


def make_object(color: str, shape: str, s: int, left: int, top: int) -> dict[str, Any]:
    """The attributes of one object of size `s` whose box has its top-left at (left, top)."""
    return {
        "color": color,
        "shape": shape,
        "rgb": list(COLORS[color]),
        "center": [left + s / 2, top + s / 2],
        "size": s,
        "bbox": [left, top, left + s, top + s],
    }


def _gap_ok(a: dict, b: dict, gap: int) -> bool:
    """Boxes at least `gap` px apart along x or along y (so they do not overlap)."""
    ax0, ay0, ax1, ay1 = a["bbox"]
    bx0, by0, bx1, by1 = b["bbox"]
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def relation_holds(a: dict, b: dict, relation: str, size: int = DEFAULT_SIZE) -> bool:
    """Whether `a relation b` holds with the spec's separation and our dominance rule."""
    axis, sign = AXIS[relation]
    d = [(b["center"][n] - a["center"][n]) for n in (0, 1)]
    along = sign * d[axis]
    return along >= MIN_SEPARATION * _scale(size) and along > abs(d[1 - axis])


def min_gap(size: int = DEFAULT_SIZE) -> int:
    """The least gap (px) between the two objects' boxes on a `size` canvas."""
    return max(1, round(MIN_GAP * _scale(size)))


def _place(rng: _Rng, spec: dict, size: int, max_tries: int = 100_000) -> dict:
    """Fill in sizes and positions for a spec with colours / shapes / relation only."""
    objs = spec["objects"]
    relation = spec.get("relation")
    gap = min_gap(size)
    sizes = [o.get("size") or rng.randint(*size_range(o["shape"], size)) for o in objs]
    for _ in range(max_tries):  # rejection sampling of the positions (sizes kept unbiased)
        placed = [
            make_object(
                o["color"], o["shape"], s, rng.randint(0, size - s), rng.randint(0, size - s)
            )
            for o, s in zip(objs, sizes, strict=True)
        ]
        if len(placed) == 1 or (
            _gap_ok(placed[0], placed[1], gap)
            and relation_holds(placed[0], placed[1], relation, size)
        ):
            return {"size": size, "objects": placed, "relation": relation}
    raise RuntimeError(f"could not place {spec} on a {size}x{size} canvas")


def _check_spec(spec: dict) -> None:
    objs = spec.get("objects") or []
    if len(objs) not in (1, 2):
        raise ValueError("a shapes spec has one or two objects")
    for o in objs:
        if o.get("color") not in COLORS or o.get("shape") not in SHAPES:
            raise ValueError(f"bad object {o}: colours {list(COLORS)}, shapes {list(SHAPES)}")
    if len(objs) == 2 and spec.get("relation") not in RELATIONS:
        raise ValueError(f"two objects need a relation among {list(RELATIONS)}")


def layout(spec: dict, size: int = DEFAULT_SIZE, seed: int = 0) -> dict:
    """Complete a spec (e.g. from `parse_prompt`) with sizes and positions -> attributes."""
    _check_spec(spec)
    return _place(_Rng(seed, 0x5EED), spec, size)


def generate(seed: int, index: int, size: int = DEFAULT_SIZE, two_object_prob: float = 0.5) -> dict:
    """The attributes of item `index` of the stream `seed` (deterministic)."""
    return _generate(_Rng(seed, index), size, two_object_prob)


def _generate(rng: _Rng, size: int, two_object_prob: float) -> dict:
    n_classes = len(CLASS_NAMES)
    first = rng.randint(0, n_classes - 1)
    if rng.random() < two_object_prob:
        second = rng.randint(0, n_classes - 2)
        second += second >= first  # any of the 17 other colour-shape pairs
        classes, relation = [first, second], rng.choice(RELATIONS)
    else:
        classes, relation = [first], None
    objs = [{"color": _COLOR_NAMES[c // 3], "shape": SHAPES[c % 3]} for c in classes]
    return _place(rng, {"objects": objs, "relation": relation}, size)


# ----------------------------------------------------------------------------- rendering


def render_array(attributes: dict, size: int | None = None) -> np.ndarray:
    """uint8 [size, size, 3] image of fully specified attributes (see `render`)."""
    canvas = attributes.get("size", DEFAULT_SIZE)
    size = size or canvas
    k = size / canvas
    img = np.zeros((size, size, 3), dtype=np.uint8)
    for o in attributes["objects"]:
        left, top, right, _ = (round(v * k) for v in o["bbox"])
        s = right - left
        m = shape_mask(o["shape"], s)
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + s, size), min(left + s, size)
        if y1 <= y0 or x1 <= x0:
            continue
        region = img[y0:y1, x0:x1]
        region[m[y0 - top : y1 - top, x0 - left : x1 - left]] = COLORS[o["color"]]
    return img


def render(spec: dict, size: int | None = None) -> Image.Image:
    """Draw a spec as a PIL RGB image.

    A full spec (attributes, with each object's `bbox`) is drawn as is, scaled when `size`
    differs from its own canvas size; a partial one (colours / shapes / relation, as
    `parse_prompt` returns) is first placed by `layout(spec, size, seed=0)`.
    """
    if not all("bbox" in o for o in spec.get("objects", [])):
        spec = layout(spec, size or spec.get("size") or DEFAULT_SIZE)
    return Image.fromarray(render_array(spec, size), "RGB")


# ----------------------------------------------------------------------------- captions


LANGUAGES = ("en", "es", "both")  # the captions' language; "both": either, at random
# Spanish: adjectives agree with their noun (every shape's noun is masculine, "figura" is not)
COLORS_ES: dict[str, dict[str, str]] = {
    "red": {"m": "rojo", "f": "roja"},
    "green": {"m": "verde", "f": "verde"},
    "blue": {"m": "azul", "f": "azul"},
    "yellow": {"m": "amarillo", "f": "amarilla"},
    "magenta": {"m": "magenta", "f": "magenta"},
    "cyan": {"m": "cian", "f": "cian"},
}
SHAPES_ES: dict[str, tuple[str, str]] = {  # noun, gender
    "circle": ("círculo", "m"),
    "square": ("cuadrado", "m"),
    "triangle": ("triángulo", "m"),
}
INDEFINITE_ES = {"m": "un", "f": "una"}
# the canonical Spanish relation first, then the variants training captions also use
RELATIONS_ES: dict[str, tuple[str, ...]] = {
    "to the left of": ("a la izquierda de", "al lado izquierdo de"),
    "to the right of": ("a la derecha de", "al lado derecho de"),
    "above": ("encima de", "sobre", "arriba de"),
    "below": ("debajo de", "bajo", "abajo de"),
}
_ITS_ES = {
    "to the left of": "a su izquierda",
    "to the right of": "a su derecha",
    "above": "encima",
    "below": "debajo",
}


def check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, got {language!r}")


def _obj(o: dict, article: bool = True) -> str:
    return f"{'a ' if article else ''}{o['color']} {o['shape']}"


def _obj_es(o: dict, article: str | None = "un") -> str:
    """ "un círculo rojo" (article "un"), "el círculo rojo" ("el"), "círculo rojo" (None)."""
    noun, gender = SHAPES_ES[o["shape"]]
    words = [noun, COLORS_ES[o["color"]][gender]]
    if article == "un":
        words.insert(0, INDEFINITE_ES[gender])
    elif article == "el":
        words.insert(0, "el" if gender == "m" else "la")
    return " ".join(words)


def _before_definite(relation: str, phrase: str) -> str:
    """ "encima de" + "el cuadrado ..." -> "encima del cuadrado ..." (de + el contracts)."""
    if relation.endswith(" de") and phrase.startswith("el "):
        return f"{relation[:-3]} del {phrase[3:]}"
    return f"{relation} {phrase}"


def canonical_caption(attributes: dict, language: str = "en") -> str:
    """ "a red circle" or "a red circle to the left of a blue square"; in Spanish (language
    "es") "un círculo rojo", "un círculo rojo a la izquierda de un cuadrado azul"."""
    objs = attributes["objects"]
    if language == "es":
        if len(objs) == 1:
            return _obj_es(objs[0])
        relation = RELATIONS_ES[attributes["relation"]][0]
        return f"{_obj_es(objs[0])} {relation} {_obj_es(objs[1])}"
    if len(objs) == 1:
        return _obj(objs[0])
    return f"{_obj(objs[0])} {attributes['relation']} {_obj(objs[1])}"


_ITS = {
    "to the left of": "to its left",
    "to the right of": "to its right",
    "above": "above it",
    "below": "below it",
}


def _variants_en(attributes: dict) -> list[str]:
    objs = attributes["objects"]
    if len(objs) == 1:
        c, s = objs[0]["color"], objs[0]["shape"]
        return [
            f"{c} {s}",
            f"a {s} that is {c}",
            f"one {c} {s}",
            f"an image of a {c} {s}",
            f"a picture of a {c} {s}",
            f"a {c} {s} on a black background",
            f"a single {c} {s}",
        ]
    a, b, rel = objs[0], objs[1], attributes["relation"]
    return [
        f"{_obj(a, False)} {rel} {_obj(b, False)}",
        f"{_obj(b)} {INVERSE[rel]} {_obj(a)}",
        f"{_obj(b)} with {_obj(a)} {_ITS[rel]}",
        f"{_obj(a)} is {rel} {_obj(b)}",
        f"there is {_obj(a)} {rel} {_obj(b)}",
        f"an image of {_obj(a)} {rel} {_obj(b)}",
    ]


def _variants_es(attributes: dict) -> list[str]:
    objs = attributes["objects"]
    if len(objs) == 1:
        o = objs[0]
        noun, gender = SHAPES_ES[o["shape"]]
        colour = COLORS_ES[o["color"]]
        return [
            _obj_es(o, None),
            f"{INDEFINITE_ES[gender]} {noun} de color {colour['m']}",
            f"{INDEFINITE_ES[gender]} {noun} que es {colour[gender]}",
            f"una imagen de {_obj_es(o)}",
            f"una figura {colour['f']} con forma de {noun}",
            f"{_obj_es(o)} sobre fondo negro",
            f"{'un solo' if gender == 'm' else 'una sola'} {noun} {colour[gender]}",
            f"hay {_obj_es(o)}",
        ]
    a, b, rel = objs[0], objs[1], attributes["relation"]
    out = []
    for r in RELATIONS_ES[rel]:
        out += [
            f"{_obj_es(a)} {r} {_obj_es(b)}",
            f"{_obj_es(a, None)} {r} {_obj_es(b, None)}",
            f"{_obj_es(a)} está {r} {_obj_es(b)}",
            f"{_obj_es(a, 'el')} está {_before_definite(r, _obj_es(b, 'el'))}",
            f"hay {_obj_es(a)} {r} {_obj_es(b)}",
        ]
    for r in RELATIONS_ES[INVERSE[rel]]:
        out.append(f"{_obj_es(b)} {r} {_obj_es(a)}")
    out.append(f"{_obj_es(b)} con {_obj_es(a)} {_ITS_ES[rel]}")
    return out


def paraphrase(attributes: dict, rng: _Rng, language: str = "en") -> str:
    """A caption of varied wording: the canonical one half the time, else a variant; in
    English or Spanish (language "en" or "es")."""
    if rng.random() < 0.5:
        return canonical_caption(attributes, language)
    return rng.choice(_variants_es(attributes) if language == "es" else _variants_en(attributes))


def _unaccented(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))


def _alternatives(words: dict[str, Iterable[str]]) -> tuple[str, dict[str, str]]:
    """A regex alternation of every word (longest first) and the key each word names."""
    key = {_unaccented(w): k for k, ws in words.items() for w in ws}
    return "|".join(sorted(map(re.escape, key), key=len, reverse=True)), key


class _Grammar(NamedTuple):
    """A language's caption patterns and its words' canonical (English) names."""

    patterns: list[tuple[re.Pattern, str]]  # (pattern, "one" | "ab" | "its")
    colour: dict[str, str]
    shape: dict[str, str]
    relation: dict[str, str]
    its: dict[str, str]


_C, _COLOR_OF = _alternatives({c: [c] for c in COLORS})
_S, _SHAPE_OF = _alternatives({s: [s] for s in SHAPES})
_R, _RELATION_OF = _alternatives({r: [r] for r in RELATIONS})
_I, _ITS_OF = _alternatives({r: [w] for r, w in _ITS.items()})
_OBJ_A = rf"(?:an? )?(?P<c1>{_C}) (?P<s1>{_S})"
_OBJ_B = rf"(?:an? )?(?P<c2>{_C}) (?P<s2>{_S})"
_PREFIX = r"(?:(?:there is|an image of|a picture of|one|a single) )?"
_ENGLISH = _Grammar(
    [
        (re.compile(rf"^{_PREFIX}{_OBJ_A}(?: on a black background)?$"), "one"),
        (re.compile(rf"^(?:an? )?(?P<s1>{_S}) that is (?P<c1>{_C})$"), "one"),
        # two objects: A rel B (canonical), B with A to its left, ...
        (re.compile(rf"^{_PREFIX}{_OBJ_A}(?: is)? (?P<rel>{_R}) {_OBJ_B}$"), "ab"),
        (re.compile(rf"^{_OBJ_B} with {_OBJ_A} (?P<its>{_I})$"), "its"),
    ],
    _COLOR_OF, _SHAPE_OF, _RELATION_OF, _ITS_OF,
)  # fmt: skip

_C, _COLOR_OF = _alternatives({c: set(f.values()) for c, f in COLORS_ES.items()})
_S, _SHAPE_OF = _alternatives({s: [n] for s, (n, _) in SHAPES_ES.items()})
_R, _RELATION_OF = _alternatives(RELATIONS_ES)
_I, _ITS_OF = _alternatives({r: [w] for r, w in _ITS_ES.items()})
_ART = r"(?:(?:un|una|el|la) )?"
_OBJ_A = rf"{_ART}(?P<s1>{_S}) (?P<c1>{_C})"  # the adjective follows the noun
_OBJ_B = rf"{_ART}(?P<s2>{_S}) (?P<c2>{_C})"
_PREFIX = r"(?:(?:hay|una imagen de|un solo|una sola) )?"
_SPANISH = _Grammar(
    [
        (re.compile(rf"^{_PREFIX}{_OBJ_A}(?: sobre fondo negro)?$"), "one"),
        (re.compile(rf"^{_ART}(?P<s1>{_S}) (?:de color|que es) (?P<c1>{_C})$"), "one"),
        (re.compile(rf"^una figura (?P<c1>{_C}) con forma de (?P<s1>{_S})$"), "one"),
        (re.compile(rf"^{_PREFIX}{_OBJ_A}(?: esta)? (?P<rel>{_R}) {_OBJ_B}$"), "ab"),
        (re.compile(rf"^{_OBJ_B} con {_OBJ_A} (?P<its>{_I})$"), "its"),
    ],
    _COLOR_OF, _SHAPE_OF, _RELATION_OF, _ITS_OF,
)  # fmt: skip


def parse_prompt(text: str) -> dict | None:
    """Parse a canonical prompt (and the paraphrases used in training) into a spec.

    Returns {"objects": [{"color", "shape"}, ...], "relation": str | None} in canonical
    order (objects[0] <relation> objects[1]), with English names, or None when the text is
    not understood. Spanish prompts (canonical and training variants, with or without
    accents) parse too.
    """
    t = " ".join(text.lower().replace(",", " ").split()).rstrip(".").strip()
    t = _unaccented(t).replace(" del ", " de el ")  # "encima del cuadrado"
    for grammar in (_ENGLISH, _SPANISH):
        for pattern, kind in grammar.patterns:
            m = pattern.match(t)
            if m is None:
                continue
            objs = [{"color": grammar.colour[m["c1"]], "shape": grammar.shape[m["s1"]]}]
            if kind == "one":
                return {"objects": objs, "relation": None}
            objs.append({"color": grammar.colour[m["c2"]], "shape": grammar.shape[m["s2"]]})
            rel = grammar.relation[m["rel"]] if kind == "ab" else grammar.its[m["its"]]
            return {"objects": objs, "relation": rel}
    return None


def spec_of(attributes: dict) -> dict:
    """The colours / shapes / relation of full attributes (what `parse_prompt` returns)."""
    return {
        "objects": [{"color": o["color"], "shape": o["shape"]} for o in attributes["objects"]],
        "relation": attributes.get("relation"),
    }


def class_index(color: str, shape: str) -> int:
    return _COLOR_NAMES.index(color) * len(SHAPES) + SHAPES.index(shape)


# ----------------------------------------------------------------------------- data set


def check_options(size: int, two_object_prob: float) -> None:
    """ValueError naming the option when `size` or `two_object_prob` is out of range."""
    if size < 16:
        raise ValueError(f"shapes: size must be at least 16, got {size}")
    if not 0.0 <= two_object_prob <= 1.0:
        raise ValueError(f"two_object_prob must be in [0, 1], got {two_object_prob}")


class ShapesDataset(Dataset):
    """Seeded, infinite stream of captioned shapes; `len` is the epoch length only.

    `language`: captions in English ("en"), Spanish ("es") or either at random ("both"),
    of the same scenes.

    Items: {"image": FloatTensor [3, size, size] in [-1, 1], "caption": str,
    "attributes": dict} (+ "label": int with `label=True`). Any index >= 0 works; item i
    depends on (seed, i) only. The nested "attributes" need `difusion.data.collate` in a
    DataLoader (torch's default collate cannot batch them).
    """

    channels = 3

    def __init__(
        self,
        size: int = DEFAULT_SIZE,
        length: int = 50_000,
        seed: int = 0,
        two_object_prob: float = 0.5,
        paraphrase: bool = True,
        label: bool = False,
        language: str = "en",
    ):
        check_options(size, two_object_prob)
        check_language(language)
        self.size, self.length, self.seed = size, length, seed
        self.two_object_prob, self.paraphrase, self.label = two_object_prob, paraphrase, label
        self.language = language
        self.num_classes = len(CLASS_NAMES) if label else None
        self.class_names = list(CLASS_NAMES) if label else None

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return (self[i] for i in range(self.length))

    def attributes(self, i: int) -> dict:
        return generate(self.seed, i, self.size, self.two_object_prob)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i < 0:
            i += self.length
            if i < 0:
                raise IndexError(i)
        rng = _Rng(self.seed, i)
        attrs = _generate(rng, self.size, self.two_object_prob)
        language = self.language
        if language == "both":  # drawn after the scene, so "en" keeps its stream
            language = "es" if rng.random() < 0.5 else "en"
        if self.paraphrase:
            caption = paraphrase(attrs, rng, language)
        else:
            caption = canonical_caption(attrs, language)
        image = torch.from_numpy(render_array(attrs)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        item = {"image": image, "caption": caption, "attributes": attrs}
        if self.label:
            o = attrs["objects"][0]
            item["label"] = class_index(o["color"], o["shape"])
        return item
