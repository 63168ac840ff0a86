"""How well a CLIP sees: zero-shot classification and text-to-image retrieval on held-out
data, in each language; and the CLIP score of generated images beside the exact scorer.

Held-out data (never in a CLIP run's training draws):

- `shapes`: scenes of the seed `HELDOUT_SEED` with canonical captions (training draws its
  scenes from a generator stream of its own); zero-shot on one-object scenes, the 18
  colour x shape classes, prompted with their canonical captions ("a red circle").
- `emoji`: the "heldout" split (about 10% of the emoji, none seen in training).
- `fashion`: the "test" split; zero-shot over the 10 classes, each prompted with the mean
  embedding of all its captions (`fashion_variants`).

Retrieval: each caption ranks the set's images; a hit at k when one of the first k shows
what the caption says (the same emoji, the same scene, the same class: `item_keys`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .clip import Clip
from .data import collate, load_dataset
from .data.fashion import FASHION_CLASSES, fashion_variants
from .data.shapes import COLORS, SHAPES, canonical_caption

HELDOUT_SEED = 1_000_003
HELDOUT_SPLITS = {"emoji": ("train", "heldout"), "fashion": ("train", "test")}  # train, held out
EVAL_SETS = ("shapes", "emoji", "fashion")
ZERO_SHOT_SETS = ("fashion", "shapes")


def item_keys(batch: dict) -> list:
    """What each item of a collated batch shows, as a hashable key: the scene (its canonical
    caption) when it has attributes, else its label, else its image itself."""
    if "attributes" in batch:
        return [canonical_caption(a) for a in batch["attributes"]]
    if "label" in batch:
        return [int(label) for label in batch["label"]]
    return [hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in batch["image"].cpu()]


def key_ids(keys: list) -> Tensor:
    """Keys as integers, equal where the keys are equal."""
    ids: dict = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in keys])


def rgb(images: Tensor) -> Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def heldout_set(name: str, language: str, n: int, size: int = 32) -> dict:
    """Up to `n` held-out items of `name` with captions in `language`:
    {"image": [n, 3, size, size], "caption": [...], "key": LongTensor [n]}."""
    if name == "shapes":
        dataset = load_dataset(
            "shapes", size, seed=HELDOUT_SEED, paraphrase=False, length=n, language=language
        )
    else:
        dataset = load_dataset(name, size, split=HELDOUT_SPLITS[name][1], language=language)
    if name == "emoji":
        index = range(min(n, len(dataset)))
    else:  # a spread over the whole split, not its first images
        index = torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).long().tolist()
    batch = collate([dataset[i] for i in index])
    return {
        "image": rgb(batch["image"]),
        "caption": batch["caption"],
        "key": key_ids(item_keys(batch)),
    }


@torch.no_grad()
def embed(clip: Clip, images: Tensor | None = None, texts: list[str] | None = None, chunk=256):
    """Unit embeddings of images (in [-1, 1]) or of texts, in chunks."""
    if images is not None:
        parts = [clip.encode_image(images[i : i + chunk]) for i in range(0, len(images), chunk)]
    else:
        parts = [clip.encode_text(texts[i : i + chunk]) for i in range(0, len(texts), chunk)]
    return torch.cat(parts).float().cpu()


def retrieval(clip: Clip, data: dict, ks: tuple[int, ...] = (1, 5)) -> dict:
    """Text-to-image recall at each k of `data` (`heldout_set`'s form): {"R@1": .., "n": ..}."""
    sims = embed(clip, texts=data["caption"]) @ embed(clip, images=data["image"]).T
    keys = data["key"]
    ranked = keys[sims.argsort(dim=1, descending=True)]  # [texts, images] keys in rank order
    hits = ranked == keys[:, None]
    out = {f"R@{k}": hits[:, :k].any(1).float().mean().item() for k in ks}
    chance = (keys[:, None] == keys[None, :]).float().mean().item()  # R@1 of a random pick
    return {**out, "chance": chance, "n": len(keys)}


def zero_shot(clip: Clip, images: Tensor, labels: Tensor, class_prompts: list[list[str]]) -> dict:
    """Accuracy of picking each image's class by the nearest class embedding (the mean of the
    class's prompts' unit embeddings, as CLIP's prompt ensembles)."""
    prompts = [p for ps in class_prompts for p in ps]
    text = embed(clip, texts=prompts)
    owner = torch.tensor([c for c, ps in enumerate(class_prompts) for _ in ps])
    classes = torch.zeros(len(class_prompts), text.shape[1]).index_add_(0, owner, text)
    pred = (embed(clip, images=images) @ F.normalize(classes, dim=-1).T).argmax(1)
    accuracy = (pred == labels).float().mean().item()
    return {"accuracy": accuracy, "chance": 1 / len(class_prompts), "n": len(labels)}


def zero_shot_set(clip: Clip, name: str, language: str, n: int, size: int = 32) -> dict:
    if name == "fashion":
        dataset = load_dataset("fashion", size, split="test")
        prompts = [fashion_variants(c, language) for c in range(len(FASHION_CLASSES))]
    else:
        dataset = load_dataset(
            "shapes", size, seed=HELDOUT_SEED, two_object_prob=0.0, label=True, length=n
        )
        prompts = [
            [canonical_caption({"objects": [{"color": c, "shape": s}]}, language)]
            for c in COLORS
            for s in SHAPES
        ]
    index = torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).long().tolist()
    batch = collate([dataset[i] for i in index])
    return zero_shot(clip, rgb(batch["image"]), batch["label"], prompts)


