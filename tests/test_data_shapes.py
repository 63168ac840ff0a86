"""The `shapes` data set follows the fixed spec of the design notes, measured on pixels."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from difusion.data import collate, load_dataset
from difusion.data.shapes import (
    CLASS_NAMES,
    COLORS,
    RELATIONS,
    SHAPES,
    ShapesDataset,
    canonical_caption,
    class_index,
    generate,
    layout,
    parse_prompt,
    render,
    spec_of,
)

SPEC_COLORS = {
    "red": (230, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 60, 230),
    "yellow": (235, 220, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 210, 220),
}
SPEC_SIZES = {"circle": (8, 13), "square": (7, 12), "triangle": (9, 14)}
INVERSE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
N = 400  # samples per property test


def pixels(item) -> np.ndarray:
    """uint8 [H, W, 3] back from the [-1, 1] tensor (exact: k/127.5 - 1 round-trips)."""
    return ((item["image"].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()


def object_pixels(img: np.ndarray, obj: dict) -> np.ndarray:
    """Mask of the object's colour inside its box (boxes never overlap, so it is its own)."""
    mask = np.zeros(img.shape[:2], dtype=bool)
    x0, y0, x1, y1 = obj["bbox"]
    mask[y0:y1, x0:x1] = (img[y0:y1, x0:x1] == obj["rgb"]).all(-1)
    return mask


