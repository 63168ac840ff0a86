"""`difusion eval` and `compare`: metrics of a model, and the diffusion-vs-GAN study."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .options import (
    Device,
    MinSNRGamma,
    Prediction,
    UserError,
    ZeroTerminalSNR,
    _ints,
    check_output_folder,
    check_sampling,
)


def eval_(
    checkpoint: Annotated[
        Path | None,
        typer.Argument(help="A run folder or a model .safetensors file (none with --clip alone)."),
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Real data to compare with (default: the run's).")
    ] = None,
    n: Annotated[int, typer.Option("-n", help="Samples (and real images) to compare.")] = 2000,
    feature_net: Annotated[
        str | None,
        typer.Option(help="inception, a data set's shipped classifier (default), or a file."),
    ] = None,
    alignment: Annotated[
        bool, typer.Option(help="Score prompt alignment (shapes text models).")
    ] = False,
    prompts: Annotated[
        int, typer.Option(help="With --alignment: prompts of each kind per seed.")
    ] = 200,
    seeds: Annotated[str, typer.Option(help="With --alignment: seeds, comma-separated.")] = "0",
    wording: Annotated[
        str | None,
        typer.Option(
            help="With --alignment: canonical (the default), or prompt with colour, shape or "
            "relation words unseen in training."
        ),
    ] = None,
    language: Annotated[
        str, typer.Option(help="With --alignment: the prompts' language, en or es.")
    ] = "en",
    clip: Annotated[
        Path | None,
        typer.Option(
            help="A CLIP folder: alone, its zero-shot and retrieval on held-out data in each "
            "language; with --alignment, each image's CLIP score and its ROC AUC."
        ),
    ] = None,
    sampler: Annotated[str | None, typer.Option(help="Sampler (default: the model's).")] = None,
    steps: Annotated[
        int | None, typer.Option(help="Sampling steps, 1 to 1000 (default: the model's).")
    ] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale.")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
    device: Device = "auto",
) -> None:
    """Measure a model: FID/KID, precision/recall, mode coverage; or prompt alignment."""

    from ..clip_eval import evaluate_clip, format_rows, load_clip
    from ..compare import load_generator_or_diffusion
    from ..evaluate import evaluate, evaluate_alignment, format_table
    from ..model import resolve_checkpoint
    from ..runs import given_options, pick_device

    if n < 4:  # precision and recall compare each sample with its 3 nearest
        raise UserError(f"-n must be at least 4, got {n}")
    if checkpoint is None and clip is None:
        raise UserError("give a model (a run folder or file), or --clip FOLDER")
    if clip is not None and (checkpoint is None) == alignment:
        raise UserError(
            "--clip goes alone (the CLIP's own measures) or with a model and --alignment"
        )
    if checkpoint is None:
        rows = evaluate_clip(load_clip(clip, pick_device(device)), n=n)
        typer.echo(json.dumps(rows, indent=2) if json_out else format_rows(rows))
        return
    if not alignment and (given := given_options(dict(locals()), eval_, ALIGNMENT_ONLY)):
        raise UserError(f"{', '.join(given)}: only with --alignment")
    check_sampling(steps)
    path = resolve_checkpoint(checkpoint)
    model = load_generator_or_diffusion(path, pick_device(device))
    if alignment:
        result = evaluate_alignment(
            model,
            prompts,
            prompts,
            _ints(seeds, "--seeds"),
            sampler=sampler,
            steps=steps,
            guidance=guidance,
            wording=wording,
            language=language,
            clip=None if clip is None else load_clip(clip, model.device),
        )
    else:
        if data is None:
            config_file = path.parent / "train_config.json"
            if not config_file.is_file():
                raise UserError("give --data: the model file has no run folder to read it from")
            data = json.loads(config_file.read_text())["data"]
        result = evaluate(
            model, data, n, feature_net or data, sampler=sampler, steps=steps, seed=seed,
            guidance=1.0 if guidance is None else guidance,
        )  # fmt: skip
    typer.echo(json.dumps(result, indent=2) if json_out else format_table(result))


# the options that only an --alignment evaluation reads
ALIGNMENT_ONLY = ("prompts", "seeds", "wording", "language")


def compare(
    data: Annotated[
        list[str] | None,
        typer.Option(help="A data set; repeat for several (default: digits, fashion, shapes)."),
    ] = None,
    budget_minutes: Annotated[
        float | None, typer.Option(help="Training wall time of each model and seed (default 5).")
    ] = None,
    budgets: Annotated[
        str | None,
        typer.Option(
            help="The study at several budgets, e.g. 2,5,10,20,40 (minutes of training each; "
            "runs continue from budget to budget): <out>/<data>/sweep/."
        ),
    ] = None,
    recipes: Annotated[
        str | None,
        typer.Option(
            help="With --budgets: diffusion recipes BACKBONE-OBJECTIVE (unet or dit; eps, v, "
            "x0, edm or flow), e.g. unet-v,unet-edm,unet-flow,dit-flow, each beside the GAN: "
            "<out>/<data>/recipes/."
        ),
    ] = None,
    distill_minutes: Annotated[
        float | None,
        typer.Option(
            help="With --budgets: distil each budget's diffusion model this long (extra "
            "compute) and measure the student at 1, 2 and 4 lcm steps; 0 turns it off "
            "(default 2; 0 with --recipes)."
        ),
    ] = None,
    seeds: Annotated[
        str,
        typer.Option(
            help='Training seeds per model: N, per data set as "fashion=3,1", or a list "0,4,7".'
        ),
    ] = "fashion=3,1",
    out: Annotated[Path, typer.Option(help="Folder of the study: runs, report.md, plots.")] = Path(
        "compare"
    ),
    preset: Annotated[
        str, typer.Option(help="Network sizes: small (the study) or tiny (smoke tests).")
    ] = "small",
    samples: Annotated[int, typer.Option(help="Samples a final model is measured on.")] = 1000,
    curve_points: Annotated[int, typer.Option(help="Checkpoints measured along training.")] = 5,
    curve_samples: Annotated[int, typer.Option(help="Samples a point along training.")] = 250,
    steps_samples: Annotated[
        int, typer.Option(help="Samples a point of the quality-vs-steps curve.")
    ] = 200,
    speed_batch: Annotated[int, typer.Option(help="Batch of the speed measurement.")] = 64,
    speed_repeats: Annotated[int, typer.Option(help="Timed runs of each sampler.")] = 3,
    inception: Annotated[
        bool,
        typer.Option(
            "--inception/--no-inception",
            help="The headline FID also in Inception-v3 features (about 0.05 s an image on 2 "
            "CPU cores).",
        ),
    ] = True,
    inception_samples: Annotated[int, typer.Option(help="Samples for the Inception FID.")] = 1000,
    feature_net: Annotated[
        str | None,
        typer.Option(help="Feature network (default: the data set's classifier)."),
    ] = None,
    prediction: Prediction = "eps",
    zero_terminal_snr: ZeroTerminalSNR = False,
    min_snr_gamma: MinSNRGamma = 0.0,
    device: Device = "auto",
) -> None:
    """Diffusion vs GAN on the same wall-clock budget: stability, quality, diversity, speed;
    with --budgets, FID against training time."""
    from ..compare import CompareConfig, SweepConfig, parse_budgets, parse_recipes, sweep
    from ..compare import compare as run_study

    if budgets is not None and budget_minutes is not None:
        raise UserError("give --budgets or --budget-minutes, not both")
    if recipes is not None and budgets is None:
        raise UserError("--recipes is a sweep's: give --budgets too")
    check_output_folder(out)
    cfg = CompareConfig(
        data=tuple(data or ("digits", "fashion", "shapes")), out=str(out),
        budget_minutes=5.0 if budget_minutes is None else budget_minutes, seeds=seeds,
        preset=preset, samples=samples, curve_points=curve_points, curve_samples=curve_samples,
        steps_samples=steps_samples, speed_batch=speed_batch, speed_repeats=speed_repeats,
        inception=inception, inception_samples=inception_samples, feature_net=feature_net,
        prediction=prediction, zero_terminal_snr=zero_terminal_snr, min_snr_gamma=min_snr_gamma,
        device=device,
    )  # fmt: skip
    if budgets is None:
        run_study(cfg)
    else:
        if distill_minutes is None:
            distill_minutes = 0.0 if recipes else 2.0
        recipe_list = parse_recipes(recipes) if recipes is not None else ()
        sweep(SweepConfig(cfg, parse_budgets(budgets), distill_minutes, recipes=recipe_list))
