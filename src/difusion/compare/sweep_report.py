"""The budget sweep's numbers summarised (mean ± std over seeds), where the two FID curves
cross, the verdict in words, `fid_vs_minutes.png` and `sweep.md`. A sweep of several recipes
(`sweep["kinds"]`: the GAN and each recipe) races every recipe against the GAN, and says
which family leads at each budget."""

from __future__ import annotations

import math
from pathlib import Path

from .config import HEADLINE, SAMPLER_NAMES
from .evaluation import sample_std
from .report import fmt, fmt_count

METRIC_NAMES = {
    "inception_fid": "Inception FID",
    "fid": "classifier FID",
    "precision": "precision",
    "recall": "recall",
}


def kinds(sweep: dict) -> list[str]:
    """The families of runs: gan and diffusion, or gan and each recipe."""
    return sweep.get("kinds", ["gan", "diffusion"])


def families(sweep: dict) -> list[str]:
    return [*kinds(sweep), *(f"student-{k}" for k in sweep.get("student_steps", []))]


def family_name(family: str) -> str:
    return {"gan": "GAN", "diffusion": "diffusion"}.get(family, family)


def value(result: dict, family: str, metric: str) -> float | None:
    """One number of a run at one budget; `family` is gan, diffusion or student-K (the
    diffusion run's student with K lcm steps)."""
    if family.startswith("student-"):
        student = result.get("student") or {}
        if metric == "steps":
            return student.get("train_steps")
        k = family.removeprefix("student-")
        if metric == "inception_fid":  # students measured before they had one: none
            return ((student.get("inception") or {}).get(k) or {}).get("fid")
        return (student.get("steps", {}).get(k) or {}).get(metric)
    if metric == "inception_fid":
        return (result.get("inception") or {}).get("fid")
    if metric == "steps":
        return result.get("steps")
    if metric == "train_minutes":
        return result["train_seconds"] / 60 if "train_seconds" in result else None
    if metric == "images_per_second":
        return result.get("images_per_second")
    return (result.get("final") or {}).get(metric)


def stats(values: list[float | None]) -> dict:
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": sum(vals) / len(vals), "std": sample_std(vals), "n": len(vals)}


def summarize(sweep: dict) -> dict:
    """Mean, std and count over seeds of every number, per budget and family; then, for each
    FID, where the GAN's and the diffusion model's curves cross and the verdict in words."""
    metrics = [*METRIC_NAMES, "kid_mean", "steps", "train_minutes", "images_per_second"]
    table: dict = {}
    for minutes in sweep["budgets"]:
        at = [r for r in sweep["runs"] if r["budget_minutes"] == minutes]
        table[f"{minutes:g}"] = {}
        for family in families(sweep):
            kind = "diffusion" if family.startswith("student-") else family  # the teacher's
            runs = [r for r in at if r["kind"] == kind]
            table[f"{minutes:g}"][family] = {
                m: stats([value(r, family, m) for r in runs]) for m in metrics
            }
    races = {}
    for metric in ("inception_fid", "fid"):
        if "diffusion" in kinds(sweep):
            minutes, gan, diffusion = curves(table, sweep["budgets"], metric)
            if minutes:
                races[metric] = {
                    "crossing_minutes": crossing_point(minutes, gan, diffusion),
                    "verdict": describe_race(minutes, gan, diffusion, METRIC_NAMES[metric]),
                }
            continue
        recipes = {}
        for recipe in kinds(sweep)[1:]:
            minutes, gan, diffusion = curves(table, sweep["budgets"], metric, recipe)
            if minutes:
                recipes[recipe] = {
                    "crossing_minutes": crossing_point(minutes, gan, diffusion),
                    "verdict": describe_race(
                        minutes, gan, diffusion, f"{METRIC_NAMES[metric]}, {recipe}", recipe
                    ),
                }
        if recipes:
            races[metric] = {
                "verdict": leaders(table, sweep["budgets"], metric, kinds(sweep)),
                "recipes": recipes,
            }
    return {"budgets": table, "races": races}


