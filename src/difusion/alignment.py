"""A strict alignment scorer for the `shapes` world: does an image satisfy its prompt?

The scorer reads an image the way the data set's spec draws one (design notes, "The
`shapes` data set"): a black canvas with one or two filled shapes of the six palette
colours. A pixel p is read as alpha * c plus a residual off the line of its nearest
palette colour c (the colour of the smallest residual); it is

- an *object pixel of colour c* when alpha >= `min_alpha` (0.5: the half-intensity
  contour, which blur leaves in place) and the residual is within `color_tol` * alpha;
- *near black* when |p| <= `black_tol`; *dim* when |p| <= `visible_tol` (faint haze);
- *other* otherwise: visible but of no palette colour (junk, unless it is an object's
  soft edge).

Object pixels form connected components, one colour each (8-connectivity: touching
objects of different colours stay apart, a two-coloured blob falls into fragments).
Components of at least `min_area` px are objects, smaller ones speckle. Each object is
matched against the spec's own rasterised shapes (`shape_mask`) of every plausible size,
centred on its bounding box: the best intersection-over-union names the shape and its
size, and a whole shape must match closely (`min_iou`: an inverted triangle, half a
shape or a ragged blob does not), be pure (`min_purity`: no other colour inside its
template) and bright (`min_intensity`: mean alpha of its core; a dark red is not red).
The object's centre is the centre of the fitted template.

An image passes (`Verdict.passed`) only when all of these hold:

- exactly the prompt's objects: count, colour and shape, each a whole shape whose size is
  in the spec's range (+- `size_tol` px), of a pure colour;
- with two objects, the relation holds between the centres: the offset along the
  relation's axis is at least 10 px (at 32 px, - `sep_tol`) and not smaller than the
  offset across it (the data set's dominance rule);
- the background (pixels more than `halo` px away from every object) is black: at least
  `bg_black_frac` of it near black and its mean brightness (max channel) at most
  `bg_mean_max`;
- little else: speckle plus visible non-palette pixels away from the objects are at most
  `max_junk_frac` of the canvas.

Lengths are given at the 32 px canvas and scale with the canvas (k = size / 32). Soft
edges (a pixel or so of blur) are tolerated: edge pixels next to an object are neither
background nor junk, and even a full 3x3 box blur keeps the half-intensity shapes.
Known limit: a small square drawn half a pixel off the grid (e.g. a 64 px image resized
to 32) loses its corners and may read as a circle (~1 % of such images).

API: `score_image(image, prompt) -> Verdict`, `detect(image) -> list[DetectedObject]`,
`score_batch(images, prompts) -> dict` (vectorised over the batch), `prompt_set(n_single,
n_double, seed)` (canonical evaluation prompts covering every colour x shape and every
relation evenly). Images: PIL, uint8 numpy [H, W, 3], or float tensors / arrays
[3, H, W] (or a batch [N, 3, H, W]) in [-1, 1]; square canvases (32 px by default).
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data.shapes import (
    AXIS,
    BASE_SIZE,
    CLASS_NAMES,
    COLORS,
    INVERSE,
    MIN_SEPARATION,
    RELATIONS,
    SHAPES,
    canonical_caption,
    parse_prompt,
    shape_mask,
    size_range,
)

_COLOR_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)  # [6, 3]


@dataclass(frozen=True)
class Thresholds:
    """The scorer's tolerances; lengths in px at the 32 px canvas (scaled with it)."""

    color_tol: float = 70.0  # residual off the colour (x alpha); palette colours are >= 150 apart
    min_alpha: float = 0.5  # intensity along the colour of an object pixel (half-max contour)
    max_alpha: float = 1.2  # alpha is clipped here: any excess brightness counts as residual
    min_intensity: float = 0.8  # mean intensity of an object's core (a dark red is not red)
    black_tol: float = 40.0  # RGB norm of a near-black pixel
    visible_tol: float = 80.0  # non-palette pixels brighter than this are "other" (junk)
    min_area: float = 4.0  # px at 32 (scaled by k^2): smaller components are speckle
    halo: float = 1.0  # px at 32: soft-edge band around objects, neither background nor junk
    min_iou: float = 0.8  # IoU with the best template for a whole shape
    min_purity: float = 0.9  # own colour among the palette pixels in the object's template
    size_tol: float = 1.0  # px at 32, around the spec's size range
    sep_tol: float = 1.0  # px at 32, below the spec's 10 px separation of centres
    bg_black_frac: float = 0.95  # fraction of background pixels near black
    bg_mean_max: float = 20.0  # mean max-channel brightness of the background (0-255)
    max_junk_frac: float = 0.01  # speckle + visible non-palette pixels off the objects


