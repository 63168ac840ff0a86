"""How near prompts of each wording lie to the shipped model's training captions, as
`difusion generate` measures it (`difusion.familiar`), and what the check costs.

    OMP_NUM_THREADS=1 .venv/bin/python bench/familiar_prompts.py

72 evaluation prompts of each wording (`difusion.alignment.reword`), and a few prompts in
other languages, emoji and other scenes; for each class the range of the nearest-caption
cosine similarity and the share below `FAMILIAR` (flagged).
"""

from __future__ import annotations

import time

import torch

from difusion.alignment import UNSEEN_WORDINGS, prompt_set, reword
from difusion.familiar import FAMILIAR, nearest_similarity, training_captions, training_config
from difusion.model import resolve_checkpoint
from difusion.text import load_text_encoder

FOREIGN = [
    "un círculo rojo", "un cuadrado azul encima de un triángulo verde", "ein roter Kreis",
    "红色圆圈", "🔴 🟦", "a photo of a dog on the beach", "an astronaut riding a horse", "cat",
]  # fmt: skip


def main() -> None:
    encoder = load_text_encoder("minilm")
    captions = training_captions(training_config(resolve_checkpoint("default")))
    started = time.monotonic()
    encoder.pooled(captions)
    captions_s = time.monotonic() - started
    started = time.monotonic()
    encoder.pooled(["a red circle"])
    one_s = time.monotonic() - started
    prompts = prompt_set(36, 36, seed=1)
    classes = {kind: [reword(p, kind) for p in prompts] for kind in ("canonical", *UNSEEN_WORDINGS)}
    classes["other languages, emoji, scenes"] = FOREIGN
    print(f"| prompts | nearest-caption similarity | below {FAMILIAR} |\n|---|---|---|")
    for kind, texts in classes.items():
        near = nearest_similarity(encoder, texts, captions)
        share = (near < FAMILIAR).float().mean()
        print(f"| {kind} ({len(texts)}) | {near.min():.2f} to {near.max():.2f} | {share:.0%} |")
    print(f"encoding the {len(captions)} captions: {captions_s:.2f} s; one prompt: {one_s:.2f} s "
          f"({torch.get_num_threads()} threads)")  # fmt: skip


if __name__ == "__main__":
    main()