def leaders(table: dict, budgets: list[float], metric: str, families: list[str]) -> str:
    """Which family has the lowest mean `metric` at each budget, and the GAN's number."""
    parts = []
    for b in budgets:
        row = table.get(f"{b:g}", {})
        means = {f: row[f][metric]["mean"] for f in families if f in row}
        means = {f: m for f, m in means.items() if m is not None}
        if not means:
            continue
        best = min(means, key=means.get)
        part = f"at {b:g} min {family_name(best)} ({fmt(means[best])})"
        if best != "gan" and "gan" in means:
            part += f", the GAN {fmt(means['gan'])}"
        elif best == "gan" and len(means) > 1:
            runner = min((f for f in means if f != "gan"), key=means.get)
            part += f", the best recipe {runner} {fmt(means[runner])}"
        parts.append(part)
    if not parts:
        return f"{METRIC_NAMES[metric]}: no budget has numbers yet."
    return f"{METRIC_NAMES[metric]}, lowest: " + "; ".join(parts) + "."


def curves(table: dict, budgets: list[float], metric: str, family: str = "diffusion"):
    """The budgets at which the GAN and `family` have a mean of `metric`, and the two means."""
    rows = [
        (b, table[f"{b:g}"]["gan"][metric]["mean"], table[f"{b:g}"][family][metric]["mean"])
        for b in budgets
        if f"{b:g}" in table
    ]
    rows = [r for r in rows if r[1] is not None and r[2] is not None]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def _first_meeting(gaps: list[float]) -> tuple[int, bool] | None:
    """(i, True): the curves are level at budget i; (i, False): diffusion − GAN changes sign
    between budgets i and i + 1; None: neither, anywhere."""
    for i, gap in enumerate(gaps):
        if gap == 0:
            return i, True
        if i + 1 < len(gaps) and gap * gaps[i + 1] < 0:
            return i, False
    return None


def crossing_point(minutes: list[float], gan: list[float], diffusion: list[float]) -> float | None:
    """The first training time at which the two FID curves meet: a budget where they are
    level (a touch, or a crossing right there), or where diffusion − GAN changes sign between
    two budgets, interpolated linearly in log-minutes (so the point lies on the plot's
    straight segments on its log axis); None if they never meet."""
    gaps = [d - g for g, d in zip(gan, diffusion, strict=True)]
    meeting = _first_meeting(gaps)
    if meeting is None:
        return None
    i, level = meeting
    if level:
        return minutes[i]
    t = gaps[i] / (gaps[i] - gaps[i + 1])
    a, b = math.log(minutes[i]), math.log(minutes[i + 1])
    return math.exp(a + t * (b - a))


def _leader(gap: float, name: str = "diffusion") -> tuple[str, str]:
    """(ahead, behind) for a gap diffusion − GAN of FID (lower is better)."""
    return ("the GAN", name) if gap > 0 else (name, "the GAN")


def describe_race(
    minutes: list[float], gan: list[float], diffusion: list[float], what: str,
    name: str = "diffusion",
) -> str:  # fmt: skip
    """Which family wins at which budget and by how much, in a sentence led by `what` (the
    FID it is about; lower wins); `name` is the diffusion model's."""
    gaps = [d - g for g, d in zip(gan, diffusion, strict=True)]
    if not gaps:
        return f"{what}: no budget has numbers for both models yet."
    end = f"{minutes[-1]:g} minutes"
    meeting = _first_meeting(gaps)
    if meeting is None:
        by = f"by {fmt(abs(gaps[0]))} at {minutes[0]:g} min"
        if len(gaps) > 1:
            by += f" and {fmt(abs(gaps[-1]))} at {minutes[-1]:g} min"
        return f"{what}: {_leader(gaps[0], name)[0]} stays ahead up to {end}, {by}."
    i, level = meeting
    if not level:
        ahead, behind = _leader(gaps[i + 1], name)
        sentence = (
            f"{ahead} overtakes {behind} between {minutes[i]:g} and {minutes[i + 1]:g} minutes "
            f"(interpolated: {crossing_point(minutes, gan, diffusion):.3g} min)"
        )
    else:
        before = next((g for g in reversed(gaps[:i]) if g), 0.0)
        after = next((g for g in gaps[i + 1 :] if g), 0.0)
        sentence = f"the two are level at {minutes[i]:g} minutes"
        if before and after and (before > 0) != (after > 0):
            ahead, behind = _leader(after, name)
            sentence = f"{ahead} overtakes {behind} at {minutes[i]:g} minutes, where they are level"
        elif before and after:
            sentence += f", and {_leader(after, name)[0]} is ahead at the other budgets"
    if level and i + 1 == len(gaps):
        return f"{what}: {sentence}."
    last = (
        f"at {end} {_leader(gaps[-1], name)[0]} leads by {fmt(abs(gaps[-1]))} "
        f"({fmt(gan[-1])} GAN, {fmt(diffusion[-1])} {name})"
        if gaps[-1]
        else f"at {end} the two are level ({fmt(gan[-1])})"
    )
    return f"{what}: {sentence}; {last}."


