"""The study's report: report.md, its tables (`comparison_rows`) and its plots."""

from __future__ import annotations

import math
from pathlib import Path

from .config import COLLAPSE_RULE, HEADLINE, SAMPLER_NAMES, SPEED_CONFIGS, CompareConfig
from .evaluation import sample_std


def fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if v == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(v)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{v:,.{decimals}f}"


def fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def spread(values: list[float | None], digits: int = 3) -> str:
    """The mean ± std of the finite values (sample std; n/a for one value)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "n/a"
    m = sum(vals) / len(vals)
    return f"{fmt(m, digits)} ± {fmt(sample_std(vals), digits) if len(vals) > 1 else 'n/a'}"


def late_fluctuation(run: dict, metric: str = "fid") -> float | None:
    """Std of a metric over the points of the second half of training (None below 2)."""
    half = run.get("train_seconds", 0.0) / 2
    values = [p[metric] for p in run.get("curve", []) if p["seconds"] >= half and metric in p]
    return sample_std(values) if len(values) >= 2 else None


def _final(run: dict, key: str, scale: float = 1.0) -> float | None:
    final = run.get("final") or {}
    return final[key] * scale if key in final and final[key] is not None else None


def comparison_rows(entry: dict, cfg: dict) -> list[tuple[str, str, str]]:
    """(row label, GAN cell, diffusion cell) of one data set's table; section rows have
    empty cells."""
    runs = entry["runs"]
    info = entry["info"]
    net = info["feature_net"]
    n = min(cfg["samples"], info["real_images"])  # fakes are compared with as many reals
    n_curve = min(cfg["curve_samples"], info["real_images"])
    k = {kind: len(runs[kind]) for kind in ("gan", "diffusion")}

    def cell(kind: str, values: list[float | None], what: str) -> str:
        return f"{spread(values)} ({what}; {k[kind]} seed{'s' if k[kind] != 1 else ''})"

    def final_row(label: str, key: str, what: str, scale: float = 1.0):
        return (
            label,
            *(
                cell(kind, [_final(r, key, scale) for r in runs[kind]], what)
                for kind in ("gan", "diffusion")
            ),
        )

    def fid_range(kind: str) -> str:
        vals = [v for v in (_final(r, "fid") for r in runs[kind]) if v is not None]
        vals = [v for v in vals if math.isfinite(v)]
        if not vals:
            return "n/a"
        seeds = f"{k[kind]} seed{'s' if k[kind] != 1 else ''}"
        return f"{fmt(min(vals))} – {fmt(max(vals))} ({net}, n={n}; {seeds})"

    rows: list[tuple[str, str, str]] = [("**Stability**", "", "")]
    rows.append(
        ("FID of the final model, best – worst seed", fid_range("gan"), fid_range("diffusion"))
    )
    rows.append(
        (
            "FID fluctuation in the second half of training (std along the curve)",
            *(
                cell(
                    kind,
                    [late_fluctuation(r) for r in runs[kind]],
                    f"{net}, n={n_curve} a point",
                )
                for kind in ("gan", "diffusion")
            ),
        )
    )
    for label, key in (
        ("runs diverged (non-finite loss)", "diverged"),
        ("runs collapsed (mode coverage rule)", "collapsed"),
    ):
        cells = []
        for kind in ("gan", "diffusion"):
            flags = [r.get(key) for r in runs[kind]]
            known = [f for f in flags if f is not None]
            if not known:
                cells.append("n/a (no class labels)")
                continue
            text = f"{sum(bool(f) for f in known)} of {len(known)}"
            cells.append(text + (f" ({net} labels, n={n})" if key == "collapsed" else ""))
        rows.append((label, *cells))
    rows.append(
        (
            "training steps in the budget",
            *(
                cell(
                    kind, [float(r["steps"]) for r in runs[kind]], f"{cfg['budget_minutes']:g} min"
                )
                for kind in ("gan", "diffusion")
            ),
        )
    )
    rows.append(("**Quality**", "", ""))
    rows.append(final_row("FID ↓", "fid", f"{net}, n={n}"))
    rows.append(final_row("KID ×10³ ↓", "kid_mean", f"{net}, n={n}", 1e3))
    rows.append(final_row("precision ↑", "precision", f"{net}, n={n}, k=3"))
    if any(r.get("inception") for kind in runs for r in runs[kind]):
        ni = next(r["inception"]["n"] for kind in runs for r in runs[kind] if r.get("inception"))
        rows.append(
            (
                "Inception FID ↓",
                *(
                    cell(
                        kind,
                        [(r.get("inception") or {}).get("fid") for r in runs[kind]],
                        f"{info['inception_net']}, n={ni}",
                    )
                    for kind in ("gan", "diffusion")
                ),
            )
        )
    rows.append(("**Diversity**", "", ""))
    rows.append(final_row("recall ↑", "recall", f"{net}, n={n}, k=3"))
    if any("classes_covered" in (r.get("final") or {}) for kind in runs for r in runs[kind]):
        classes = next(
            r["final"]["num_classes"]
            for kind in runs
            for r in runs[kind]
            if "num_classes" in (r.get("final") or {})
        )
        rows.append(
            final_row(
                f"classes covered (of {classes}) ↑", "classes_covered", f"{net} labels, n={n}"
            )
        )
        rows.append(final_row("class KL from the data ↓", "class_kl", f"{net} labels, n={n}"))
    rows.append(("**Generation speed** (images/s ↑)", "", ""))
    speed = entry.get("speed", {})
    g = speed.get("gan")

    def rate(s: dict | None, what: str) -> str:
        if not s:
            return "n/a"
        return f"{fmt(s['mean'])} ± {fmt(s['std']) if s['repeats'] > 1 else 'n/a'} ({what}; batch {s['batch']}, {s['repeats']} timed run{'s' if s['repeats'] != 1 else ''})"

    for sampler, steps in SPEED_CONFIGS:
        label = f"{SAMPLER_NAMES[sampler]}, {steps} steps"
        rows.append(
            (
                f"diffusion: {label}; GAN: one pass",
                rate(g, "one pass"),
                rate(speed.get(f"{sampler}-{steps}"), label),
            )
        )
    return rows


def _plain_ticks(*axes) -> None:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for axis in axes:
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())


def _plot_curves(entry: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = entry["runs"]
    coverage = any("classes_covered" in p for kind in runs for r in runs[kind] for p in r["curve"])
    fig, axes = plt.subplots(1, 2 if coverage else 1, figsize=(11 if coverage else 6, 3.8), dpi=100)
    axes = list(axes) if coverage else [axes]
    colours = {"gan": "tab:red", "diffusion": "tab:blue"}
    for kind in ("gan", "diffusion"):
        for i, r in enumerate(runs[kind]):
            pts = [p for p in r["curve"] if p.get("fid") is not None]
            label = f"{kind}" if i == 0 else None
            xs = [p["seconds"] / 60 for p in pts]
            axes[0].plot(
                xs, [p["fid"] for p in pts], marker="o", color=colours[kind], alpha=0.8, label=label
            )
            if coverage:
                axes[1].plot(
                    xs,
                    [p.get("classes_covered") for p in pts],
                    marker="o",
                    color=colours[kind],
                    alpha=0.8,
                    label=label,
                )
            if r.get("diverged") and pts:
                axes[0].plot(xs[-1], pts[-1]["fid"], "x", color="black", ms=10)
    net = entry["info"]["feature_net"]
    axes[0].set_ylabel(f"FID ({net})")
    axes[0].set_yscale("log")
    _plain_ticks(axes[0].yaxis)
    if coverage:
        axes[1].set_ylabel("classes covered")
    for ax in axes:
        ax.set_xlabel("training wall time (min)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_steps(entry: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = entry.get("steps_curve") or {}
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    for sampler, points in curve.get("samplers", {}).items():
        ax.plot(
            [p["steps"] for p in points],
            [p["fid"] for p in points],
            marker="o",
            label=SAMPLER_NAMES.get(sampler, sampler),
        )
    if curve.get("gan_fid") is not None:
        ax.axhline(curve["gan_fid"], color="tab:red", ls="--", label="GAN (one pass)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_ticks(ax.xaxis, ax.yaxis)
    ax.set_xlabel("sampling steps (= network evaluations per image)")
    ax.set_ylabel(f"FID ({curve.get('feature_net', '')}, n={curve.get('n', '?')})")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _seeds_text(cfg: dict) -> str:
    config = CompareConfig.from_dict(cfg)
    counts = {Path(d).name: config.seeds_for(d) for d in config.data}

    def seeds(n: int) -> str:
        return f"{n} seed{'s' if n != 1 else ''}"

    if len(set(counts.values())) == 1:
        return f"{seeds(next(iter(counts.values())))} per model and data set"
    return ", ".join(f"{seeds(n)} on {name}" for name, n in counts.items()) + " per model"


def write_report(results: dict, out: str | Path) -> Path:
    """report.md (and the plots it shows) from the numbers of a study."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, env = results["config"], results["environment"]
    lines = [
        "# Diffusion vs GAN on the same wall-clock budget",
        "",
        "Made by `difusion compare`. Every model trained for "
        f"**{cfg['budget_minutes']:g} minutes** of wall time (batch {cfg['batch_size']}), "
        f"with **{_seeds_text(cfg)}**, on {env['device']} with {env['threads']} thread"
        f"{'s' if env['threads'] != 1 else ''} (torch {env['torch']}); preset "
        f"`{cfg['preset']}`. Cells are mean ± std across seeds (sample std; n/a with one seed), "
        "each with the feature network and the number of samples (and as many real images) "
        "behind it.",
        "",
        f"- Headline metrics: **{cfg['samples']} samples a model**; diffusion samples with "
        f"{SAMPLER_NAMES[HEADLINE[0]]}, {HEADLINE[1]} steps; both models use their EMA "
        f"weights (decay {cfg['ema_decay']}).",
        f"- Along training: the latest checkpoint every budget / {cfg['curve_points']} of wall "
        f"time and at the end, {cfg['curve_samples']} samples each.",
        f"- Quality against sampling steps: the first seed's model, {cfg['steps_samples']} "
        "samples a point.",
        f"- Speed: batch {cfg['speed_batch']}, mean ± std of {cfg['speed_repeats']} timed runs "
        "after a warm-up (DDPM-1000: at most 2).",
        f"- Collapse: {COLLAPSE_RULE}.",
        "- FID and KID use torchmetrics on the features; precision and recall are those of "
        "Kynkäänniemi et al. (2019) with k = 3.",
    ]
    if "seconds" in env:
        starts = env.get("starts_seconds", [env["seconds"]])
        parts = " + ".join(f"{s / 60:.1f}" for s in starts)
        lines.append(
            f"- The whole study took {env['seconds'] / 60:.1f} minutes"
            + (
                f" ({parts} over {len(starts)} starts; a start reuses the runs finished before it)."
                if len(starts) > 1
                else "."
            )
        )
    for data, entry in results["datasets"].items():
        info = entry["info"]
        name = Path(data).name
        (out / name).mkdir(exist_ok=True)
        lines += [
            "",
            f"## {data}",
            "",
            f"{info['images']} images of {info['size']}×{info['size']} px, "
            f"{info['channels']} channel{'s' if info['channels'] != 1 else ''}; feature network "
            f"`{info['feature_net']}` ({info['feature_net_note']}); {info['real_images']} real "
            "images drawn once (seed 0).",
            "",
        ]
        for kind, title in (("gan", "GAN"), ("diffusion", "Diffusion")):
            m = entry.get("models", {}).get(kind)
            if m:
                params = f"{fmt_count(m['params'])} parameters" + (
                    f" (+ discriminator {fmt_count(m['params_d'])})" if "params_d" in m else ""
                )
                lines.append(f"- {title}: {m['description']}; {params}.")
        for kind in ("gan", "diffusion"):
            for r in entry["runs"][kind]:
                if r.get("error"):
                    lines.append(f"- {kind} seed {r.get('seed', '?')}: {r['error']}")
        lines += ["", "| | GAN | diffusion |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in comparison_rows(entry, cfg)]
        _plot_curves(entry, out / name / "curves.png")
        lines += ["", f"![metric along training]({name}/curves.png)", ""]
        if (
            entry.get("steps_curve", {}).get("samplers")
            or entry.get("steps_curve", {}).get("gan_fid") is not None
        ):
            _plot_steps(entry, out / name / "steps.png")
            lines += [f"![quality against sampling steps]({name}/steps.png)", ""]
            curve = entry["steps_curve"]
            lines += ["| sampler | steps: FID |", "|---|---|"]
            for sampler, points in curve["samplers"].items():
                cells = ", ".join(f"{p['steps']}: {fmt(p['fid'])}" for p in points)
                lines.append(f"| {SAMPLER_NAMES.get(sampler, sampler)} | {cells} |")
            if curve.get("gan_fid") is not None:
                lines.append(f"| GAN (one pass) | 1: {fmt(curve['gan_fid'])} |")
            lines += [
                "",
                f"(FID with `{curve['feature_net']}`, n={curve['n']} samples a point.)",
                "",
            ]
        if (out / name / "samples.png").is_file():
            first = CompareConfig.from_dict(cfg).seed_list(data)[0]
            caption = f"samples, seed {first}: GAN left, diffusion right"
            lines += [f"![{caption}]({name}/samples.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
