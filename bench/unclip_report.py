"""unCLIP (prior + decoder) against a direct text model, at equal CPU time, on one CLIP.

    .venv/bin/python bench/unclip_report.py --clip CLIP_FOLDER --minutes 60

trains, on `shapes` (both languages where the data set has them), an unCLIP prior and
decoder that share `--minutes` (the prior `--prior-share` of it) and a text model of the same
U-Net conditioned on the same CLIP's per-token text states (`--text-encoder clip`) for the
same minutes; then writes docs/unclip/report.md with, for both designs: alignment on the
200 + 200 prompts (English and Spanish) by the exact `shapes` scorer; the CLIP score
(cosine of the prompt's and the image's embeddings); diversity (mean pairwise CLIP-embedding
and pixel distance between images of one prompt); and pictures: variations of held-out
images and an interpolation strip. Training and evaluation each report their CPU seconds.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import time
from itertools import combinations
from pathlib import Path

import torch

from difusion.alignment import prompt_set, score_batch
from difusion.data.shapes import ShapesDataset
from difusion.images import grid, to_pil
from difusion.pipeline import Pipeline
from difusion.prior_train import PriorTrainConfig, train_prior
from difusion.train import TrainConfig, train
from difusion.unclip import frozen_clip, pack

HUGE = 10**9  # steps: the minutes stop every run


def languages() -> list[str]:
    """English, and Spanish where the prompt set has it."""
    return ["en", "es"] if "language" in inspect.signature(prompt_set).parameters else ["en"]


def data_options() -> dict:
    """Captions in both languages where the data set has them."""
    return {"language": "both"} if "language" in inspect.signature(ShapesDataset).parameters else {}


def timed(fn, *args, **kwargs):
    """fn's result, and its CPU seconds (all threads) and wall seconds."""
    cpu, wall = time.process_time(), time.monotonic()
    out = fn(*args, **kwargs)
    return out, time.process_time() - cpu, time.monotonic() - wall


def unet_options(args) -> dict:
    return dict(
        data="shapes", steps=HUGE, batch_size=args.batch_size, channels=args.channels,
        channel_mult=tuple(int(c) for c in args.channel_mult.split(",")),
        attention_resolutions=tuple(int(c) for c in args.attention.split(",")),
        log_every=50, sample_every=HUGE, checkpoint_every=500, data_options=data_options(),
        seed=args.seed,
    )  # fmt: skip


def train_all(args, work: Path) -> dict:
    """The three runs (or those already in `work`), with their CPU and wall seconds."""
    prior_minutes = args.minutes * args.prior_share
    jobs = {
        "prior": lambda: train_prior(
            PriorTrainConfig(
                data="shapes",
                clip=args.clip,
                out=str(work / "prior"),
                steps=HUGE,
                minutes=prior_minutes,
                batch_size=args.prior_batch_size,
                data_options=data_options(),
                log_every=50,
                sample_every=HUGE,
                checkpoint_every=500,
                seed=args.seed,
            ),
            progress=False,
        ),  # fmt: skip
        "decoder": lambda: train(
            TrainConfig(
                out=str(work / "decoder"),
                minutes=args.minutes - prior_minutes,
                cond="image",
                clip=args.clip,
                **unet_options(args),
            ),
            progress=False,
        ),  # fmt: skip
        "text": lambda: train(
            TrainConfig(
                out=str(work / "text"),
                minutes=args.minutes,
                cond="text",
                text_encoder="clip",
                text_encoder_path=args.clip,
                **unet_options(args),
            ),
            progress=False,
        ),  # fmt: skip
    }
    times_file = work / "times.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    for name, job in jobs.items():
        if name in times:
            continue
        print(f"training {name} ...", file=sys.stderr, flush=True)
        _, cpu, wall = timed(job)
        times[name] = {"cpu_s": cpu, "wall_s": wall}
        times_file.write_text(json.dumps(times, indent=2))
    return times


