"""Training of our CLIP (`difusion train --model clip`), with the run-folder conventions of
the other trainers: a `--minutes` budget, a checkpoint at SIGINT/SIGTERM, exact resume,
`--keep`, a guard against non-finite losses, a failed write that keeps the last checkpoint.

Data: one data set or several, a comma list (`shapes,emoji,fashion`); each batch holds an
equal share of each, images in RGB at one size. `--data-option KEY=VALUE` goes to every data
set that has the option (`language=both`: captions in English and Spanish); a key none has
is an error. `emoji` and `fashion` train on their "train" splits: their held-out ones (and
`shapes` scenes of another seed) are what the probe and `difusion eval --clip` measure.

The objective is CLIP's symmetric contrastive loss (`contrastive_loss`) with its learned
temperature, clamped at 100 as CLIP does; items that show the same thing (a class, a scene,
one emoji in two languages) count as matches of each other. AdamW, a linear warm-up, then a
cosine decay to a tenth. Every `--sample-every` steps a probe measures text-to-image
retrieval (R@1) on held-out data in each language and logs it.

    clip/                    the CLIP folder: transformers' CLIPModel, CLIPTokenizer and
                             CLIPImageProcessor load it; `Clip.load` and
                             `--text-encoder clip --text-encoder-path RUN/clip` too
    model.safetensors        the same weights, as the checkpoint writes them
    train_state.safetensors  weights, optimiser, every RNG, the place in each data set
    train_config.json        the ClipTrainConfig (with "model": "clip")
    log.jsonl                {"step", "loss", "accuracy", "temperature", "lr", ...} lines and
                             probe lines {"step", "probe_<data>_<language>": R@1}
    loss.png, probe.png      the loss and the probe along training
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .batches import restore_stream, stream_metadata, training_batches
from .checkpoints import atomic_save, read_safetensors
from .clip import MAX_LOGIT_SCALE, Clip, ClipConfig, contrastive_loss
from .clip_eval import EVAL_SETS, HELDOUT_SPLITS, heldout_set, item_keys, key_ids, retrieval, rgb
from .configs import DictConfig
from .data import ShapesDataset, load_dataset, option_names
from .data.language import caption_languages
from .loop import Stop, TrainLoop
from .runs import (
    Run,
    TrainingError,
    module_state,
    open_run,
    options_for_model,
    pick_device,
    plot_log,
    restore_training_state,
    run_folder_errors,
    save_checkpoint,
    seeded_generators,
    training_state,
    write_run_config,
)

CLIP_FOLDER = "clip"


@dataclass
class ClipTrainConfig(DictConfig):
    data: str = "shapes,emoji,fashion"
    out: str = "runs/clip"
    size: int | None = None  # image size (None: 32)
    steps: int = 3000
    minutes: float | None = None
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.1
    channels: int = 64  # width of both towers
    layers: int = 2  # transformer layers of each tower
    heads: int = 4
    patch_size: int = 8
    embed_dim: int = 64
    context_length: int = 32
    vocab_size: int = 8192  # CLIP's BPE with its first 7,678 merges (clip_tokenizer)
    data_options: dict = field(default_factory=dict)
    probe_size: int = 200  # held-out items per data set and language in each probe
    device: str = "auto"
    seed: int = 0
    log_every: int = 25
    sample_every: int = 250  # steps between probes
    checkpoint_every: int = 250
    keep: int = 0
    workers: int = 0
    model: str = "clip"  # marks the run folder's train_config.json

    def clip_config(self) -> ClipConfig:
        width = self.channels
        return ClipConfig(
            image_size=self.size or 32, patch_size=self.patch_size,
            vision_width=width, vision_layers=self.layers, vision_heads=self.heads,
            text_width=width, text_layers=self.layers, text_heads=self.heads,
            context_length=self.context_length, embed_dim=self.embed_dim,
            vocab_size=self.vocab_size,
        )  # fmt: skip


ARCHITECTURE = (
    "data", "size", "batch_size", "lr", "warmup", "weight_decay", "channels", "layers", "heads",
    "patch_size", "embed_dim", "context_length", "vocab_size", "data_options", "probe_size", "seed",
)  # fmt: skip


# --- data -------------------------------------------------------------------------------------


def data_names(data: str) -> list[str]:
    names = [n.strip() for n in data.split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise TrainingError(f"--data: a comma list of distinct data sets, got {data!r}")
    return names


def load_mixture(data: str, size: int, options: dict) -> dict[str, Dataset]:
    """Each data set of the comma list `data` at `size`, with the `options` it has (the
    "train" split of those `difusion eval --clip` holds out); all of them captioned."""
    unused, out = set(options), {}
    for name in data_names(data):
        kw = {k: v for k, v in options.items() if k in option_names(name)}
        unused -= set(kw)
        if name.lower() in HELDOUT_SPLITS:
            kw.setdefault("split", HELDOUT_SPLITS[name.lower()][0])
        try:
            dataset = load_dataset(name, size, **kw)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        if len(dataset) == 0 or "caption" not in dataset[0]:
            raise TrainingError(f"{name} has no captions: a CLIP learns from captioned images")
        out[name] = dataset
    if unused:
        raise TrainingError(f"--data-option {', '.join(sorted(unused))}: no data set has it")
    return out


class RenderedScenes:
    """`shapes` batches rendered by `generator`, with their scenes (which `item_keys` reads)."""

    def __init__(self, dataset: ShapesDataset, batch_size: int, generator: torch.Generator):
        self.dataset, self.batch_size, self.generator = dataset, batch_size, generator

    def next(self) -> dict:
        from .data.shapes_batch import render_batch

        d = self.dataset
        return render_batch(
            self.batch_size, self.generator, size=d.size, two_object_prob=d.two_object_prob,
            paraphrase=d.paraphrase, attributes=True, language=d.language,
        )  # fmt: skip

    def state_dict(self) -> dict:
        return {}  # the generator's state, saved with the run's generators

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


class MixedBatches:
    """A batch of each data set's share, one after the other: {"image": [B, 3, H, W],
    "caption": [...], "key": LongTensor [B]} (equal keys: items that show the same thing)."""

    def __init__(self, sources: dict) -> None:
        self.sources = sources

    def next(self) -> dict:
        parts = [source.next() for source in self.sources.values()]
        keys = [(i, k) for i, part in enumerate(parts) for k in item_keys(part)]
        return {
            "image": torch.cat([rgb(p["image"]) for p in parts]),
            "caption": [c for p in parts for c in p["caption"]],
            "key": key_ids(keys),
        }

    def state_dict(self) -> dict:
        return {name: source.state_dict() for name, source in self.sources.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, source in self.sources.items():
            source.load_state_dict(state.get(name, {}))

    def close(self) -> None:
        for source in self.sources.values():
            source.close()


def mixed_batches(
    datasets: dict[str, Dataset], cfg: ClipTrainConfig, generator: torch.Generator
) -> MixedBatches:
    """Equal shares of `cfg.batch_size` (the first data sets take the remainder)."""
    if cfg.batch_size < len(datasets):
        raise TrainingError(f"--batch-size {cfg.batch_size}: under one item per data set")
    share, extra = divmod(cfg.batch_size, len(datasets))
    sources = {}
    for i, (name, dataset) in enumerate(datasets.items()):
        n = share + (i < extra)
        if type(dataset) is ShapesDataset:
            sources[name] = RenderedScenes(dataset, n, generator)
        else:
            cpu = torch.device("cpu")
            sources[name] = training_batches(
                dataset, n, cfg.seed + i, generator, cpu, workers=cfg.workers
            )
    return MixedBatches(sources)


# --- the probe --------------------------------------------------------------------------------


def probe_sets(cfg: ClipTrainConfig) -> dict[str, dict]:
    """Held-out sets of the run's data sets that have one, in each of its languages."""
    language = cfg.data_options.get("language", "en")
    names = [n.lower() for n in data_names(cfg.data) if n.lower() in EVAL_SETS]
    return {
        f"{name}_{lang}": heldout_set(name, lang, cfg.probe_size, cfg.size or 32)
        for name in names
        for lang in caption_languages(language, name)
    }