def evaluate_clip(
    clip: Clip, languages: tuple[str, ...] = ("en", "es"), n: int = 1000, size: int | None = None
) -> list[dict]:
    """Rows {"task", "data", "language", metrics..., "n"}: zero-shot on fashion and shapes,
    retrieval on shapes, emoji and fashion, in each language."""
    size = size or clip.config.image_size
    rows = []
    for language in languages:
        for name in ZERO_SHOT_SETS:
            result = zero_shot_set(clip, name, language, n, size)
            rows.append({"task": "zero-shot", "data": name, "language": language, **result})
        for name in EVAL_SETS:
            result = retrieval(clip, heldout_set(name, language, n, size))
            rows.append({"task": "retrieval", "data": name, "language": language, **result})
    return rows


def format_rows(rows: list[dict]) -> str:
    """A Markdown table of `evaluate_clip`'s rows."""
    lines = [
        "| task | data | language | accuracy / R@1 | R@5 | chance | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        first = r.get("accuracy", r.get("R@1"))
        r5 = f"{r['R@5']:.1%}" if "R@5" in r else ""
        lines.append(
            f"| {r['task']} | {r['data']} | {r['language']} | {first:.1%} | {r5} "
            f"| {r['chance']:.1%} | {r['n']} |"
        )
    return "\n".join(lines)


# --- the CLIP score of generated images ---------------------------------------------------------


@torch.no_grad()
def clip_scores(clip: Clip, images: Tensor, prompts: list[str]) -> Tensor:
    """Cosine of each image's embedding and its prompt's, [n]."""
    return (embed(clip, images=images) * embed(clip, texts=list(prompts))).sum(1)


def roc_auc(scores: Tensor, positive: Tensor) -> float | None:
    """The probability that a random positive scores above a random negative (ties count
    half): the area under the ROC curve. None without both kinds."""
    pos, neg = scores[positive.bool()], scores[~positive.bool()]
    if not len(pos) or not len(neg):
        return None
    above = (pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()
    return above.mean().item()


def clip_score_summary(rows: list[tuple[Tensor, list[bool]]]) -> dict:
    """Batches of (CLIP scores, exact verdicts) -> the scores' means over passed and failed
    images, the ROC AUC of the score separating them (None without both), and every image's
    score and verdict, in order."""
    scores = torch.cat([s for s, _ in rows])
    passed = torch.tensor([bool(p) for _, ps in rows for p in ps])
    mean = lambda m: scores[m].mean().item() if m.any() else None  # noqa: E731
    return {
        "clip_score_passed": mean(passed),
        "clip_score_failed": mean(~passed),
        "clip_auc": roc_auc(scores, passed),
        "clip_n_passed": int(passed.sum()),
        "clip_n_failed": int((~passed).sum()),
        "clip_scores": [round(v, 4) for v in scores.tolist()],
        "exact_passed": passed.tolist(),
    }


def load_clip(folder: str | Path, device: str | torch.device = "cpu") -> Clip:
    """A CLIP folder, frozen, for measuring (one ValueError line if it is not one)."""
    return Clip.load(folder).to(device).eval().requires_grad_(False)