@torch.no_grad()
def clip_score(clip, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Cosine of each image's CLIP embedding with its prompt's."""
    scores = []
    for i in range(0, len(prompts), 100):
        img = clip.encode_image(images[i : i + 100])
        txt = clip.encode_text(prompts[i : i + 100])
        scores.append((img * txt).sum(-1))
    return torch.cat(scores)


def draw(
    pipe: Pipeline, prompts: list[str], seed: int, batch: int = 50, n: int = 1
) -> torch.Tensor:
    return torch.cat(
        [
            pipe.sample(prompts[i : i + batch], seed=seed + i, n=n)
            for i in range(0, len(prompts), batch)
        ]
    )


def diversity(clip, pipe: Pipeline, prompts: list[str], k: int, seed: int) -> dict:
    """Mean pairwise CLIP-embedding distance (1 - cos) and pixel RMS distance between k
    images of each prompt."""
    x = draw(pipe, prompts, seed, batch=max(1, 50 // k), n=k).view(
        len(prompts), k, *pipe_shape(pipe)
    )
    emb_d, pix_d = [], []
    for images in x:
        e = clip.encode_image(images)
        for a, b in combinations(range(k), 2):
            emb_d.append(1 - float(e[a] @ e[b]))
            pix_d.append(float((images[a] - images[b]).pow(2).mean().sqrt()))
    return {"clip_distance": sum(emb_d) / len(emb_d), "pixel_distance": sum(pix_d) / len(pix_d),
            "pairs": len(emb_d)}  # fmt: skip


def pipe_shape(pipe: Pipeline) -> tuple[int, int, int]:
    return 3, pipe.image_size, pipe.image_size


def evaluate(pipes: dict, clip, args) -> dict:
    results: dict = {}
    for lang in languages():
        kw = {"language": lang} if lang != "en" else {}
        prompts = prompt_set(args.n_single, args.n_double, seed=0, **kw)
        for name, pipe in pipes.items():
            x, cpu, _ = timed(draw, pipe, prompts, args.seed)
            s = score_batch(x, prompts)
            cs = clip_score(clip, x, prompts)
            results[(name, lang)] = {
                "single": s["pass_rate_single"], "double": s["pass_rate_double"],
                "n_single": s["n_single"], "n_double": s["n_double"],
                "clip_score": float(cs.mean()), "cpu_s_per_image": cpu / len(prompts),
            }  # fmt: skip
            print(name, lang, results[(name, lang)], file=sys.stderr, flush=True)
    few = prompt_set(args.diversity_prompts, args.diversity_prompts, seed=1)
    for name, pipe in pipes.items():
        results[(name, "diversity")] = diversity(clip, pipe, few, args.diversity_k, args.seed)
    return results


def pictures(unclip, out: Path, seed: int) -> None:
    """Variations of held-out images (one and two objects), and an interpolation strip."""
    held_out = ShapesDataset(size=unclip.image_size, seed=12345, length=64)
    sources = [held_out[i] for i in range(6)]
    rows = []
    for item in sources:
        rows += [to_pil(item["image"][None])[0], *unclip.variations(item["image"], n=5, seed=seed)]
    grid(rows, cols=6, scale=max(1, 64 // unclip.image_size)).save(out / "variations.png")
    a, b = sources[0]["image"], sources[3]["image"]
    weights = [i / 7 for i in range(8)]
    strip = unclip.variations(a, mix=b, weights=weights, seed=seed)
    grid(strip, cols=len(strip), scale=max(1, 64 // unclip.image_size)).save(
        out / "interpolation.png"
    )


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def winner(a: float, b: float, higher: bool = True) -> str:
    if abs(a - b) < 1e-9:
        return "tie"
    return "unCLIP" if (a > b) == higher else "direct text"


def rate_winner(a: float, b: float, n: int) -> str:
    """The higher pass rate, or "within noise" where the two differ by less than twice the
    standard error of their difference (binomial, n prompts each)."""
    se = ((a * (1 - a) + b * (1 - b)) / n) ** 0.5
    if abs(a - b) <= 2 * se:
        return f"within noise ({pct(a)} vs {pct(b)}, 2 s.e. = {pct(2 * se)})"
    return f"{winner(a, b)} ({pct(a)} vs {pct(b)})"


def write_report(path: Path, args, times: dict, results: dict, command: str) -> None:
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    lines = [
        "# unCLIP (prior + decoder) against a direct text model",
        "",
        f"Made by `{command}` on {machine} (shared with other work: timings are noisy), "
        f"torch {torch.__version__}. CLIP: `{args.clip}`. Data: `shapes` "
        f"({'English and Spanish captions' if data_options() else 'English captions'}).",
        "",
        "## Training at equal time",
        "",
        "Budgets are wall-clock minutes on this machine (each run stops when its `--minutes`"
        " are spent); the CPU seconds each run used are measured beside them.",
        "",
        "| run | budget (min) | CPU s | wall s |",
        "| --- | --- | --- | --- |",
        f"| unCLIP prior | {args.minutes * args.prior_share:g} | {times['prior']['cpu_s']:.0f} | "
        f"{times['prior']['wall_s']:.0f} |",
        f"| unCLIP decoder | {args.minutes * (1 - args.prior_share):g} | "
        f"{times['decoder']['cpu_s']:.0f} | {times['decoder']['wall_s']:.0f} |",
        f"| direct text model | {args.minutes:g} | {times['text']['cpu_s']:.0f} | "
        f"{times['text']['wall_s']:.0f} |",
        "",
        "## Alignment (exact `shapes` scorer) and CLIP score",
        "",
        "| model | language | one object | two objects | n | CLIP score | CPU s / image |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (name, lang), r in results.items():
        if lang == "diversity":
            continue
        lines.append(
            f"| {name} | {lang} | {pct(r['single'])} | {pct(r['double'])} | "
            f"{r['n_single']} + {r['n_double']} | {r['clip_score']:.3f} | "
            f"{r['cpu_s_per_image']:.3f} |"
        )
    lines += [
        "",
        "## Diversity",
        "",
        f"{args.diversity_k} images for each of {2 * args.diversity_prompts} prompts; the mean "
        "over pairs of images of one prompt.",
        "",
        "| model | CLIP-embedding distance (1 - cos) | pixel RMS distance | pairs |",
        "| --- | --- | --- | --- |",
    ]
    for name in ("unclip", "text"):
        d = results[(name, "diversity")]
        lines.append(
            f"| {name} | {d['clip_distance']:.4f} | {d['pixel_distance']:.4f} | {d['pairs']} |"
        )
    verdicts = []
    for lang in languages():
        u, t = results[("unclip", lang)], results[("text", lang)]
        for key, what in (("single", "one object"), ("double", "two objects")):
            verdicts.append(
                f"- alignment, {what} ({lang}): {rate_winner(u[key], t[key], u['n_' + key])}"
            )
        verdicts.append(f"- CLIP score ({lang}): {winner(u['clip_score'], t['clip_score'])}")
    du, dt = results[("unclip", "diversity")], results[("text", "diversity")]
    verdicts.append(
        f"- diversity (CLIP-embedding distance): {winner(du['clip_distance'], dt['clip_distance'])}"
    )
    verdicts.append(
        f"- diversity (pixel distance): {winner(du['pixel_distance'], dt['pixel_distance'])}"
    )
    lines += ["", "## Which design won", "", *verdicts, ""]
    lines += [
        "## Variations and interpolation",
        "",
        "Held-out `shapes` images (first column) and five variations of each, drawn by the "
        "decoder from the image's CLIP embedding:",
        "",
        "![variations](variations.png)",
        "",
        "The slerp from one held-out image's embedding to another's, one noise for all:",
        "",
        "![interpolation](interpolation.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clip", required=True, help="the CLIP folder both designs use")
    p.add_argument("--minutes", type=float, default=60.0, help="training budget of each design")
    p.add_argument("--prior-share", type=float, default=0.25, help="of unCLIP's budget")
    p.add_argument("--work", default="runs/unclip_report", help="run folders (reused if there)")
    p.add_argument("--out", default="docs/unclip")
    p.add_argument("--n-single", type=int, default=200)
    p.add_argument("--n-double", type=int, default=200)
    p.add_argument("--diversity-prompts", type=int, default=9, help="of each kind")
    p.add_argument("--diversity-k", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--prior-batch-size", type=int, default=128)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--channel-mult", default="1,2,2")
    p.add_argument("--attention", default="16,8")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    times = train_all(args, work)
    model = work / "unclip"
    if not model.is_dir():
        pack(work / "prior", work / "decoder", model)
    pipes = {
        "unclip": Pipeline.from_pretrained(model),
        "text": Pipeline.from_pretrained(work / "text"),
    }
    clip = frozen_clip(args.clip)
    results = evaluate(pipes, clip, args)
    pictures(pipes["unclip"], out, args.seed)
    command = "python bench/unclip_report.py " + " ".join(sys.argv[1:])
    write_report(out / "report.md", args, times, results, command)
    print(f"wrote {out / 'report.md'}")


if __name__ == "__main__":
    main()