def probe(clip: Clip, sets: dict[str, dict]) -> dict[str, float]:
    """Text-to-image R@1 of each held-out set."""
    was_training = clip.training
    clip.eval()
    out = {f"probe_{name}": retrieval(clip, data, ks=(1,))["R@1"] for name, data in sets.items()}
    clip.train(was_training)
    return out


# --- checkpoints ------------------------------------------------------------------------------


def save_clip_folder(clip: Clip, run: Run) -> None:
    """RUN/clip, written beside the last one and then put in its place."""
    staged = run.dir / f"next_{CLIP_FOLDER}"
    shutil.rmtree(staged, ignore_errors=True)
    clip.save(staged)
    shutil.rmtree(run.dir / CLIP_FOLDER, ignore_errors=True)
    os.replace(staged, run.dir / CLIP_FOLDER)


def save_clip_state(run, step, cfg, clip, opt, generators, batches) -> None:
    tensors, metadata = training_state({"clip": clip.model.state_dict()}, {"clip": opt}, generators)
    metadata.update(
        step=str(step),
        train_config=json.dumps(cfg.to_dict()),
        model_config=json.dumps(asdict(clip.config)),
        model="clip",
        **stream_metadata(batches),
    )
    weights = {k: v.detach().contiguous().cpu() for k, v in clip.model.state_dict().items()}
    write_model = lambda path: atomic_save(weights, path, {"step": str(step)})  # noqa: E731
    save_checkpoint(run, step, write_model, tensors, metadata, cfg.keep)
    save_clip_folder(clip, run)