DEFAULT_THRESHOLDS = Thresholds()


@dataclass
class DetectedObject:
    """One object found in an image (a one-colour component of at least `min_area` px)."""

    color: str  # palette colour
    shape: str | None  # best-matching shape (None when nothing matches at all)
    size: int  # size of the best template (px, on the image's own canvas)
    center: tuple[float, float]  # (x, y) of the fitted template's centre, in px
    bbox: tuple[int, int, int, int]  # [left, top, right, bottom) of the component
    area: int  # pixels in the component
    purity: float  # own colour among the palette pixels inside the fitted template
    intensity: float  # mean intensity (along the colour) of the object's core, 1 = exact
    iou: float  # intersection over union with the best template
    whole: bool  # a whole shape: close match, pure and bright colour, size in the spec's range

    def name(self) -> str:
        return f"{self.color} {self.shape or 'blob'}"


@dataclass
class Verdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # why it failed (empty when passed)
    objects: list[DetectedObject] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)  # background / junk measurements


# ----------------------------------------------------------------------------- input


def _as_batch(images: Any) -> np.ndarray:
    """float32 [N, H, W, 3] in 0-255 from PIL images, arrays or tensors (see module doc)."""
    if isinstance(images, Image.Image):
        return np.asarray(images.convert("RGB"), dtype=np.float32)[None]
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
        if images.ndim == 3:
            images = images[None]
        return _from_signed(images)
    if isinstance(images, np.ndarray):
        if images.ndim == 3 and images.shape[-1] == 3 and images.dtype == np.uint8:
            return images.astype(np.float32)[None]
        if images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8:
            return images.astype(np.float32)
        if images.ndim in (3, 4) and images.shape[-3] == 3:
            return _from_signed(images if images.ndim == 4 else images[None])
        raise ValueError(f"unsupported image array of shape {images.shape} ({images.dtype})")
    if isinstance(images, Sequence) and len(images) > 0:
        parts = [_as_batch(im) for im in images]
        if len({p.shape[1:] for p in parts}) != 1:
            raise ValueError("a batch of images must share one size")
        return np.concatenate(parts)
    raise TypeError(f"unsupported image type {type(images).__name__}")


