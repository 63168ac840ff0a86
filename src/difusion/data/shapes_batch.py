"""Whole `shapes` training batches drawn and drawn out with tensor ops, on any device.

`render_batch` samples the same distribution as `ShapesDataset` (shapes.py: the spec and
its choices) from a `torch.Generator`, on that generator's device, with no Python loop
over the items:

- classes, the one / two object coin, the relation and the sizes are drawn as there
  (the second object one of the 17 other colour-shape pairs, sizes uniform in
  `size_range`);
- positions by vectorised rejection: every pending item draws a few candidate layouts
  (each box's corner uniform in the canvas), keeps its first acceptable one (boxes
  `min_gap` apart, the relation holding with its separation and dominance), the rest
  draw again; as `_place` redraws positions only, keeping the sizes, the accepted layout
  has `_place`'s distribution;
- images by comparing coordinate grids with each item's box, the shapes' exact pixel
  rules of `shape_mask` (pixel-identical to `render_array`);
- captions host-side, from one transfer of the small attribute tensors, by shapes.py's
  own `canonical_caption` / `paraphrase` fed with values drawn on the device.

The stream is the generator's, not `ShapesDataset`'s (seed, index) one: same
distribution, other samples. Random integers below n are drawn as `_Rng.randint` does,
a wide random integer modulo n (bias below n / 2**62).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from .shapes import (
    AXIS,
    BASE_SIZE,
    CLASS_NAMES,
    COLORS,
    MIN_SEPARATION,
    RELATIONS,
    SHAPES,
    ShapesDataset,
    canonical_caption,
    check_language,
    check_options,
    make_object,
    min_gap,
    size_range,
)
from .shapes import paraphrase as paraphrase_caption

_WIDE = 1 << 62  # range of the wide integers reduced modulo n
_UNIT = 1 << 53  # a uniform float in [0, 1) is an integer below this over it (`_Rng.random`)
_MAX_TRIES = 100_000  # candidate layouts per item before giving up, as `_place`
_CANDIDATES = 4096  # candidate layouts drawn per rejection round (at least 8 per item)
_OBJECTS = [{"color": c.split()[0], "shape": c.split()[1]} for c in CLASS_NAMES]


@dataclass
class Layout:
    """A batch of scenes as tensors on one device (long unless said)."""

    classes: torch.Tensor  # [n, 2] colour index * 3 + shape index of objects[0], objects[1]
    two: torch.Tensor  # [n] bool: a second object (its entries are unused without one)
    relation: torch.Tensor  # [n] index into RELATIONS: objects[0] <relation> objects[1]
    sizes: torch.Tensor  # [n, 2] box side (px)
    corners: torch.Tensor  # [n, 2, 2] (left, top) of each box

    def to(self, device: torch.device | str) -> Layout:
        return Layout(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _uniform_int(high: torch.Tensor, generator: torch.Generator, shape=None) -> torch.Tensor:
    """Integers uniform in [0, high] (inclusive, per element; `shape` broadcasts to `high`)."""
    shape = high.shape if shape is None else shape
    wide = torch.randint(0, _WIDE, shape, generator=generator, device=high.device)
    return wide % (high + 1)


def _uniform(n: int, generator: torch.Generator) -> torch.Tensor:
    """float64 [n] uniform in [0, 1), on the generator's device, as `_Rng.random`."""
    bits = torch.randint(0, _UNIT, (n,), generator=generator, device=generator.device)
    return bits.double() / _UNIT


def _acceptable(corners: torch.Tensor, sizes: torch.Tensor, relation: torch.Tensor, size: int):
    """Which candidate layouts [P, m, 2, 2] of two boxes of `sizes` [P, 2] satisfy
    `_gap_ok` and `relation_holds` for `relation` [P]: bool [P, m]."""
    s = sizes[:, None, :, None]  # [P, 1, object, 1]
    near, far = corners, corners + s  # [P, m, object, axis]
    gap = min_gap(size)
    apart = (near[:, :, 1] >= far[:, :, 0] + gap) | (near[:, :, 0] >= far[:, :, 1] + gap)
    axis, sign = torch.tensor([AXIS[r] for r in RELATIONS], device=corners.device)[relation].T
    centre2 = 2 * corners + s  # twice the centres: integers
    dx2, dy2 = (centre2[:, :, 1] - centre2[:, :, 0]).unbind(-1)  # [P, m] each
    x_axis = axis[:, None] == 0
    along2 = sign[:, None] * torch.where(x_axis, dx2, dy2)
    across2 = torch.where(x_axis, dy2, dx2)
    separated = along2 * BASE_SIZE >= 2 * MIN_SEPARATION * size  # along >= 10 * size / 32
    return apart.any(-1) & separated & (along2 > across2.abs())