def stored_clip_config(out: str | Path) -> ClipTrainConfig:
    _, metadata = read_safetensors(Run(out).state_path)
    if metadata.get("model") != "clip":
        raise TrainingError(f"{out} does not hold a CLIP run: drop --model clip")
    return ClipTrainConfig.from_dict(json.loads(metadata["train_config"]))


def plot_clip(run: Run) -> None:
    records = run.read_log()
    loss = {"contrastive loss": "loss"}
    plot_log(run.dir / "loss.png", records, loss, "loss (mean between log steps)")
    names = sorted({k for r in records for k in r if k.startswith("probe_")})
    if names:
        probes = {k.removeprefix("probe_"): k for k in names}
        plot_log(run.dir / "probe.png", records, probes, "held-out text-to-image R@1")


# --- training ---------------------------------------------------------------------------------


def learning_rate(cfg: ClipTrainConfig, step: int) -> float:
    """Linear warm-up over `warmup` steps, then a cosine decay to a tenth at `steps`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer(clip: Clip, cfg: ClipTrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on the matrices only (not on gains, biases or the temperature)."""
    params = [p for p in clip.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def clip_step(clip: Clip, batch: dict, device: torch.device) -> tuple[torch.Tensor, dict]:
    """The loss of one batch, and what the log keeps of it."""
    logits = clip.logits(clip.encode_image(batch["image"]), clip.encode_text(batch["caption"]))
    keys = batch["key"].to(device)
    loss = contrastive_loss(logits, keys)
    accuracy = (keys[logits.argmax(1)] == keys).float().mean()  # image -> its text, in batch
    temperature = clip.model.logit_scale.detach().exp()
    return loss, {"loss": loss.detach(), "accuracy": accuracy, "temperature": temperature}


def start_clip_run(cfg: ClipTrainConfig, resume: bool) -> tuple[Run, ClipTrainConfig]:
    run, cfg = open_run(cfg, resume, stored_clip_config, ARCHITECTURE)
    if cfg.channels % cfg.heads:
        raise TrainingError(f"width {cfg.channels} is not divisible by {cfg.heads} heads")
    if (cfg.size or 32) % cfg.patch_size:
        raise TrainingError(
            f"image size {cfg.size or 32} is not divisible by patches of {cfg.patch_size}"
        )
    return run, cfg


def train_clip(
    cfg: ClipTrainConfig,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
) -> Path:
    """Train (or continue) the CLIP run in cfg.out; returns the folder."""
    run, cfg = start_clip_run(cfg, resume)
    device = pick_device(cfg.device)
    datasets = load_mixture(cfg.data, cfg.size or 32, cfg.data_options)
    try:
        config = cfg.clip_config()
        torch.manual_seed(cfg.seed)
        clip = Clip(config).to(device).train()
    except ValueError as e:
        raise TrainingError(str(e)) from None
    opt = optimizer(clip, cfg)
    generators = seeded_generators(cfg.seed)
    batches = mixed_batches(datasets, cfg, generators["data"])
    sets = probe_sets(cfg)
    stop = Stop(cfg.minutes)
    with stop.catching_signals(), run_folder_errors(run), contextlib.closing(batches):
        step = 0
        if resume:
            tensors, metadata = read_safetensors(run.state_path)
            clip.model.load_state_dict(module_state(tensors, "clip"))
            restore_training_state(tensors, metadata, {"clip": opt}, generators)
            restore_stream(batches, metadata)
            step = int(metadata["step"])
            run.truncate_log(step)
        write_run_config(run, cfg)
        if progress:
            params = sum(p.numel() for p in clip.parameters())
            sizes = ", ".join(f"{name} {len(d)}" for name, d in datasets.items())
            print(
                f"training a CLIP ({params / 1e6:.2f}M parameters, width {cfg.channels}, "
                f"{cfg.layers} layers a tower) on {sizes} on {device}, steps {step}->{cfg.steps}",
                flush=True,
            )
        loop = TrainLoop(run, step, cfg.steps, stop, cfg.log_every, progress, on_step)
        while loop.running():
            lr = learning_rate(cfg, loop.step)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, record = clip_step(clip, batches.next(), device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                clip.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            loop.advance(record, lr)
            loop.verify_before(cfg.checkpoint_every, cfg.sample_every)
            if loop.due(cfg.sample_every):
                run.append_log({"step": loop.step, **probe(clip, sets)})
                plot_clip(run)
            if loop.due(cfg.checkpoint_every):
                save_clip_state(run, loop.step, cfg, clip, opt, generators, batches)
                loop.saved_step = loop.step
        loop.close()
        if loop.step != loop.saved_step or not run.exists():
            save_clip_state(run, loop.step, cfg, clip, opt, generators, batches)
        plot_clip(run)
        if progress:
            print(
                f"stopped at step {loop.step} after {loop.elapsed() / 60:.1f} min; "
                f"CLIP folder in {run.dir / CLIP_FOLDER}"
            )
    stop.end_if_signalled(run, loop.step)
    return run.dir


SHARED_OPTIONS = (
    "data", "out", "size", "steps", "minutes", "batch_size", "lr", "warmup", "device", "seed",
    "sample_every", "checkpoint_every", "log_every", "keep", "workers",
)  # fmt: skip
NOT_FOR_CLIP = (
    "grad_accum", "ema_decay", "prediction", "schedule", "zero_terminal_snr", "min_snr_gamma",
    "cond", "text_encoder", "text_encoder_path", "cond_drop", "channel_mult", "attention",
    "dropout", "layout_map", "layout_steps", "precision", "latent", "init", "crop", "flip",
    "buckets", "compile", "clip",
)  # fmt: skip


def clip_config_from_cli(options: dict, command: Callable) -> ClipTrainConfig:
    """`difusion train --model clip`: the shared options make its configuration, with
    `--channels` the towers' width and `--layers-per-block` their depth; `--data-option`s go
    to the data sets; an option made for a U-Net set to other than its default is an error."""
    from .cli.options import _key_values

    picked = options_for_model("clip", options, command, SHARED_OPTIONS, NOT_FOR_CLIP)
    picked["channels"] = options.get("channels", ClipTrainConfig.channels)
    picked["layers"] = options.get("layers_per_block", ClipTrainConfig.layers)
    picked["data_options"] = _key_values(options.get("data_option") or [], "--data-option")
    return ClipTrainConfig(**picked)


def train_from_cli(options: dict, command: Callable) -> None:
    """`difusion train --model clip`."""
    train_clip(clip_config_from_cli(options, command), resume=options["resume"])
