"""docs/clip/report.md from a CLIP folder, in one command:

    PYTHONPATH=src .venv/bin/python bench/clip_report.py --clip src/difusion/weights/clip \\
        --run runs/clip

- the model (its configuration, parameters, folder size) and, with `--run`, how it was trained
  (the command's options, steps, minutes) and its probe along training (probe.png);
- zero-shot classification and text-to-image retrieval on held-out data in each language,
  each with its n (`difusion eval --clip`);
- the CLIP score of a text-to-image model's images (`--model`, default the shipped one)
  beside the exact shapes scorer, in each language: the ROC AUC of the score separating
  the images the scorer passes from those it fails, with n (`difusion eval MODEL --alignment
  --clip`).

- with `--study WORK`: text models guided by MiniLM, by this CLIP and by an encoder trained
  with them, trained for equal CPU time, on the 200 + 200 alignment prompts
  in English and Spanish (bench/equal_time.py's `clip`, `minilm` and `scratch` designs,
  trained and measured in WORK where they are not there yet).

Two sections are filled by hand, between their markers: the fine-tunes of the shipped
MiniLM model on bilingual captions, and a grid of Spanish prompts. Running the script again
keeps what stands between the markers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

import equal_time
import torch

from difusion.clip_eval import evaluate_clip, format_rows, load_clip
from difusion.evaluate import evaluate_alignment
from difusion.model import DiffusionModel, resolve_checkpoint
from difusion.runs import Run

ROOT = Path(__file__).resolve().parents[1]
KEPT = {
    "study": "*Not measured yet: `bench/clip_report.py --study WORK`.*",
    "alignment": "*To be filled: the shipped MiniLM model fine-tuned on bilingual captions.*",
    "grid": "*To be filled: a grid of Spanish prompts and their images.*",
}


def kept_sections(report: Path) -> dict[str, str]:
    """What stands between each `<!-- begin: NAME -->` and `<!-- end: NAME -->` of a report."""
    text = report.read_text() if report.is_file() else ""
    found = re.findall(r"<!-- begin: (\w+) -->\n(.*?)<!-- end: \1 -->", text, re.S)
    return {**KEPT, **{name: body.strip() for name, body in found}}


def training_section(run: Path, out_dir: Path) -> list[str]:
    cfg = json.loads((run / "train_config.json").read_text())
    log = Run(run).read_log()
    steps = [r for r in log if "loss" in r]
    seconds, last = 0.0, 0
    for r in steps:  # each log line: the steps since the last one at its rate
        seconds += (r["step"] - last) / max(r["steps_per_s"], 1e-9)
        last = r["step"]
    options = " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in cfg.items()
        if k in ("data", "batch_size", "lr", "warmup", "channels", "seed")
    )
    lines = [
        "## Training",
        "",
        f"`difusion train --model clip {options} --layers-per-block {cfg['layers']}"
        + "".join(f" --data-option {k}={v}" for k, v in cfg["data_options"].items())
        + f" --steps {cfg['steps']}`",
        "",
        f"{last} steps of {cfg['batch_size']} pairs in about {seconds / 60:.0f} minutes; last "
        f"logged loss {steps[-1]['loss']:.3f}, in-batch image-to-text accuracy "
        f"{steps[-1]['accuracy']:.1%}, temperature {steps[-1]['temperature']:.1f}.",
    ]
    if (run / "probe.png").is_file():
        shutil.copyfile(run / "probe.png", out_dir / "probe.png")
        lines += [
            "",
            "Held-out text-to-image R@1 along training (the probe):",
            "",
            "![](probe.png)",
        ]
    return lines + [""]


def clip_score_section(clip, model_name: str, prompts: int) -> list[str]:
    model = DiffusionModel.load(resolve_checkpoint(model_name))
    lines = [
        f"## The CLIP score against the exact scorer ({model_name} model)",
        "",
        f"{prompts} one-object + {prompts} two-object prompts per language, one image each "
        "(seed 0). The CLIP score is the cosine of the prompt's and the image's embeddings; "
        "the ROC AUC is the chance that an image the exact scorer passes scores above one it "
        "fails (0.5: the score does not tell them apart).",
        "",
        "| language | passed (exact) | mean score, passed | mean score, failed | ROC AUC | n passed / failed |",
        "|---|---|---|---|---|---|",
    ]
    for language in ("en", "es"):
        r = evaluate_alignment(model, prompts, prompts, (0,), language=language, clip=clip)
        n = r["clip_n_passed"] + r["clip_n_failed"]
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(
            f"| {language} | {r['clip_n_passed'] / n:.1%} | {fmt(r['clip_score_passed'])} "
            f"| {fmt(r['clip_score_failed'])} | {fmt(r['clip_auc'])} "
            f"| {r['clip_n_passed']} / {r['clip_n_failed']} |"
        )
    return lines + [""]


ENCODERS = {"minilm": "MiniLM", "clip": "our CLIP", "scratch": "scratch encoder"}
MARKED = (  # sections kept from the report unless this run makes them
    (
        "study",
        "MiniLM, our CLIP and a scratch encoder guiding the shipped U-Net, at equal CPU time",
    ),
    ("alignment", "The shipped MiniLM model fine-tuned on bilingual captions"),
    ("grid", "Spanish prompts and their images"),
)


def only_study(args) -> None:
    """`--only-study`: the report as it is, with its study section made again."""
    text = args.out.read_text()
    body = "\n".join(study_section(args)).strip()
    marked = re.compile(r"(<!-- begin: study -->\n).*?(<!-- end: study -->)", re.S)
    if marked.search(text):
        text = marked.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    else:  # before the first kept section
        title = dict(MARKED)["study"]
        first = text.rfind("## ", 0, text.index("<!-- begin: alignment -->"))
        block = f"## {title}\n\n<!-- begin: study -->\n{body}\n<!-- end: study -->\n\n"
        text = text[:first] + block + text[first:]
    args.out.write_text(text)
    print(f"wrote {args.out}")


def study_section(args) -> list[str]:
    """Text models of each encoder at equal time, from bench/equal_time.py's WORK folder."""
    times = {name: equal_time.trained(args, args.study, name) for name in args.encoders}
    results = {name: equal_time.measured(args, args.study, name) for name in args.encoders}
    steps = times[args.encoders[0]].get("steps", args.steps)  # what the runs were given
    lines = [
        f"`python bench/equal_time.py --clip CLIP --steps {steps} --designs "
        f"{','.join(args.encoders)}`: each path from the shipped model, {steps} steps of batch "
        f"{args.batch_size} on one thread on `shapes` captioned in English and Spanish. MiniLM: the shipped model "
        "fine-tuned whole (`--init`); our CLIP and the scratch encoder: a new text model "
        f"warm-started from `{args.start}`'s U-Net (`--warm-start`; the cross-attention's keys "
        "and values and a new layout map start fresh), reading the encoder's per-token "
        "states. Strict scorer, one image a prompt (seed 0), the model's sampler and "
        "guidance; the CLIP score under this CLIP.",
        "",
        "| encoder | CPU minutes | language | one object | two objects | n | CLIP score |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in args.encoders:
        title = ENCODERS[name]
        for lang in equal_time.LANGUAGES:
            r = results[name][lang]
            lines.append(
                f"| {title} | {times[name]['cpu_s'] / 60:.1f} | {lang} | {r['single']:.1%} | "
                f"{r['double']:.1%} | {r['n_single']} + {r['n_double']} | "
                f"{r['clip_score']:.3f} |"
            )
    best = {
        lang: max(
            args.encoders, key=lambda n: results[n][lang]["single"] + results[n][lang]["double"]
        )
        for lang in equal_time.LANGUAGES
    }
    lines += [
        "",
        "Best at this budget (one- plus two-object rate): "
        + "; ".join(f"{lang}: {ENCODERS[best[lang]]}" for lang in equal_time.LANGUAGES)
        + ".",
        "",
    ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clip", type=Path, default=ROOT / "src/difusion/weights/clip")
    p.add_argument("--run", type=Path, help="the CLIP's run folder (how it was trained)")
    p.add_argument("--model", default="default", help="text-to-image model for the CLIP score")
    p.add_argument("-n", type=int, default=1000, help="held-out items per data set and language")
    p.add_argument("--prompts", type=int, default=200, help="prompts of each kind per language")
    p.add_argument("--out", type=Path, default=ROOT / "docs/clip/report.md")
    p.add_argument("--study", type=Path, help="bench/equal_time.py's folder: encoders compared")
    p.add_argument("--only-study", action="store_true", help="remake the --study section alone")
    p.add_argument("--encoders", default=",".join(ENCODERS), help="compared in --study")
    equal_time.add_study_arguments(p)
    args = p.parse_args()
    args.encoders = [e for e in args.encoders.split(",") if e]
    if not args.encoders or set(args.encoders) - set(ENCODERS):
        p.error(f"--encoders: a comma-separated list of {', '.join(ENCODERS)}")
    if args.only_study:
        if args.study is None or not args.out.is_file():
            p.error("--only-study needs --study WORK and an existing report")
        return only_study(args)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))

    start = time.monotonic()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    kept = kept_sections(args.out)
    clip = load_clip(args.clip)
    params = sum(p.numel() for p in clip.parameters())
    megabytes = sum(f.stat().st_size for f in args.clip.iterdir()) / 1e6
    c = clip.config
    lines = [
        "# Our CLIP: zero-shot, retrieval and the CLIP score, in English and Spanish",
        "",
        f"Made by `bench/clip_report.py` from `{os.path.relpath(args.clip.resolve(), ROOT)}` "
        "on a 2-core AMD EPYC, shared.",
        "",
        f"A ViT of {c.vision_layers} layers, width {c.vision_width}, {c.patch_size}x"
        f"{c.patch_size} patches of {c.image_size}x{c.image_size} images, and a causal text "
        f"transformer of {c.text_layers} layers, width {c.text_width}, over CLIP's BPE "
        f"({c.vocab_size} tokens: its first {c.vocab_size - 514} merges), {c.context_length} "
        f"tokens at most; joint embeddings of {c.embed_dim}. {params / 1e6:.2f}M parameters; "
        f"the folder is {megabytes:.1f} MB.",
        "",
    ]
    if args.run is not None:
        lines += training_section(args.run, args.out.parent)
    rows = evaluate_clip(clip, n=args.n)
    lines += [
        "## Zero-shot classification and text-to-image retrieval (held-out data)",
        "",
        "`difusion eval --clip FOLDER -n N`. Zero-shot: fashion's 10 classes (test split, "
        "each class prompted with the mean embedding of its captions), shapes' 18 colour x "
        "shape classes on one-object scenes of an unseen seed (canonical captions). Retrieval: "
        "each caption ranks the images; a hit when one of the first k shows what it says (the "
        "same emoji, scene or class). Chance: what a random pick scores.",
        "",
        format_rows(rows),
        "",
    ]
    lines += clip_score_section(clip, args.model, args.prompts)
    if args.study is not None:
        kept["study"] = "\n".join(study_section(args)).strip()
    for name, title in MARKED:
        lines += [
            f"## {title}",
            "",
            f"<!-- begin: {name} -->",
            kept[name],
            f"<!-- end: {name} -->",
            "",
        ]
    lines.append(f"*This report took {(time.monotonic() - start) / 60:.1f} minutes to make.*")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