def extent(mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1  # left, top, right, bottom (exclusive)


def check_shape(mask: np.ndarray, shape: str, k: int):
    """The drawn pixels have the spec's size and form; returns the measured centre."""
    left, top, right, bottom = extent(mask)
    w, h = right - left, bottom - top
    lo, hi = SPEC_SIZES[shape]
    assert w == h and lo * k <= w <= hi * k, (shape, w, h)
    box = mask[top:bottom, left:right]
    if shape == "square":
        assert box.all()
    elif shape == "circle":
        assert box[h // 2].all() and box[:, w // 2].all()  # full diameter both ways
        assert not box[0, 0] and not box[-1, -1]  # rounded corners
        assert abs(box.sum() - np.pi * w * w / 4) < 0.2 * w * w
    else:  # upright isosceles triangle, base at the bottom, height == base
        widths = box.sum(1)
        assert widths[-1] == w and widths[0] in (1, 2)
        assert (np.diff(widths) >= 0).all()
        assert np.array_equal(box, box[:, ::-1])  # symmetric
    return (left + right) / 2, (top + bottom) / 2


def test_spec_constants():
    assert COLORS == SPEC_COLORS
    assert SHAPES == ("circle", "square", "triangle")
    assert RELATIONS == ("to the left of", "to the right of", "above", "below")
    assert len(CLASS_NAMES) == 18 and CLASS_NAMES[0] == "red circle"


def test_deterministic_and_index_addressed():
    a, b = ShapesDataset(seed=3), ShapesDataset(seed=3)
    for i in [0, 1, 77, 49_999, 10**9]:  # any index works: the stream is infinite
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"])
        assert x["caption"] == y["caption"] and x["attributes"] == y["attributes"]
        assert generate(3, i) == x["attributes"]
    backwards = [a[i]["attributes"] for i in reversed(range(20))][::-1]
    assert backwards == [a[i]["attributes"] for i in range(20)]
    other = ShapesDataset(seed=4)
    assert sum(torch.equal(a[i]["image"], other[i]["image"]) for i in range(20)) < 3
    assert len(ShapesDataset(length=123)) == 123
    assert torch.equal(a[-1]["image"], a[len(a) - 1]["image"])


def test_items_images_and_palette():
    ds = ShapesDataset(seed=0)
    assert (ds.channels, ds.size, ds.num_classes, ds.class_names) == (3, 32, None, None)
    palette = {(0, 0, 0), *SPEC_COLORS.values()}
    for i in range(N):
        item = ds[i]
        x = item["image"]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        img = pixels(item)
        assert torch.allclose(torch.from_numpy(img).permute(2, 0, 1) / 127.5 - 1, x)
        colours = {tuple(c) for c in img.reshape(-1, 3).tolist()}
        assert colours <= palette
        assert (img[0, 0] == 0).all() or len(colours) > 1
        # every non-black pixel belongs to one of the objects
        covered = np.zeros((32, 32), dtype=bool)
        for o in item["attributes"]["objects"]:
            covered |= object_pixels(img, o)
        assert np.array_equal(covered, img.any(-1))
        json.loads(json.dumps(item["attributes"]))  # JSON-able


@pytest.mark.parametrize("size", [32, 64])
def test_sizes_separation_and_relations_measured_on_pixels(size):
    k = size // 32
    ds = ShapesDataset(size=size, seed=1, paraphrase=False)
    counts = Counter()
    for i in range(N):
        item = ds[i]
        img, attrs = pixels(item), item["attributes"]
        assert img.shape == (size, size, 3) and attrs["size"] == size
        objs = attrs["objects"]
        masks = [object_pixels(img, o) for o in objs]
        centres = []
        for o, m in zip(objs, masks, strict=True):
            centre = check_shape(m, o["shape"], k)
            assert list(extent(m)) == o["bbox"]
            assert list(centre) == o["center"] and o["size"] == o["bbox"][2] - o["bbox"][0]
            centres.append(centre)
        counts[len(objs)] += 1
        if len(objs) == 1:
            assert attrs["relation"] is None
            continue
        a, b = objs
        assert (a["color"], a["shape"]) != (b["color"], b["shape"])
        assert not (masks[0] & masks[1]).any()
        ax0, ay0, ax1, ay1 = a["bbox"]
        bx0, by0, bx1, by1 = b["bbox"]
        assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0  # boxes apart: no touching
        rel = attrs["relation"]
        counts[rel] += 1
        (xa, ya), (xb, yb) = centres
        along = {
            "to the left of": xb - xa,
            "to the right of": xa - xb,
            "above": yb - ya,
            "below": ya - yb,
        }
        assert along[rel] >= 10 * k
        across = abs(yb - ya) if rel in ("to the left of", "to the right of") else abs(xb - xa)
        assert along[rel] > across
    assert 0.4 * N < counts[2] < 0.6 * N
    assert all(counts[r] > 0.15 * counts[2] for r in RELATIONS)


def test_distribution_covers_colours_shapes_and_sizes():
    ds = ShapesDataset(seed=2, two_object_prob=0.0)
    objs = [ds.attributes(i)["objects"][0] for i in range(900)]
    combos = Counter((o["color"], o["shape"]) for o in objs)
    assert len(combos) == 18 and min(combos.values()) > 20
    for shape, (lo, hi) in SPEC_SIZES.items():
        assert {o["size"] for o in objs if o["shape"] == shape} == set(range(lo, hi + 1))
    assert all(
        len(ShapesDataset(two_object_prob=1.0).attributes(i)["objects"]) == 2 for i in range(50)
    )


def test_canonical_captions_parse_back():
    ds = ShapesDataset(seed=5, paraphrase=False)
    for i in range(N):
        item = ds[i]
        attrs = item["attributes"]
        assert item["caption"] == canonical_caption(attrs)
        assert parse_prompt(item["caption"]) == spec_of(attrs)
    assert (
        canonical_caption({"objects": [{"color": "red", "shape": "circle"}], "relation": None})
        == "a red circle"
    )
    spec = parse_prompt("a red circle to the left of a blue square")
    assert spec == {
        "objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}],
        "relation": "to the left of",
    }
    assert canonical_caption(spec) == "a red circle to the left of a blue square"
    assert parse_prompt("  A Red Circle. ") == {
        "objects": [{"color": "red", "shape": "circle"}],
        "relation": None,
    }
    for bad in ["", "a purple circle", "a red hexagon", "a red circle near a blue square", "dog"]:
        assert parse_prompt(bad) is None


def test_paraphrases_vary_and_mean_the_same():
    ds = ShapesDataset(seed=6, paraphrase=True)
    captions = set()
    for i in range(N):
        item = ds[i]
        spec, truth = parse_prompt(item["caption"]), spec_of(item["attributes"])
        assert spec is not None, item["caption"]
        if spec != truth:  # said the other way round: "B to the right of A"
            assert spec["objects"] == truth["objects"][::-1]
            assert spec["relation"] == INVERSE[truth["relation"]]
        captions.add(item["caption"])
    assert parse_prompt("a circle that is red") == parse_prompt("a red circle")
    assert parse_prompt("a blue square with a red circle to its left") == parse_prompt(
        "a red circle to the left of a blue square"
    )
    canonical = {canonical_caption(ds[i]["attributes"]) for i in range(N)}
    assert len(captions - canonical) > N // 4  # wording varies
    assert len(captions & canonical) > N // 4  # the canonical form is common in training


def test_render_spec_and_layout():
    attrs = generate(0, 11, two_object_prob=1.0)
    assert np.array_equal(np.asarray(render(attrs)), pixels(ShapesDataset(two_object_prob=1.0)[11]))
    big = np.asarray(render(attrs, 64))
    assert big.shape == (64, 64, 3)
    for o in attrs["objects"]:
        scaled = dict(o, bbox=[2 * v for v in o["bbox"]])
        check_shape(object_pixels(big, scaled), o["shape"], 2)
    # a parsed prompt is laid out per the spec, deterministically
    spec = parse_prompt("a green triangle above a green square")
    full = layout(spec, 64)
    assert spec_of(full) == spec and full["size"] == 64
    a, b = full["objects"]
    assert b["center"][1] - a["center"][1] >= 20
    assert np.array_equal(np.asarray(render(spec, 64)), np.asarray(render(full)))
    with pytest.raises(ValueError):
        layout({"objects": [{"color": "purple", "shape": "circle"}]})


def test_labels_and_dataloader():
    ds = load_dataset("shapes", length=16, label=True)
    assert isinstance(ds, ShapesDataset)
    assert ds.num_classes == 18 and ds.class_names == CLASS_NAMES
    for i in range(16):
        item = ds[i]
        first = item["attributes"]["objects"][0]
        assert item["label"] == class_index(first["color"], first["shape"])
        assert ds.class_names[item["label"]] == f"{first['color']} {first['shape']}"
    batch = next(iter(DataLoader(ds, batch_size=8, collate_fn=collate)))
    assert batch["image"].shape == (8, 3, 32, 32)
    assert batch["label"].dtype == torch.long and len(batch["caption"]) == 8
    assert len(batch["attributes"]) == 8
    assert load_dataset("shapes", size=64)[0]["image"].shape == (3, 64, 64)
    assert len(list(ds)) == 16


# ----------------------------------------------------------------------------- Spanish

ES_COLOURS = {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo"}
ES_COLOURS |= {"magenta": "magenta", "cyan": "cian"}
ES_SHAPES = {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo"}
ES_RELATIONS = {"to the left of": "a la izquierda de", "to the right of": "a la derecha de"}
ES_RELATIONS |= {"above": "encima de", "below": "debajo de"}
FEMININE = {"rojo": "roja", "amarillo": "amarilla"}  # the others do not change


def scenes():
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    for c, s in pairs:
        yield {"objects": [{"color": c, "shape": s}], "relation": None}
    for (c1, s1), (c2, s2) in ((a, b) for a in pairs for b in pairs if a != b):
        for r in RELATIONS:
            objs = [{"color": c1, "shape": s1}, {"color": c2, "shape": s2}]
            yield {"objects": objs, "relation": r}


def test_spanish_canonical_captions_for_every_scene():
    for scene in scenes():
        o = scene["objects"]
        words = [f"un {ES_SHAPES[x['shape']]} {ES_COLOURS[x['color']]}" for x in o]
        expected = (
            words[0] if len(o) == 1 else f"{words[0]} {ES_RELATIONS[scene['relation']]} {words[1]}"
        )
        assert canonical_caption(scene, "es") == expected
        assert parse_prompt(expected) == scene
    assert canonical_caption(
        {"objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}],
         "relation": "above"}, "es",
    ) == "un círculo rojo encima de un cuadrado azul"  # fmt: skip


def test_spanish_variants_agree_in_gender_and_mean_the_same():
    from difusion.data.shapes import _variants_es

    feminine_forms = set(FEMININE.values())
    for scene in scenes():
        for caption in _variants_es(scene):
            spec = parse_prompt(caption)
            assert spec is not None, caption
            if spec != scene:  # said the other way round
                assert spec["objects"] == scene["objects"][::-1], caption
                assert spec["relation"] == INVERSE[scene["relation"]], caption
            words = caption.split()
            for i, w in enumerate(words):
                if w in feminine_forms:  # a feminine adjective follows "figura", nothing else
                    assert words[i - 1] == "figura", caption
                if w in FEMININE:  # a masculine one never follows "figura"
                    assert words[i - 1] != "figura", caption
            assert "de el" not in caption and "una círculo" not in caption, caption
            assert not any(w in ("the", "of", "circle", "is", "with") for w in words), caption
    assert parse_prompt("el círculo rojo está encima del cuadrado azul") == parse_prompt(
        "un círculo rojo encima de un cuadrado azul"
    )
    assert parse_prompt("una figura amarilla con forma de triángulo") == parse_prompt(
        "a yellow triangle"
    )
    assert parse_prompt("Un circulo rojo sobre un cuadrado azul.") == parse_prompt(
        "a red circle above a blue square"
    )  # without accents, as people type


def test_language_option_keeps_scenes_and_the_english_stream():
    en, es, both = (ShapesDataset(seed=3, language=x) for x in ("en", "es", "both"))
    plain = ShapesDataset(seed=3)
    seen = Counter()
    for i in range(200):
        a, b, c, d = en[i], es[i], both[i], plain[i]
        assert a["caption"] == d["caption"]  # "en" is today's data, bit for bit
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], c["image"])
        assert parse_prompt(b["caption"]) is not None
        spanish = any(w in c["caption"].split() for w in ("un", "una", "el", "hay", "con"))
        spanish |= c["caption"].split()[0] in ES_SHAPES.values()
        seen[spanish] += 1
    assert 60 < seen[True] < 140  # about half of "both" is Spanish
    with pytest.raises(ValueError, match="language must be one of"):
        ShapesDataset(language="fr")
    loaded = load_dataset("shapes", language="es")
    assert loaded[0]["caption"] == ShapesDataset(language="es", length=len(loaded))[0]["caption"]


def test_rendered_batches_take_the_language_and_keep_their_scenes():
    from difusion.data.shapes_batch import render_batch

    def batch(language):
        return render_batch(64, torch.Generator().manual_seed(1), language=language)

    en, es = batch("en"), batch("es")
    assert torch.equal(en["image"], es["image"])
    assert en["caption"] == render_batch(64, torch.Generator().manual_seed(1))["caption"]
    for a, b in zip(en["caption"], es["caption"], strict=True):
        sa, sb = parse_prompt(a), parse_prompt(b)
        assert sa is not None and sb is not None
        assert sorted(map(str, sa["objects"])) == sorted(map(str, sb["objects"]))
    mixed = batch("both")["caption"]
    assert set(mixed) & set(es["caption"]) and set(mixed) & set(en["caption"])