def crossing_label(minutes: list[float], gan: list[float], diffusion: list[float]) -> str:
    """The crossing's label on the plot: who is ahead from when (or where a touch is)."""
    z = crossing_point(minutes, gan, diffusion)
    gaps = [(m, d - g) for m, g, d in zip(minutes, gan, diffusion, strict=True) if d != g]
    before = next((g for m, g in reversed(gaps) if m < z), 0.0)
    after = next((g for m, g in gaps if m > z), 0.0)
    if after and (before > 0) != (after > 0):
        return f"{_leader(after)[0].removeprefix('the ')} ahead from {z:.3g} min"
    return f"level at {z:.3g} min"


def plot_fid_vs_minutes(sweep: dict, path: Path) -> None:
    """FID against training minutes (log x) for both families, mean ± std over seeds, one
    panel per FID, the crossing marked and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    summary = sweep["summary"]
    metrics = [m for m in ("inception_fid", "fid") if m in summary["races"]]
    if not metrics:
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), dpi=100)
    axes = list(axes) if len(metrics) > 1 else [axes]
    others = ["tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:cyan"]
    colours = {"gan": "tab:red", **dict(zip(kinds(sweep)[1:], others, strict=False))}
    for ax, metric in zip(axes, metrics, strict=True):
        for family in kinds(sweep):
            name = family_name(family)
            rows = [
                (b, summary["budgets"][f"{b:g}"][family][metric])
                for b in sweep["budgets"]
                if f"{b:g}" in summary["budgets"]
            ]
            rows = [(b, s) for b, s in rows if s["mean"] is not None]
            xs, ms = [b for b, _ in rows], [s["mean"] for _, s in rows]
            sd = [s["std"] if s["n"] > 1 else 0.0 for _, s in rows]
            ax.plot(xs, ms, marker="o", color=colours.get(family), label=name)
            if any(sd):
                lo = [m - s for m, s in zip(ms, sd, strict=True)]
                hi = [m + s for m, s in zip(ms, sd, strict=True)]
                ax.fill_between(xs, lo, hi, color=colours.get(family), alpha=0.2, lw=0)
        z = summary["races"][metric].get("crossing_minutes")  # a sweep of one recipe
        if z is not None:
            minutes, gan, diffusion = curves(summary["budgets"], sweep["budgets"], metric)
            y = _interpolate(minutes, gan, z)
            ax.axvline(z, color="grey", ls=":", lw=1)
            ax.plot([z], [y], marker="X", color="black", ms=10, zorder=5)
            ax.annotate(crossing_label(minutes, gan, diffusion), (z, y), textcoords="offset points",
                        xytext=(8, 8), fontsize=9)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks(sweep["budgets"], [f"{b:g}" for b in sweep["budgets"]])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training time (min, log scale)")
        n = sweep["config"]["inception_samples" if metric == "inception_fid" else "samples"]
        ax.set_ylabel(f"{METRIC_NAMES[metric]} ↓ (n={n}; mean ± std over seeds)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(f"{sweep['data']}: FID against training time")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _interpolate(minutes: list[float], ys: list[float], z: float) -> float:
    """y at z on the polyline through (log minutes, ys)."""
    for i in range(len(minutes) - 1):
        if minutes[i] <= z <= minutes[i + 1]:
            t = math.log(z / minutes[i]) / math.log(minutes[i + 1] / minutes[i])
            return ys[i] + t * (ys[i + 1] - ys[i])
    return ys[min(range(len(minutes)), key=lambda i: abs(minutes[i] - z))]


def _cell(s: dict, seeds: int, whole: bool = False) -> str:
    """mean ± std (the value alone in a sweep of one seed), with how many of the seeds have
    it when not all do; `whole`: counts, as whole numbers."""
    if s["mean"] is None:
        return "n/a"
    show = (lambda v: f"{v:,.0f}") if whole else fmt
    if seeds == 1:
        return show(s["mean"])
    cell = f"{show(s['mean'])} ± {show(s['std']) if s['n'] > 1 else 'n/a'}"
    return cell + (f" ({s['n']} of {seeds} seeds)" if s["n"] < seeds else "")


def _mean_wall(runs: list[dict], keys: tuple[str, ...]) -> float:
    walls = [sum(r.get("wall_seconds", {}).get(k, 0.0) for k in keys) for r in runs]
    return sum(walls) / len(walls) if walls else 0.0


def on_what(sweep: dict) -> str:
    """The device and the CPU of the runs; where budgets were measured on several CPUs (a
    sweep continued on another machine), which budgets on which."""
    cpus: dict[str, list[float]] = {}
    for r in sweep["runs"]:
        if "cpu" in r and r["budget_minutes"] not in cpus.setdefault(r["cpu"], []):
            cpus[r["cpu"]].append(r["budget_minutes"])
    env = sweep["environment"]
    if len(cpus) <= 1:
        cpu = next(iter(cpus), env.get("cpu"))
        return f"{env['device']} ({cpu})" if cpu and env["device"] == "cpu" else env["device"]
    parts = [f"{cpu} ({', '.join(f'{b:g}' for b in sorted(b))} min)" for cpu, b in cpus.items()]
    return f"{env['device']}, budgets measured on several CPUs: {'; '.join(parts)},"


def _header(sweep: dict) -> list[str]:
    """Title, verdicts, models, how things were measured and the sweep's wall time."""
    cfg, env, summary, seeds = (
        sweep["config"],
        sweep["environment"],
        sweep["summary"],
        sweep["seeds"],
    )
    recipes = kinds(sweep)[1:] if "diffusion" not in kinds(sweep) else []
    command = f"--budgets {','.join(f'{b:g}' for b in sweep['budgets'])}"
    if recipes:
        command = f"--recipes {','.join(recipes)} {command}"
    lines = [
        f"# {'Diffusion recipes' if recipes else 'Diffusion'} vs GAN at several training "
        f"budgets: {sweep['data']}",
        "",
        f"Made by `difusion compare {command}`, "
        f"on {on_what(sweep)} with {env['threads']} thread{'s' if env['threads'] != 1 else ''} "
        f"(torch {env['torch']}); preset `{cfg['preset']}`; {len(seeds)} seed"
        f"{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}) per model and budget. "
        "A budget is a run's total training time: each run continued from its checkpoint at "
        "the budget before, so it was trained once, to the largest budget."
        + (" Cells are mean ± std across seeds (sample std)." if len(seeds) > 1 else ""),
        "",
    ]
    for metric in ("inception_fid", "fid"):
        if metric in summary["races"]:
            lines += [f"**{summary['races'][metric]['verdict']}**", ""]
            for race in summary["races"][metric].get("recipes", {}).values():
                lines.append(f"- {race['verdict']}")
            lines += [""] if summary["races"][metric].get("recipes") else []
    info, models = sweep["info"], sweep.get("models", {})
    for kind in [*kinds(sweep)[1:], "gan"]:
        m, title = models.get(kind), {"diffusion": "Diffusion"}.get(kind, family_name(kind))
        if m:
            params = f"{fmt_count(m['params'])} parameters" + (
                f" (+ discriminator {fmt_count(m['params_d'])})" if "params_d" in m else ""
            )
            lines.append(f"- {title}: {m['description']}; {params}.")
    inception = (
        f"; the Inception FID on the first {cfg['inception_samples']} samples of the same draw"
        if cfg["inception"]
        else "; no Inception FID (--no-inception)"
    )
    lines.append(
        f"- Headline metrics: {min(cfg['samples'], info['real_images'])} samples a model "
        f"against as many real images in `{info['feature_net']}` features "
        f"({info['feature_net_note']}){inception}. Diffusion samples with "
        f"{SAMPLER_NAMES[HEADLINE[0]]}, {HEADLINE[1]} steps; both models use their EMA weights."
    )
    if sweep["distill_minutes"] > 0:
        spaces = (
            "FIDs, in the classifier's features and in Inception's, stand"
            if students_have_inception(summary)
            else "FID is in the classifier's features only,"
        )
        lines.append(
            f"- Students: at every budget the diffusion model was distilled (consistency "
            f"distillation, `difusion distill`) for {sweep['distill_minutes']:g} minutes, "
            "**extra compute on top of the budget**, and sampled with "
            f"{'/'.join(map(str, sweep['student_steps']))} `lcm` steps; their {spaces} "
            f"beside their teacher's {HEADLINE[1]} steps in the diffusion row."
        )
    starts = env.get("starts_seconds", [env.get("seconds", 0.0)])
    took = f"- The sweep took {env.get('seconds', 0.0) / 60:.1f} minutes of wall time"
    if len(starts) > 1:
        at_once = sum(starts) > env.get("seconds", 0.0) + 1.0
        took += (
            f" ({' + '.join(f'{s / 60:.1f}' for s in starts)} over {len(starts)} starts"
            + (", some of them at once" if at_once else "")
            + ")"
        )
    return [*lines, took + ".", ""]