def _from_signed(x: np.ndarray) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> float32 [N, H, W, 3] in 0-255."""
    x = (np.asarray(x, dtype=np.float32).transpose(0, 2, 3, 1) + 1.0) * 127.5
    return np.clip(x, 0.0, 255.0)


# ----------------------------------------------------------------------------- pieces


def _label(mask: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool [N, H, W] mask, within each image and each class
    (pixels of different `classes` never join): labels 1..n, 0 = none.

    Vectorised union-find: hook roots to the smaller root along every edge, then jump
    pointers until flat; a handful of rounds for any picture.
    """
    n_img, h, w = mask.shape
    flat = mask.ravel()
    idx = np.flatnonzero(flat)
    labels = np.zeros(flat.shape, dtype=np.int32)
    if idx.size == 0:
        return labels.reshape(mask.shape), 0
    compact = np.full(flat.shape, -1, dtype=np.int64)
    compact[idx] = np.arange(idx.size)
    grid = compact.reshape(mask.shape)
    us, vs = [], []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = grid[:, : h - dy, max(0, -dx) : w - max(0, dx)]
        b = grid[:, dy:, max(0, dx) : w - max(0, -dx)]
        ca = classes[:, : h - dy, max(0, -dx) : w - max(0, dx)]
        cb = classes[:, dy:, max(0, dx) : w - max(0, -dx)]
        both = (a >= 0) & (b >= 0) & (ca == cb)
        us.append(a[both])
        vs.append(b[both])
    u, v = np.concatenate(us), np.concatenate(vs)
    parent = np.arange(idx.size)
    while True:
        pu, pv = parent[u], parent[v]
        diff = pu != pv
        if not diff.any():
            break
        pu, pv = pu[diff], pv[diff]
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    _, inverse = np.unique(parent, return_inverse=True)
    labels[idx] = inverse + 1
    return labels.reshape(mask.shape), int(inverse.max()) + 1


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation of [N, H, W] by a (2r+1)^2 square."""
    out = mask.copy()
    for _ in range(r):
        m = out.copy()
        m[:, 1:, :] |= out[:, :-1, :]
        m[:, :-1, :] |= out[:, 1:, :]
        m2 = m.copy()
        m2[:, :, 1:] |= m[:, :, :-1]
        m2[:, :, :-1] |= m[:, :, 1:]
        out = m2
    return out


_PALETTE_SQ = (_PALETTE**2).sum(-1)  # [6]


def _classify(
    batch: np.ndarray, th: Thresholds
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel of [N, H, W, 3]: intensity `alpha` along its nearest palette colour,
    that colour's index, whether it is an object pixel of that colour, and |rgb|^2.

    A pixel p is read as alpha * c (+ a residual off the colour's line): the nearest
    colour is the one of the smallest residual, and p is an object pixel of it when
    alpha >= min_alpha (the half-intensity contour, stable under blur) and the residual
    is within color_tol * alpha (so a half-bright edge must be as true in hue as a core).
    """
    flat = batch.reshape(-1, 3)
    dots = flat @ _PALETTE.T  # [P, 6]
    norm2 = np.einsum("pc,pc->p", flat, flat)
    a = np.clip(dots / _PALETTE_SQ, 0.0, th.max_alpha)
    r2 = norm2[:, None] - 2.0 * a * dots + a * a * _PALETTE_SQ
    nearest = r2.argmin(1)
    rows = np.arange(flat.shape[0])
    an, rn = a[rows, nearest], r2[rows, nearest]
    palette = (an >= th.min_alpha) & (rn <= (th.color_tol * np.minimum(an, 1.0)) ** 2)
    shape = batch.shape[:-1]
    return an.reshape(shape), nearest.reshape(shape), palette.reshape(shape), norm2.reshape(shape)


@cache
def _template(shape: str, s: int) -> tuple[np.ndarray, int]:
    m = shape_mask(shape, s)
    return m, int(m.sum())