def sample_layout(
    n: int, generator: torch.Generator, size: int = 32, two_object_prob: float = 0.5
) -> Layout:
    """`n` scenes of `ShapesDataset(size, two_object_prob=...)`'s distribution, drawn by
    `generator` on its device."""
    check_options(size, two_object_prob)
    if n < 1:
        raise ValueError(f"shapes: a batch needs n >= 1 items, got {n}")
    dev, n_cls = generator.device, len(CLASS_NAMES)
    first = torch.randint(0, n_cls, (n,), generator=generator, device=dev)
    two = _uniform(n, generator) < two_object_prob
    second = torch.randint(0, n_cls - 1, (n,), generator=generator, device=dev)
    second += second >= first  # any of the 17 other colour-shape pairs
    relation = torch.randint(0, len(RELATIONS), (n,), generator=generator, device=dev)
    classes = torch.stack([first, second], 1)
    lo, hi = torch.tensor([size_range(s, size) for s in SHAPES], device=dev).unbind(1)
    shape = classes % len(SHAPES)
    sizes = lo[shape] + _uniform_int(hi[shape] - lo[shape], generator)

    corners = torch.zeros(n, 2, 2, dtype=torch.long, device=dev)
    pending = torch.arange(n, device=dev)
    tries = 0
    while pending.numel():  # one host sync a round: a handful of rounds per batch
        if tries >= _MAX_TRIES:
            raise RuntimeError(f"could not place {pending.numel()} shapes on a {size}px canvas")
        m = max(8, _CANDIDATES // pending.numel())
        room = (size - sizes[pending])[:, None, :, None]  # [P, 1, object, 1]
        cand = _uniform_int(room, generator, (pending.numel(), m, 2, 2))
        ok = _acceptable(cand, sizes[pending], relation[pending], size)
        ok |= ~two[pending, None]
        got = ok.any(1)
        pick = ok.to(torch.uint8).argmax(1)  # the first acceptable candidate
        rows = got.nonzero()[:, 0]
        corners[pending[rows]] = cand[rows, pick[rows]]
        pending = pending[~got]
        tries += m
    return Layout(classes, two, relation, sizes, corners)


# the palette as ShapesDataset maps uint8 to [-1, 1] (same float32 ops: same values)
_SIGNED = torch.tensor(list(COLORS.values()), dtype=torch.float32).div_(127.5).sub_(1.0)


def _row_limits(dy: torch.Tensor, s: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Per row of each box, the largest |dx| of its shape's pixels (-1 off the box).

    dx, dy: twice a pixel centre's offset from the box centre (2 * column + 1 - s); the
    rules of `shape_mask`: circle dx^2 + dy^2 <= s^2, triangle |dx| <= row + 1, square all.
    """
    circle = (s * s - dy * dy).clamp(min=0).double().sqrt().floor().long()  # exact isqrt
    triangle = (dy + s + 1) // 2  # row + 1
    limit = torch.where(shape == 0, circle, torch.where(shape == 1, s - 1, triangle))
    return torch.where(dy.abs() < s, torch.minimum(limit, s - 1), -1)


def rasterise(layout: Layout, size: int) -> torch.Tensor:
    """FloatTensor [n, 3, size, size] in [-1, 1] on the layout's device, pixel-identical to
    `render_array` (object pixels per `shape_mask`, exact colours, black elsewhere)."""
    dev = layout.classes.device
    grid = torch.arange(size, device=dev)
    image = torch.full((), -1.0, device=dev)  # black, broadcast to [n, 3, H, W] below
    for o in range(2):
        s, cls = layout.sizes[:, o, None], layout.classes[:, o]
        left, top = layout.corners[:, o, 0, None], layout.corners[:, o, 1, None]
        dx = 2 * (grid - left) + 1 - s  # [n, W]
        dy = 2 * (grid - top) + 1 - s  # [n, H]
        limit = _row_limits(dy, s, cls[:, None] % len(SHAPES))
        if o == 1:
            limit = torch.where(layout.two[:, None], limit, -1)
        mask = dx.abs()[:, None, :] <= limit[:, :, None]  # [n, H, W]
        rgb = _SIGNED.to(dev)[cls // len(SHAPES)]
        image = torch.where(mask[:, None], rgb[:, :, None, None], image)  # never overlap
    return image


class _Drawn:
    """The rng `paraphrase` takes, answering with values drawn beforehand (one each)."""

    def __init__(self, coin: int, pick: int):
        self.coin, self.pick = coin, pick

    def random(self) -> float:
        return self.coin / _UNIT

    def choice(self, seq):
        return seq[self.pick % len(seq)]


def _scene(row: list[int]) -> dict[str, Any]:
    first, second, two, relation = row[:4]
    if not two:
        return {"objects": [_OBJECTS[first]], "relation": None}
    return {"objects": [_OBJECTS[first], _OBJECTS[second]], "relation": RELATIONS[relation]}


def _attributes(row: list[int], size: int) -> dict[str, Any]:
    first, second, two, relation, s0, s1, l0, t0, l1, t1 = row[:10]
    objs = [make_object(**_OBJECTS[first], s=s0, left=l0, top=t0)]
    if two:
        objs.append(make_object(**_OBJECTS[second], s=s1, left=l1, top=t1))
    return {"size": size, "objects": objs, "relation": RELATIONS[relation] if two else None}


def render_batch(
    n: int,
    generator: torch.Generator,
    *,
    size: int = 32,
    two_object_prob: float = 0.5,
    paraphrase: bool = True,
    label: bool = False,
    attributes: bool = False,
    language: str = "en",
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """A batch of `n` items as `collate` makes of `ShapesDataset(size, two_object_prob=,
    paraphrase=, label=, language=)` items: {"image": FloatTensor [n, 3, size, size] in [-1, 1],
    "caption": list[str]} (+ "label": LongTensor [n], + "attributes": list[dict]).

    Drawn by `generator` on its device; tensors end on `device` (default: that device).
    """
    check_language(language)
    layout = sample_layout(n, generator, size, two_object_prob)
    coin = torch.randint(0, _UNIT, (n, 1), generator=generator, device=generator.device)
    pick = torch.randint(0, _WIDE, (n, 1), generator=generator, device=generator.device)
    host = [layout.classes, layout.two[:, None].long(), layout.relation[:, None], coin, pick]
    if attributes:
        host += [layout.sizes, layout.corners.flatten(1)]
    rows = torch.cat(host, 1).tolist()  # the one transfer to the host
    if language == "both":  # drawn last, so "en" and "es" keep their streams
        spanish = torch.rand(n, generator=generator, device=generator.device) < 0.5
        languages = ["es" if s else "en" for s in spanish.tolist()]
    else:
        languages = [language] * n
    if paraphrase:
        captions = [
            paraphrase_caption(_scene(r), _Drawn(r[4], r[5]), lang)
            for r, lang in zip(rows, languages, strict=True)
        ]
    else:
        captions = [
            canonical_caption(_scene(r), lang) for r, lang in zip(rows, languages, strict=True)
        ]
    layout = layout.to(device or generator.device)
    batch: dict[str, Any] = {"image": rasterise(layout, size), "caption": captions}
    if attributes:
        batch["attributes"] = [_attributes(r[:4] + r[6:], size) for r in rows]
    if label:
        batch["label"] = layout.classes[:, 0].clone()
    return batch


class ShapesBatches:
    """Training batches of a `ShapesDataset`'s distribution (its size, two_object_prob,
    paraphrase, label and language options), drawn by `generator` and rendered on its device.

    The data set's seed and length do not apply: the stream is the generator's.
    """

    def __init__(
        self,
        dataset: ShapesDataset,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ):
        if not isinstance(dataset, ShapesDataset):
            raise ValueError(f"ShapesBatches needs a ShapesDataset, got {type(dataset).__name__}")
        self.dataset, self.generator, self.device = dataset, generator, device

    def next(self, n: int) -> dict[str, Any]:
        d = self.dataset
        return render_batch(
            n,
            self.generator,
            size=d.size,
            two_object_prob=d.two_object_prob,
            paraphrase=d.paraphrase,
            label=d.label,
            language=d.language,
            device=self.device,
        )