def students_have_inception(summary: dict) -> bool:
    """Whether any student of the sweep has an Inception FID (older sweeps' have none)."""
    return any(
        s["inception_fid"]["n"] > 0
        for row in summary["budgets"].values()
        for family, s in row.items()
        if family.startswith("student-")
    )


def _table(sweep: dict) -> list[str]:
    """Budget x model: steps, training time, FIDs, precision and recall."""
    inception, seeds = sweep["config"]["inception"], len(sweep["seeds"])
    columns = ["Inception FID ↓"] if inception else []
    columns += ["FID (classifier) ↓", "precision ↑", "recall ↑", "training images/s"]
    lines = [
        "| budget (min) | model | steps (students: distillation) | training (min) | "
        + " | ".join(columns)
        + " |",
        "|---" * (4 + len(columns)) + "|",
    ]
    for minutes in sweep["budgets"]:
        row = sweep["summary"]["budgets"].get(f"{minutes:g}")
        for family, s in (row or {}).items():
            student = family.startswith("student-")
            if student and s["fid"]["mean"] is None:
                continue
            k = family.removeprefix("student-")
            if student:
                name = f"student ({k} lcm step{'s' if k != '1' else ''})"
            else:
                name = "GAN" if family == "gan" else f"{family_name(family)} ({HEADLINE[1]} steps)"
            cells = [_cell(s["steps"], seeds, whole=True)]
            cells.append("—" if student else _cell(s["train_minutes"], seeds))
            if inception:
                none = student and s["inception_fid"]["mean"] is None
                cells.append("—" if none else _cell(s["inception_fid"], seeds))
            cells += [_cell(s[m], seeds) for m in ("fid", "precision", "recall")]
            cells.append("—" if student else _cell(s["images_per_second"], seeds, whole=True))
            lines.append(f"| {minutes:g} | {name} | " + " | ".join(cells) + " |")
    return lines


