"""The batch renderer draws ShapesDataset's distribution, pixel-exact, with tensor ops."""

import re
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from difusion.alignment import score_batch
from difusion.data import collate
from difusion.data import shapes_batch as sb
from difusion.data.shapes import (
    COLORS,
    INVERSE,
    RELATIONS,
    SHAPES,
    ShapesDataset,
    canonical_caption,
    class_index,
    min_gap,
    parse_prompt,
    relation_holds,
    render_array,
    size_range,
    spec_of,
)
from difusion.data.shapes_batch import ShapesBatches, render_batch

N_STATS = 4000  # items per side in the distribution comparisons
MIN_P = 1e-4  # a two-sample test fails below this p-value (these seeds: p >= 0.013)
MAX_Z = 4.5  # likewise for differences of means, in standard errors (these seeds: z <= 2.5)


def batch_of(n: int, seed: int, **kw) -> dict:
    return render_batch(n, torch.Generator().manual_seed(seed), attributes=True, **kw)


def per_sample(n: int, seed: int, **kw) -> dict:
    ds = ShapesDataset(seed=seed, **kw)
    return collate([ds[i] for i in range(n)])


def pixels(images: torch.Tensor) -> np.ndarray:
    """uint8 [N, H, W, 3] back from [-1, 1]."""
    return ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def reference_images(attributes: list[dict]) -> torch.Tensor:
    """What ShapesDataset draws for these attributes."""
    arrays = np.stack([render_array(a) for a in attributes])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def same_scene(p: dict, q: dict) -> bool:
    """Specs that say the same ("A left of B" is "B right of A")."""

    def readings(spec):
        objs = [(o["color"], o["shape"]) for o in spec["objects"]]
        rel = spec["relation"]
        return {tuple(objs)} if rel is None else {(*objs, rel), (*objs[::-1], INVERSE[rel])}

    return readings(p) == readings(q)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("size", [32, 64, 48])
def test_images_are_the_per_sample_drawings_of_valid_layouts(size):
    b = batch_of(600, seed=size, size=size, label=True)
    assert b["image"].shape == (600, 3, size, size) and b["image"].dtype == torch.float32
    assert torch.equal(b["image"], reference_images(b["attributes"]))
    gap = min_gap(size)
    for a, caption, label in zip(b["attributes"], b["caption"], b["label"].tolist(), strict=True):
        objs = a["objects"]
        assert same_scene(parse_prompt(caption), spec_of(a)), caption
        assert label == class_index(objs[0]["color"], objs[0]["shape"])
        for o in objs:
            lo, hi = size_range(o["shape"], size)
            assert lo <= o["size"] <= hi
            assert min(o["bbox"]) >= 0 and max(o["bbox"]) <= size
        if len(objs) == 2:
            p, q = objs
            assert (p["color"], p["shape"]) != (q["color"], q["shape"])
            assert relation_holds(p, q, a["relation"], size)
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = p["bbox"], q["bbox"]
            assert ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0
    palette = np.array([(0, 0, 0), *COLORS.values()], dtype=np.uint8)
    px = pixels(b["image"]).reshape(-1, 1, 3)
    assert ((px == palette).all(-1).sum(1) == 1).all()  # black or exactly one colour


@pytest.mark.parametrize(("size", "n"), [(32, 1000), (64, 300)])
@pytest.mark.parametrize("paraphrase", [False, True])
def test_the_alignment_scorer_passes_every_image(size, n, paraphrase):
    b = render_batch(n, torch.Generator().manual_seed(7), size=size, paraphrase=paraphrase)
    result = score_batch(b["image"], b["caption"])
    assert result["n_single"] > 0.4 * n and result["n_double"] > 0.4 * n
    assert result["passed"] == n, result["reasons"]


# ----------------------------------------------------------------------------- distribution

_WORDS = re.compile(
    "|".join([*COLORS, *SHAPES, *RELATIONS, "to its left", "to its right", "above it", "below it"])
)


