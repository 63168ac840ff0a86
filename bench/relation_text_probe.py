"""Does the frozen MiniLM encoder tell which object of a two-object prompt lies on which side?

A probe shaped like one of the U-Net's cross-attention layers: a learnt query for each place
("top or left", "bottom or right", one pair per axis) attends to the prompt's MiniLM tokens
through the same `Attention` module, and a small MLP names the colour of the object there.
Trained on 80% of the two-object captions with distinct colours (canonical, or two
paraphrases each), it is scored on the held-out 20%: the place's colour, and whether it
ranks the right one of the prompt's two colours first. If it reaches 100%, the direction is
in the tokens and a query that knows its place can read it; a text model at chance on the
direction (bench/relation_direction.py) then lacks the query, not the text.

About a minute on this 2-core CPU:

    .venv/bin/python bench/relation_text_probe.py [--paraphrases]
"""

from __future__ import annotations

import argparse
import itertools
import random

import torch
import torch.nn.functional as F
from torch import nn

from difusion.data import shapes
from difusion.nn.attention import Attention
from difusion.text import load_text_encoder

COLORS = list(shapes.COLORS)


def examples(paraphrases: bool) -> list[tuple[str, int, int, int]]:
    """(caption, axis, colour on the top/left, colour on the bottom/right)."""
    objects = list(itertools.product(shapes.COLORS, shapes.SHAPES))
    rows = []
    for a, b in itertools.permutations(objects, 2):
        if a[0] == b[0]:
            continue
        for rel in shapes.RELATIONS:
            spec = {"objects": [{"color": c, "shape": s} for c, s in (a, b)], "relation": rel}
            axis, sign = shapes.AXIS[rel]
            near, far = (a, b) if sign == 1 else (b, a)
            rng = random.Random(len(rows))
            texts = (
                [shapes.paraphrase(spec, rng) for _ in range(2)]
                if paraphrases
                else [shapes.canonical_caption(spec)]
            )
            rows += [(t, axis, COLORS.index(near[0]), COLORS.index(far[0])) for t in texts]
    return rows


class Probe(nn.Module):
    def __init__(self, context_dim: int, dim: int = 128, heads: int = 4):
        super().__init__()
        self.places = nn.Parameter(torch.randn(2, 2, dim) * 0.02)  # [axis, near/far]
        self.attn = Attention(dim, heads, context_dim)
        self.head = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, len(COLORS))
        )

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, axis: torch.Tensor):
        q = self.places[axis]  # [B, 2, dim]
        return self.head(q + self.attn(q, tokens, mask))  # [B, 2, colours]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paraphrases", action="store_true", help="two varied captions per scene")
    ap.add_argument("--steps", type=int, default=600)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = examples(args.paraphrases)
    encoder = load_text_encoder("minilm")
    with torch.no_grad():
        parts = [
            encoder.encode([r[0] for r in rows[i : i + 256]]) for i in range(0, len(rows), 256)
        ]
    tokens, mask = (torch.cat(p) for p in zip(*parts, strict=True))
    axis, near, far = (torch.tensor([r[k] for r in rows]) for k in (1, 2, 3))
    order = torch.randperm(len(rows))
    test, train = order[: len(rows) // 5], order[len(rows) // 5 :]
    probe = Probe(encoder.dim)
    opt = torch.optim.Adam(probe.parameters(), 1e-3)
    print(f"{len(rows)} captions ({len(train)} train, {len(test)} held out)")
    print("| step | held-out colour at the near place | at the far place | right order |")
    print("| --- | --- | --- | --- |")
    for step in range(args.steps + 1):
        if step % (args.steps // 4) == 0:
            with torch.no_grad():
                logits = probe(tokens[test], mask[test], axis[test])
            n, f = near[test, None], far[test, None]
            right = (logits[:, 0].gather(1, n) > logits[:, 0].gather(1, f)).float().mean()
            hits = [
                (logits[:, k].argmax(-1) == y[test]).float().mean()
                for k, y in ((0, near), (1, far))
            ]
            print(f"| {step} | {hits[0]:.1%} | {hits[1]:.1%} | {right:.1%} |", flush=True)
        batch = train[torch.randint(len(train), (256,))]
        logits = probe(tokens[batch], mask[batch], axis[batch])
        loss = F.cross_entropy(logits[:, 0], near[batch]) + F.cross_entropy(
            logits[:, 1], far[batch]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()


if __name__ == "__main__":
    main()