def _costs(sweep: dict) -> list[str]:
    """The wall time of each budget (the basis of an estimate for a longer sweep) and the
    runs that stopped on a non-finite loss."""
    students = sweep["distill_minutes"] > 0
    lines = [
        "Wall time per budget (mean over seeds, seconds): training to the budget from the one "
        "before, then measuring"
        + ("; the students' distillation and measuring." if students else "."),
        "",
        "| budget (min) | " + " | ".join(map(family_name, kinds(sweep))) + " |"
        + (" students |" if students else ""),
        "|---|" + "---|" * len(kinds(sweep)) + ("---|" if students else ""),
    ]  # fmt: skip
    for minutes in sweep["budgets"]:
        at = [r for r in sweep["runs"] if r["budget_minutes"] == minutes]
        if not at:
            continue
        runs_of = {kind: [r for r in at if r["kind"] == kind] for kind in kinds(sweep)}
        cells = [fmt(_mean_wall(runs, ("train", "measure"))) for runs in runs_of.values()]
        if students:
            cells.append(fmt(_mean_wall(runs_of["diffusion"], ("distill", "measure_student"))))
        lines.append(f"| {minutes:g} | " + " | ".join(cells) + " |")
    errors = [r for r in sweep["runs"] if r.get("error")]
    lines += [""] if errors else []
    for r in errors:
        lines.append(f"- {r['kind']} seed {r['seed']} at {r['budget_minutes']:g} min: {r['error']}")
    return lines


def write_sweep_report(sweep: dict, folder: Path) -> Path:
    """sweep.md and fid_vs_minutes.png from a sweep's numbers."""
    lines = _header(sweep) + _table(sweep)
    plot = folder / "fid_vs_minutes.png"
    plot_fid_vs_minutes(sweep, plot)
    if plot.is_file():
        lines += ["", f"![FID against training minutes]({plot.name})"]
    lines += ["", *_costs(sweep)]
    path = folder / "sweep.md"
    path.write_text("\n".join(lines) + "\n")
    return path