def features(b: dict, size: int) -> dict[str, Counter]:
    """Categorical features of a collated batch, as counts."""
    f: dict[str, Counter] = {}

    def add(name, value):
        f.setdefault(name, Counter())[value] += 1

    bin_px = 4 * size // 32  # centre bins of 4 px at 32
    for a, caption in zip(b["attributes"], b["caption"], strict=True):
        objs = a["objects"]
        add("objects", len(objs))
        add("template", _WORDS.sub("_", caption))  # the wording, with the names blanked
        for k, o in enumerate(objs):
            add(f"colour{k}", o["color"])
            add(f"shape{k}", o["shape"])
            add(f"size of {o['shape']}", o["size"])
            add(f"centre x{k} of {len(objs)}", int(o["center"][0] // bin_px))
            add(f"centre y{k} of {len(objs)}", int(o["center"][1] // bin_px))
        if len(objs) == 2:
            add("relation", a["relation"])
            add("same colour", objs[0]["color"] == objs[1]["color"])
            d = [objs[1]["center"][i] - objs[0]["center"][i] for i in (0, 1)]
            along = "to the" in a["relation"]
            add("offset along", int(abs(d[1 - along]) // (bin_px / 4)))
            add("offset across", int(abs(d[along]) // (bin_px / 4)))
    return f


def chi2_p(a: Counter, b: Counter) -> float:
    """p-value of a two-sample chi-square test of two sets of counts."""
    keys = sorted(set(a) | set(b), key=str)
    return float(chi2_contingency([[a[k] for k in keys], [b[k] for k in keys]]).pvalue)


def image_stats(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image mean of each channel and fraction of non-black pixels."""
    stats = {f"mean {c}": images[:, i].mean((1, 2)) for i, c in enumerate("RGB")}
    stats["lit"] = (images > -1).any(1).float().mean((1, 2))
    return stats


def z_score(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a.mean() - b.mean()).abs() / (a.var() / len(a) + b.var() / len(b)).sqrt())


def compare(x: dict, y: dict, size: int) -> tuple[dict, dict]:
    fx, fy = features(x, size), features(y, size)
    assert set(fx) == set(fy)
    ps = {k: chi2_p(fx[k], fy[k]) for k in fx}
    sx, sy = image_stats(x["image"]), image_stats(y["image"])
    zs = {k: z_score(sx[k], sy[k]) for k in sx}
    return ps, zs


@pytest.fixture(scope="module")
def reference():
    """Per-sample batches of ShapesDataset, by canvas size (cached: the slow side)."""
    return {size: per_sample(N_STATS, seed=11, size=size) for size in (32, 64)}


@pytest.mark.parametrize("size", [32, 64])
def test_statistics_match_the_per_sample_data_set(reference, size):
    ps, zs = compare(batch_of(N_STATS, seed=5, size=size), reference[size], size)
    assert len(ps) == 19  # every feature compared (sizes, centres, offsets, wording, ...)
    assert min(ps.values()) > MIN_P, ps
    assert max(zs.values()) < MAX_Z, zs


def test_the_comparison_sees_a_changed_distribution(reference, monkeypatch):
    ps, _ = compare(batch_of(N_STATS, seed=5, two_object_prob=0.6), reference[32], 32)
    assert ps["objects"] < MIN_P
    monkeypatch.setattr(sb, "MIN_SEPARATION", 11)  # centres 1 px further apart
    ps, _ = compare(batch_of(N_STATS, seed=5), reference[32], 32)
    assert ps["offset along"] < MIN_P


@pytest.mark.parametrize(("prob", "counts"), [(0.0, {1: 300}), (1.0, {2: 300})])
def test_two_object_prob_extremes(prob, counts):
    b = batch_of(300, seed=1, two_object_prob=prob)
    assert Counter(len(a["objects"]) for a in b["attributes"]) == counts


# ----------------------------------------------------------------------------- interface


def test_deterministic_for_a_seed_and_different_across_seeds():
    a, b, c = (batch_of(64, seed=s, label=True) for s in (3, 3, 4))
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert torch.equal(a["label"], b["label"]) and a["attributes"] == b["attributes"]
    assert not torch.equal(a["image"], c["image"]) and a["caption"] != c["caption"]
    g = torch.Generator().manual_seed(3)
    first, second = render_batch(64, g), render_batch(64, g)  # the stream moves on
    assert torch.equal(first["image"], a["image"])
    assert not torch.equal(first["image"], second["image"])


def test_shapes_batches_take_the_data_set_options():
    ds = ShapesDataset(size=64, seed=0, two_object_prob=1.0, paraphrase=False, label=True)
    batches = ShapesBatches(ds, torch.Generator().manual_seed(0))
    b = batches.next(32)
    assert set(b) == {"image", "caption", "label"}
    assert b["image"].shape == (32, 3, 64, 64) and b["label"].dtype == torch.long
    specs = [parse_prompt(c) for c in b["caption"]]
    assert [canonical_caption(s) for s in specs] == b["caption"]
    assert all(len(s["objects"]) == 2 for s in specs)
    assert b["label"].tolist() == [class_index(**s["objects"][0]) for s in specs]
    assert not torch.equal(batches.next(32)["image"], b["image"])
    again = ShapesBatches(ds, torch.Generator().manual_seed(0)).next(32)
    assert torch.equal(again["image"], b["image"]) and again["caption"] == b["caption"]
    assert set(ShapesBatches(ShapesDataset(), torch.Generator()).next(2)) == {"image", "caption"}


def test_bad_inputs_are_one_line_value_errors():
    g = torch.Generator()
    with pytest.raises(ValueError, match="ShapesDataset"):
        ShapesBatches([1, 2], g)
    with pytest.raises(ValueError, match="n >= 1"):
        render_batch(0, g)
    with pytest.raises(ValueError, match="two_object_prob"):
        render_batch(4, g, two_object_prob=1.5)
    with pytest.raises(ValueError, match="size"):
        render_batch(4, g, size=8)