def _fit_shape(crop: np.ndarray) -> tuple[str | None, int, float, float, float]:
    """Best template for a component's bool crop: (shape, size, iou, dx, dy) where (dx, dy)
    is the template's top-left in crop coordinates."""
    h, w = crop.shape
    area = int(crop.sum())
    best: tuple[str | None, int, float, float, float] = (None, max(h, w), 0.0, 0.0, 0.0)
    for s in range(max(2, min(h, w) - 1), max(h, w) + 2):
        oys = {(h - s) // 2, -((s - h) // 2)}
        oxs = {(w - s) // 2, -((s - w) // 2)}
        for shape in SHAPES:
            t, t_area = _template(shape, s)
            for oy in oys:
                r0, r1 = max(0, oy), min(h, oy + s)
                for ox in oxs:
                    c0, c1 = max(0, ox), min(w, ox + s)
                    inter = int(
                        np.count_nonzero(
                            crop[r0:r1, c0:c1] & t[r0 - oy : r1 - oy, c0 - ox : c1 - ox]
                        )
                    )
                    iou = inter / (area + t_area - inter)
                    if iou > best[2]:
                        best = (shape, s, iou, float(ox), float(oy))
    return best


# ----------------------------------------------------------------------------- detection


def _analyse(batch: np.ndarray, th: Thresholds) -> tuple[list[list[DetectedObject]], list[dict]]:
    """Objects and background / junk statistics of every image of a [N, H, W, 3] batch."""
    n, h, w, _ = batch.shape
    if h != w:
        raise ValueError(f"shapes images are square, got {h}x{w}")
    k = h / BASE_SIZE
    alpha, nearest, palette, norm2 = _classify(batch, th)
    near_black = norm2 <= th.black_tol**2
    visible_other = ~palette & (norm2 > th.visible_tol**2)

    labels, n_lab = _label(palette, nearest)
    flat_lab = labels.ravel()
    on = flat_lab > 0
    lab = flat_lab[on] - 1
    pix = np.flatnonzero(on)
    area = np.bincount(lab, minlength=n_lab)
    color_of = np.zeros(n_lab, dtype=np.int64)
    color_of[lab] = nearest.ravel()[on]
    img_of = np.zeros(n_lab, dtype=np.int64)
    img_of[lab] = pix // (h * w)
    ys, xs = (pix % (h * w)) // w, pix % w
    big = np.zeros(n_lab, dtype=bool)
    big[area >= th.min_area * k * k] = True
    x0 = np.full(n_lab, w)
    y0 = np.full(n_lab, h)
    x1 = np.zeros(n_lab, dtype=np.int64)
    y1 = np.zeros(n_lab, dtype=np.int64)
    np.minimum.at(x0, lab, xs)
    np.minimum.at(y0, lab, ys)
    np.maximum.at(x1, lab, xs + 1)
    np.maximum.at(y1, lab, ys + 1)

    # objects, their soft-edge band, and what lies beyond
    is_big = np.concatenate([[False], big])
    obj_mask = is_big[labels]
    near_obj = _dilate(obj_mask, max(1, round(th.halo * k)))
    speckle = palette & ~obj_mask
    bg = ~near_obj
    n_bg = bg.sum((1, 2))
    junk = ((visible_other & bg) | speckle).sum((1, 2))
    bg_black = (near_black & bg).sum((1, 2)) / np.maximum(n_bg, 1)
    bg_mean = (batch.max(-1) * bg).sum((1, 2)) / np.maximum(n_bg, 1)
    stats = [
        {
            "bg_black_frac": float(bg_black[i]) if n_bg[i] else 1.0,
            "bg_mean": float(bg_mean[i]),
            "junk_frac": float(junk[i]) / (h * w),
            "speckle_px": int(speckle[i].sum()),
        }
        for i in range(n)
    ]

    objects: list[list[DetectedObject]] = [[] for _ in range(n)]
    tol = th.size_tol * k
    for c in np.flatnonzero(big):
        i = int(img_of[c])
        bx0, by0, bx1, by1 = int(x0[c]), int(y0[c]), int(x1[c]), int(y1[c])
        crop = labels[i, by0:by1, bx0:bx1] == c + 1
        shape, s, iou, ox, oy = _fit_shape(crop)
        ci = int(color_of[c])
        # purity: own pixels among the palette pixels inside the fitted template
        tx, ty = bx0 + int(ox), by0 + int(oy)
        r0, r1, c0, c1 = max(0, ty), min(h, ty + s), max(0, tx), min(w, tx + s)
        t = _template(shape or "square", s)[0][r0 - ty : r1 - ty, c0 - tx : c1 - tx]
        inside = palette[i, r0:r1, c0:c1] & t
        own = np.count_nonzero(inside & (nearest[i, r0:r1, c0:c1] == ci))
        purity = own / max(1, np.count_nonzero(inside))
        core = crop.copy()
        core[1:] &= crop[:-1]
        core[:-1] &= crop[1:]
        core[:, 1:] &= crop[:, :-1]
        core[:, :-1] &= crop[:, 1:]
        a_crop = alpha[i, by0:by1, bx0:bx1]
        intensity = float(a_crop[core].mean() if core.any() else a_crop[crop].mean())
        in_range = False
        if shape is not None:
            lo, hi = size_range(shape, h)
            in_range = lo - tol <= s <= hi + tol
        objects[i].append(
            DetectedObject(
                color=_COLOR_NAMES[ci],
                shape=shape,
                size=s,
                center=(bx0 + ox + s / 2, by0 + oy + s / 2),
                bbox=(bx0, by0, bx1, by1),
                area=int(area[c]),
                purity=purity,
                intensity=intensity,
                iou=iou,
                whole=bool(
                    iou >= th.min_iou
                    and purity >= th.min_purity
                    and intensity >= th.min_intensity
                    and in_range
                ),
            )
        )
    for objs in objects:
        objs.sort(key=lambda o: -o.area)
    return objects, stats


def detect(image: Any, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> list[DetectedObject]:
    """The objects of one image (largest first), whole or not; speckle is left out."""
    return _analyse(_as_batch(image)[:1], thresholds)[0][0]


# ----------------------------------------------------------------------------- judging


def _judge(
    objects: list[DetectedObject], stats: dict, spec: dict, size: int, th: Thresholds
) -> Verdict:
    """Reasons read "category: detail"; categories: count, fragment, missing, unexpected,
    relation, swapped (the inverse relation holds), background, junk."""
    reasons: list[str] = []
    want = spec["objects"]
    k = size / BASE_SIZE
    if len(objects) != len(want):
        reasons.append(f"count: expected {len(want)} object(s), found {len(objects)}")
    for o in objects:
        if not o.whole:
            why = []
            if o.iou < th.min_iou:
                why.append(f"shape match {o.iou:.2f}")
            if o.purity < th.min_purity:
                why.append(f"colour purity {o.purity:.2f}")
            if o.intensity < th.min_intensity:
                why.append(f"colour intensity {o.intensity:.2f}")
            if o.shape is not None:
                lo, hi = size_range(o.shape, size)
                if not lo - th.size_tol * k <= o.size <= hi + th.size_tol * k:
                    why.append(f"size {o.size} outside {lo}-{hi}")
            reasons.append(f"fragment: {o.name()} at {_xy(o)} is not whole ({', '.join(why)})")

    # match the prompt's objects to whole detected ones (any assignment that works)
    names = [(w["color"], w["shape"]) for w in want]
    whole = [o for o in objects if o.whole]
    relation = spec.get("relation")
    matches = [
        combo
        for combo in itertools.permutations(whole, len(want))
        if all((o.color, o.shape) == nm for o, nm in zip(combo, names, strict=True))
    ]
    if not matches:
        for nm in dict.fromkeys(names):
            if sum((o.color, o.shape) == nm for o in whole) < names.count(nm):
                reasons.append(f"missing: {nm[0]} {nm[1]}")
        for o in whole:
            if (o.color, o.shape) not in names:
                reasons.append(f"unexpected: {o.name()} at {_xy(o)}")
    elif relation is not None and not any(_relation_ok(a, b, relation, k, th) for a, b in matches):
        swapped = [(a, b) for a, b in matches if _relation_ok(a, b, INVERSE[relation], k, th)]
        a, b = (swapped or matches)[0]
        if swapped:  # the right axis, the two objects the other way round
            reasons.append(
                f"swapped: {a.name()} at {_xy(a)} is {INVERSE[relation]} {b.name()} at {_xy(b)}"
            )
        else:
            reasons.append(
                f"relation: {a.name()} at {_xy(a)} is not {relation} {b.name()} at {_xy(b)}"
            )

    if stats["bg_black_frac"] < th.bg_black_frac:
        reasons.append(f"background: only {stats['bg_black_frac']:.1%} near black")
    if stats["bg_mean"] > th.bg_mean_max:
        reasons.append(f"background: too bright (mean {stats['bg_mean']:.1f} / 255)")
    if stats["junk_frac"] > th.max_junk_frac:
        reasons.append(f"junk: speckle / non-palette pixels {stats['junk_frac']:.1%} of the image")
    return Verdict(passed=not reasons, reasons=reasons, objects=objects, stats=stats)


def _xy(o: DetectedObject) -> str:
    return f"({o.center[0]:g}, {o.center[1]:g})"


def _relation_ok(
    a: DetectedObject, b: DetectedObject, relation: str, k: float, th: Thresholds
) -> bool:
    axis, sign = AXIS[relation]
    d = [b.center[n] - a.center[n] for n in (0, 1)]
    along = sign * d[axis]
    return along >= (MIN_SEPARATION - th.sep_tol) * k and along >= abs(d[1 - axis])


def _parse(prompt: str) -> dict:
    spec = parse_prompt(prompt)
    if spec is None:
        raise ValueError(f"not a shapes prompt: {prompt!r}")
    return spec


def score_image(image: Any, prompt: str, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> Verdict:
    """Whether one image satisfies its prompt, strictly (see the module doc)."""
    batch = _as_batch(image)[:1]
    objects, stats = _analyse(batch, thresholds)
    return _judge(objects[0], stats[0], _parse(prompt), batch.shape[1], thresholds)


def score_batch(
    images: Any,
    prompts: Sequence[str],
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    chunk: int = 256,
) -> dict[str, Any]:
    """Score images against their prompts: pass rates overall / one object / two objects.

    Returns {"pass_rate", "pass_rate_single", "pass_rate_double" (None without such
    prompts), "n", "n_single", "n_double", "passed", "passed_single", "passed_double",
    "reasons": Counter of failure categories (count,
    fragment, missing, unexpected, relation, swapped, background, junk), "verdicts":
    list[Verdict]}.
    """
    specs = [_parse(p) for p in prompts]
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        n_images = images.shape[0]
    elif isinstance(images, Image.Image):
        images, n_images = [images], 1
    else:
        images = list(images)
        n_images = len(images)
    if n_images != len(specs):
        raise ValueError(f"{n_images} images for {len(specs)} prompts")
    verdicts: list[Verdict] = []
    for start in range(0, n_images, chunk):
        batch = _as_batch(images[start : start + chunk])
        objects, stats = _analyse(batch, thresholds)
        for j in range(batch.shape[0]):
            verdicts.append(
                _judge(objects[j], stats[j], specs[start + j], batch.shape[1], thresholds)
            )
    single = [len(s["objects"]) == 1 for s in specs]
    ok = [v.passed for v in verdicts]
    n_single = sum(single)
    n_double = len(ok) - n_single
    passed_single = sum(p for p, s in zip(ok, single, strict=True) if s)
    passed_double = sum(ok) - passed_single
    reasons = Counter(r.split(":")[0] for v in verdicts for r in v.reasons)
    return {
        "pass_rate": sum(ok) / len(ok) if ok else None,
        "pass_rate_single": passed_single / n_single if n_single else None,
        "pass_rate_double": passed_double / n_double if n_double else None,
        "n": len(ok),
        "n_single": n_single,
        "n_double": n_double,
        "passed": sum(ok),
        "passed_single": passed_single,
        "passed_double": passed_double,
        "reasons": reasons,
        "verdicts": verdicts,
    }


# ----------------------------------------------------------------------------- prompts


def prompt_set(
    n_single: int = 200, n_double: int = 200, seed: int = 0, language: str = "en"
) -> list[str]:
    """Canonical evaluation prompts: `n_single` one-object then `n_double` two-object ones,
    in English or Spanish (`language` "es": the same scenes' canonical Spanish captions).

    Every colour x shape pair appears equally often (up to the remainder of n / 18) as the
    one object and as the subject of two-object prompts, every relation equally often (up
    to n / 4); the second object is one of the 17 other pairs, also cycled evenly.
    """
    rng = np.random.default_rng(seed)

    def cycle(n: int, m: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            out.extend(int(v) for v in rng.permutation(m))
        return out[:n]

    def obj(c: int) -> dict[str, str]:
        color, shape = CLASS_NAMES[c].split()
        return {"color": color, "shape": shape}

    n_cls = len(CLASS_NAMES)
    prompts = [canonical_caption({"objects": [obj(c)]}, language) for c in cycle(n_single, n_cls)]
    subjects, offsets = cycle(n_double, n_cls), cycle(n_double, n_cls - 1)
    relations = cycle(n_double, len(RELATIONS))
    for a, off, r in zip(subjects, offsets, relations, strict=True):
        b = (a + 1 + off) % n_cls
        scene = {"objects": [obj(a), obj(b)], "relation": RELATIONS[r]}
        prompts.append(canonical_caption(scene, language))
    return prompts


# Words that `shapes.paraphrase` never writes, so no training caption holds them: prompts
# reworded with them measure what a pretrained encoder brings (a from-scratch encoder maps
# them all to its unknown token).
UNSEEN_WORDINGS: dict[str, dict[str, str]] = {
    "colour": {
        "red": "crimson",
        "green": "emerald",
        "blue": "cobalt",
        "yellow": "golden",
        "magenta": "fuchsia",
        "cyan": "turquoise",
    },
    "shape": {"circle": "disc", "square": "box", "triangle": "pyramid"},
    "relation": {
        "to the left of": "on the left side of",
        "to the right of": "on the right side of",
        "above": "on top of",
        "below": "underneath",
    },
}


WORDINGS = ("canonical", *UNSEEN_WORDINGS)


def check_wording(kind: str) -> None:
    if kind not in WORDINGS:
        raise ValueError(f"unknown wording {kind!r}; choose one of {', '.join(WORDINGS)}")


def reword(prompt: str, kind: str) -> str:
    """A canonical prompt with its colours, shapes or relation in words training never saw
    (kind "canonical": the prompt as it is)."""
    check_wording(kind)
    if kind == "canonical":
        return prompt
    words = UNSEEN_WORDINGS[kind]
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b")
    return pattern.sub(lambda m: words[m.group(1)], prompt)
