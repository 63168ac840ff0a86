"""One training loop for every diffusion model of the project.

The objective is DDPM's simple loss: pick t and eps at random, noise x0 in closed form, and
regress the network's output on eps (or v, or x0). Around it: AdamW with warm-up, gradient
clipping, an EMA of the weights (the one used for sampling), optional bf16/fp16 autocast,
exact resume, a guard against non-finite losses, and torch.distributed when run by torchrun.
A run stopped by its --minutes, SIGINT or SIGTERM saves the step it stopped at; one stopped
by a failed write (a full disk) keeps its last checkpoint whole.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset

from .data import load_dataset, random_batch
from .denoiser import Cond, training_target
from .images import auto_scale, grid, to_pil
from .model import (
    CheckpointError,
    DiffusionModel,
    ModelConfig,
    file_sha256,
    read_metadata,
    read_safetensors,
    resolve_checkpoint,
)
from .nn.unet import UNetConfig
from .runs import (
    Run,
    Stop,
    TrainingError,
    TrainLoop,
    any_process,
    check_budget,
    check_run_folder,
    module_state,
    pick_device,
    restore_training_state,
    resumed_config,
    run_folder_errors,
    save_checkpoint,
    seeded_generators,
    training_state,
    update_ema,
    write_run_config,
)
from .schedule import ScheduleConfig


@dataclass
class TrainConfig:
    data: str = "digits"
    out: str = "runs/run"
    size: int | None = None
    steps: int = 5000
    minutes: float | None = None  # wall-clock budget; the run stops and saves when it is spent
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    prediction: str = "eps"
    schedule: str = "cosine"
    zero_terminal_snr: bool = False
    min_snr_gamma: float = 0.0  # Hang et al. 2023 loss weighting; 0 turns it off
    cond: str | None = None  # "label" (class-conditional) or "text"
    cond_drop: float = 0.1  # how often the condition is dropped (for classifier-free guidance)
    text_encoder: str = (
        "minilm"  # for cond="text": minilm, clip (with text_encoder_path) or scratch
    )
    text_encoder_path: str | None = None
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    attention_resolutions: tuple[int, ...] = (16, 8)
    layers_per_block: int = 2
    head_dim: int = 32
    dropout: float = 0.0
    layout_map: bool = False  # pixel places attend to the prompt (text models only)
    layout_steps: int = 2000  # steps fitting a new layout map to the images, before the rest
    layout_lr: float = 1e-3
    precision: str = "fp32"  # fp32, bf16 or fp16 (fp16 on CUDA only)
    device: str = "auto"
    seed: int = 0
    log_every: int = 25
    sample_every: int = 500
    checkpoint_every: int = 250
    keep: int = 0  # step-numbered copies of the last `keep` checkpoints, in checkpoints/
    latent: str | None = None  # a VAE run folder or file: train in its latent space
    data_options: dict = field(default_factory=dict)  # keyword options of the data set
    init: str | None = None  # fine-tune: start from this model's weights (and architecture)
    init_sha256: str | None = None  # the file `init` named, when the run started

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        for key in ("channel_mult", "attention_resolutions"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def architecture_of(config: ModelConfig) -> dict:
    """The TrainConfig fields that fix the model's weights' shapes, objective and condition,
    as they rebuild `config` (the inverse of `model_config_for`)."""
    if config.latent is not None:
        raise TrainingError("--init: fine-tuning a latent model is not supported")
    unet, text = config.unet, config.text_encoder or {}
    base = unet.block_out_channels[0]
    return {
        "size": config.image_size,
        "prediction": config.prediction,
        "schedule": config.schedule.kind,
        "zero_terminal_snr": config.schedule.zero_terminal_snr,
        "cond": config.cond,
        "text_encoder": text.get("name", "minilm"),
        "text_encoder_path": text.get("path"),
        "channels": base,
        "channel_mult": tuple(c // base for c in unet.block_out_channels),
        "attention_resolutions": tuple(
            unet.sample_size // 2**i for i, a in enumerate(unet.attention_levels) if a
        ),
        "layers_per_block": unet.layers_per_block,
        "head_dim": unet.attention_head_dim,
        "dropout": unet.dropout,
        "layout_map": unet.layout_map,
        "latent": None,
    }


LAYOUT_MAP_NEEDS_TEXT = "--layout-map is for text-conditioned models"


def load_init(cfg: TrainConfig) -> tuple[TrainConfig, DiffusionModel, bool]:
    """`--init`: the model to fine-tune, `cfg` with that model's architecture, and whether
    a layout map was added to it."""
    try:
        path = resolve_checkpoint(cfg.init)
        model = DiffusionModel.load(path, text_encoder_path=cfg.text_encoder_path)
    except CheckpointError as e:
        raise TrainingError(f"--init: {e}") from None
    architecture = architecture_of(model.config)
    if cfg.layout_map and not architecture["layout_map"]:
        if model.config.cond != "text":
            raise TrainingError(LAYOUT_MAP_NEEDS_TEXT)
        model = with_layout_map(model)
        architecture["layout_map"] = added = True
    else:
        added = False
    return replace(cfg, **architecture, init_sha256=file_sha256(path)), model, added


def with_layout_map(model: DiffusionModel) -> DiffusionModel:
    """`model` with a layout map added to its attention, read through projections that are
    zero at first: the same function as `model` until it is trained."""
    unet = replace(model.config.unet, layout_map=True)
    out = DiffusionModel(replace(model.config, unet=unet), text_encoder=model.text_encoder)
    missing, unexpected = out.unet.load_state_dict(model.unet.state_dict(), strict=False)
    assert not unexpected and all("layout_" in k for k in missing), (missing, unexpected)
    return out


# what a fine-tuned model must share with its data and its rebuilt configuration
INIT_MUST_MATCH = (
    "unet", "schedule", "prediction", "image_size", "channels", "cond", "class_names",
    "text_encoder", "latent",
)  # fmt: skip


def check_init_fits(init: DiffusionModel, rebuilt: ModelConfig, cfg: TrainConfig) -> None:
    a, b = init.config.to_dict(), rebuilt.to_dict()
    differ = [k for k in INIT_MUST_MATCH if a[k] != b[k]]
    if differ:
        raise TrainingError(
            f"--init {cfg.init}: the model does not fit {cfg.data!r} as configured "
            f"({', '.join(differ)} differ)"
        )


def build_text_encoder(cfg: TrainConfig, dataset: Dataset) -> torch.nn.Module:
    from .text import build_scratch_encoder, load_text_encoder

    if cfg.text_encoder == "scratch":
        n = min(len(dataset), 20_000)
        known = getattr(dataset, "captions", None)  # without decoding 20,000 images
        captions = list(known[:n]) if known else [dataset[i]["caption"] for i in range(n)]
        return build_scratch_encoder(captions)
    encoder = load_text_encoder(cfg.text_encoder, path=cfg.text_encoder_path)
    return encoder.requires_grad_(False)


def stored_scratch_encoder(run: Run) -> torch.nn.Module:
    """A run's scratch encoder with its stored vocabulary (its weights come with the state):
    a resumed run keeps its tokens whatever the data's captions are now."""
    from .text import ScratchConfig, ScratchEncoder

    spec = stored_model_config(run)["text_encoder"]
    return ScratchEncoder(ScratchConfig.from_dict(spec["config"]))


def stored_model_config(run: Run) -> dict:
    """The model configuration in a run's training state (read without its tensors)."""
    return json.loads(read_metadata(run.state_path)["model_config"])


def text_encoder_spec(encoder: torch.nn.Module, cfg: TrainConfig) -> dict:
    spec = {"name": encoder.name, "identity": encoder.identity()}
    if encoder.trainable:
        spec["config"] = encoder.config()
    if cfg.text_encoder_path:
        spec["path"] = str(cfg.text_encoder_path)
    return spec


def model_config_for(
    cfg: TrainConfig,
    dataset: Dataset,
    text_encoder: torch.nn.Module | None = None,
    latent: dict | None = None,
) -> ModelConfig:
    """`latent` (from `vae_train.latent_spec`): the U-Net works on the VAE's latents."""
    if cfg.layout_map and latent is not None:
        raise TrainingError("--layout-map is fitted to pixels; it does not take --latent")
    size, channels = dataset.size, dataset.channels
    if latent is not None:
        vae = latent["vae"]
        f = 2 ** (len(vae["block_out_channels"]) - 1)
        if vae["in_channels"] != channels:
            raise TrainingError(
                f"the VAE takes {vae['in_channels']}-channel images; {cfg.data!r} has {channels}"
            )
        if size % f:
            raise TrainingError(f"image size {size} is not divisible by the VAE's downscale {f}")
        size, channels = size // f, vae["latent_channels"]
    levels = len(cfg.channel_mult)
    if size % 2 ** (levels - 1):
        raise TrainingError(
            f"image size {size} is not divisible by 2^{levels - 1} for {levels} levels"
        )
    resolutions = [size // 2**i for i in range(levels)]
    check_condition_fits(cfg, dataset)
    num_classes = None
    class_names = None
    if cfg.cond == "label":
        class_names = list(dataset.class_names or map(str, range(dataset.num_classes)))
        num_classes = len(class_names) + 1  # the last one is "no label", for guidance
    if cfg.cond == "text" and text_encoder is None:
        raise TrainingError("--cond text needs a text encoder")
    unet = UNetConfig(
        in_channels=channels,
        out_channels=channels,
        sample_size=size,
        block_out_channels=tuple(cfg.channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.layers_per_block,
        attention_levels=tuple(r in cfg.attention_resolutions for r in resolutions),
        attention_head_dim=cfg.head_dim,
        dropout=cfg.dropout,
        norm_groups=min(32, cfg.channels),
        num_classes=num_classes,
        context_dim=text_encoder.dim if cfg.cond == "text" else None,
        layout_map=cfg.layout_map,
    )
    return ModelConfig(
        unet=unet,
        schedule=ScheduleConfig(kind=cfg.schedule, zero_terminal_snr=cfg.zero_terminal_snr),
        prediction=cfg.prediction,
        image_size=size,
        channels=channels,
        cond=cfg.cond,
        class_names=class_names,
        text_encoder=text_encoder_spec(text_encoder, cfg) if cfg.cond == "text" else None,
        clip_x0=latent is None,
        latent=latent,
    )


def check_condition_fits(cfg: TrainConfig, dataset: Dataset) -> None:
    """The condition asked for is one the data has: labels, or captions."""
    if cfg.cond not in (None, "label", "text"):
        raise TrainingError(f"unknown condition {cfg.cond!r}; choose label or text")
    if cfg.cond == "label" and not getattr(dataset, "num_classes", None):
        raise TrainingError(f"--cond label needs labelled data; {cfg.data!r} has no labels")
    if cfg.layout_map and cfg.cond != "text":
        raise TrainingError(LAYOUT_MAP_NEEDS_TEXT)
    if cfg.cond == "text" and (len(dataset) == 0 or "caption" not in dataset[0]):
        raise TrainingError(f"--cond text needs captioned data; {cfg.data!r} has no captions")


def diffusion_loss(
    model: torch.nn.Module,
    diffusion: DiffusionModel,
    x0: torch.Tensor,
    cond: Cond | None,
    generator: torch.Generator,
    min_snr_gamma: float = 0.0,
) -> torch.Tensor:
    """The simple loss of DDPM, optionally min-SNR weighted. `model` may be a DDP wrapper."""
    schedule, prediction = diffusion.schedule, diffusion.config.prediction
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_steps, (b,), generator=generator, device=generator.device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype)
    t, noise = t.to(x0.device), noise.to(x0.device)
    abar = schedule.alphas_cumprod.to(x0.device)[t].float()
    x_t = schedule.q_sample(x0, t, noise)
    target = training_target(prediction, x0, noise, abar)
    out = model(x_t, t.float(), **(cond or {}))
    per_sample = F.mse_loss(out.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma > 0:
        snr = abar / (1 - abar).clamp(min=1e-8)
        clipped = snr.clamp(max=min_snr_gamma)
        weight = {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[prediction]
        per_sample = per_sample * weight
    return per_sample.mean()


def lr_at(step: int, cfg: TrainConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def save_state(
    run: Run,
    step: int,
    cfg: TrainConfig,
    model: DiffusionModel,
    ema: DiffusionModel,
    opt: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
) -> None:
    tensors, metadata = training_state({"model": model.weights()}, {"model": opt}, generators)
    metadata.update(
        step=str(step),
        train_config=json.dumps(cfg.to_dict()),
        model_config=json.dumps(model.config.to_dict()),
    )
    save_checkpoint(
        run, step, lambda path: ema.save(path, {"step": str(step)}), tensors, metadata, cfg.keep
    )


def load_state(
    run: Run,
    model: DiffusionModel,
    opt: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
) -> int:
    tensors, metadata = read_safetensors(run.state_path)
    model.load_weights(module_state(tensors, "model"))
    restore_training_state(tensors, metadata, {"model": opt}, generators)
    return int(metadata["step"])


def stored_train_config(out: str | Path) -> TrainConfig:
    _, metadata = read_safetensors(Run(out).state_path)
    stored = json.loads(metadata.get("train_config", "{}"))
    if stored.get("model") in ("gan", "vae") or "model_config" not in metadata:
        raise TrainingError(f"{out} is not a diffusion run (a GAN run resumes with --model gan)")
    return TrainConfig.from_dict(stored)


def batch_cond(
    batch: dict,
    diffusion: DiffusionModel,
    drop: float,
    generator: torch.Generator,
    device: torch.device,
) -> Cond | None:
    """The batch's condition, dropped (to the null label / empty prompt) with probability `drop`."""
    kind = diffusion.config.cond
    if kind is None:
        return None
    n = len(batch["image"])
    dropped = (torch.rand(n, generator=generator, device=generator.device) < drop).cpu()
    if kind == "text":
        captions = ["" if d else c for c, d in zip(batch["caption"], dropped.tolist(), strict=True)]
        return diffusion.text_cond(captions)
    labels = batch["label"].clone()
    labels[dropped] = diffusion.config.null_label
    return {"class_labels": labels.to(device)}


def tracks_alignment(cfg: TrainConfig) -> bool:
    return cfg.data == "shapes" and cfg.cond == "text" and cfg.latent is None


def alignment_probe(ema: DiffusionModel, n_single: int = 18, n_double: int = 18) -> dict:
    """Fraction of a fixed prompt set the EMA model satisfies (its own sampler and steps:
    20 of DPM-Solver++ for most)."""
    from .alignment import prompt_set, score_batch

    ema.eval()
    prompts = prompt_set(n_single, n_double, seed=0)
    cond, uncond = ema.text_cond(prompts), ema.text_cond([""] * len(prompts))
    x = ema.sample(len(prompts), seed=0, cond=cond, uncond=uncond, guidance=ema.config.guidance)
    scores = score_batch(x, prompts)
    return {"align_single": scores["pass_rate_single"], "align_double": scores["pass_rate_double"]}


PREVIEW_PROMPTS = [
    "a red circle",
    "a green square",
    "a blue triangle",
    "a yellow circle to the left of a magenta square",
    "a cyan triangle above a red circle",
    "a blue square below a green triangle",
]


def preview(ema: DiffusionModel, path: Path, seed: int = 0, vae=None) -> None:
    """A fixed-noise sample grid, so grids from successive steps compare (decoded by `vae`
    for a latent model)."""
    ema.eval()
    if ema.config.cond == "text":
        prompts = PREVIEW_PROMPTS
        cond, uncond = ema.text_cond(prompts * 3), ema.text_cond([""] * len(prompts) * 3)
        x = ema.sample(len(prompts) * 3, seed=seed, cond=cond, uncond=uncond, guidance=4.0)
        cols = len(prompts)
    elif ema.config.cond == "label":
        k = len(ema.config.class_names or [])
        labels = torch.arange(k).repeat_interleave(max(1, 40 // k))[:40]
        cond, uncond = ema.label_cond(labels)
        x = ema.sample(len(labels), seed=seed, cond=cond, uncond=uncond, guidance=3.0)
        cols = max(1, 40 // k)
    else:
        x, cols = ema.sample(36, seed=seed), 6
    size = ema.config.image_size
    if vae is not None:
        with torch.no_grad():
            x = vae.decode_latents(x).clamp(-1, 1)
        size *= vae.config.downscale
    grid(to_pil(x), cols=cols, scale=auto_scale(size, 64)).save(path)


LAYOUT_GRID = 8  # the layout map is fitted to the images averaged down to this grid


def pretrain_layout(
    diffusion: DiffusionModel,
    dataset: Dataset,
    cfg: TrainConfig,
    generator: torch.Generator,
    run: Run | None = None,
    progress: bool = True,
    stop: Stop | None = None,
) -> None:
    """Fit a new layout map alone to the data's images, averaged down to an 8x8 grid, from
    their captions: the pure-noise end of denoising without the noise. Learning which object
    a relation puts first takes a product of three things (the place, the relation and the
    word's position); inside the denoiser that product starts at zero and its gradient with
    it, while here it is the whole loss. The mean loss of each `log_every` steps goes to the
    run's log as `layout_loss` (with `step` 0: before the denoiser's first step). It ends
    early when `stop` asks (budget spent, or a signal)."""
    layout = diffusion.unet.layout_map
    device = layout.query.weight.device
    opt = torch.optim.Adam(layout.parameters(), lr=cfg.layout_lr)
    size = LAYOUT_GRID
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.layout_steps, desc="layout map", unit="step", dynamic_ncols=True)
    total, count, done = 0.0, 0, 0

    def log() -> None:
        nonlocal total, count
        if run is not None and count:
            run.append_log({"step": 0, "layout_step": done, "layout_loss": total / count})
        total, count = 0.0, 0

    for step in range(1, cfg.layout_steps + 1):
        if stop is not None and stop.requested():
            break
        batch = random_batch(dataset, cfg.batch_size, generator)
        target = F.adaptive_avg_pool2d(batch["image"].to(device), size)
        with torch.no_grad():  # the text encoder is not the map's to train
            cond = diffusion.text_cond(batch["caption"])
        loss = F.mse_loss(layout.image(size, size, cond["context"], cond["context_mask"]), target)
        if not torch.isfinite(loss):
            raise TrainingError(f"the layout map's loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total, count, done = total + loss.item(), count + 1, step
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.log_every == 0:
            log()
    log()
    if bar is not None:
        bar.close()


def train(
    cfg: TrainConfig,
    resume: bool = False,
    dataset: Dataset | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Train (or continue) the run in cfg.out; returns the folder."""
    run = Run(cfg.out)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    check_run_folder(run, resume)
    if resume:
        cfg = resumed_config(cfg, stored_train_config(run.dir))
    check_budget(cfg)
    if cfg.layout_steps < 0:
        raise TrainingError(f"--layout-steps must be 0 or more, not {cfg.layout_steps}")
    if cfg.keep < 0:
        raise TrainingError(f"--keep must be 0 or more, not {cfg.keep}")
    if cfg.precision not in ("fp32", "bf16", "fp16"):
        raise TrainingError(f"unknown precision {cfg.precision!r}; choose fp32, bf16 or fp16")
    device = pick_device(cfg.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise TrainingError("fp16 training needs a CUDA device; use bf16 on a CPU")
    init, new_layout = None, cfg.layout_map and not resume
    if cfg.init is not None and not resume:
        cfg, init, new_layout = load_init(cfg)
    if dataset is None:
        dataset = load_dataset(cfg.data, cfg.size, **cfg.data_options)
    check_condition_fits(cfg, dataset)

    torch.manual_seed(cfg.seed + rank)
    text_encoder = None
    if init is not None:
        text_encoder = init.text_encoder
    elif resume and cfg.cond == "text" and cfg.text_encoder == "scratch":
        text_encoder = stored_scratch_encoder(run)
    elif cfg.cond == "text":
        text_encoder = build_text_encoder(cfg, dataset)
    vae, latent = None, None
    if cfg.latent is not None:
        from .vae_train import latent_spec

        latent, vae = latent_spec(cfg.latent)
        vae = vae.to(device)
        if resume:  # the run continues only with the VAE it started with
            stored_latent = stored_model_config(run).get("latent") or {}
            if stored_latent.get("sha256") != latent["sha256"]:
                raise TrainingError(
                    f"{cfg.latent}: not the VAE this run was trained with (sha256 differs)"
                )
    model_config = model_config_for(cfg, dataset, text_encoder, latent)
    if init is not None:
        check_init_fits(init, model_config, cfg)
        diffusion = init.train()
    else:
        diffusion = DiffusionModel(model_config, text_encoder=text_encoder)
    # channels_last: on CPU, oneDNN's NCHW kernels are up to 17x slower for 32-channel convs
    diffusion = diffusion.to(device, memory_format=torch.channels_last)
    trainable = [p for p in diffusion.parameters() if p.requires_grad]
    # before the clock starts: the first AdamW of a process imports torch._dynamo (about 2 s)
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    stop = Stop(cfg.minutes)  # the budget covers the layout map's pre-fit too
    with stop.catching_signals(), run_folder_errors(run):
        if new_layout and cfg.layout_steps > 0 and rank == 0:
            run.dir.mkdir(parents=True, exist_ok=True)
            generator = torch.Generator().manual_seed(cfg.seed + 7919)
            pretrain_layout(diffusion, dataset, cfg, generator, run, progress, stop)
        ema = copy.deepcopy(diffusion).requires_grad_(False)
        gen_device = device if device.type == "cuda" else torch.device("cpu")
        generators = seeded_generators(cfg.seed, rank, gen_device)
        step = 0
        if resume:
            step = load_state(run, diffusion, opt, generators)
            ema.load_weights(read_safetensors(run.model_path)[0])
            if rank == 0:
                run.truncate_log(step)
        run.dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            write_run_config(run, cfg)

        net: torch.nn.Module = diffusion.unet
        if distributed:
            net = torch.nn.parallel.DistributedDataParallel(
                diffusion.unet, device_ids=[device.index] if device.type == "cuda" else None
            )
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
        params = sum(p.numel() for p in diffusion.unet.parameters())
        if rank == 0 and progress:
            print(
                f"training {params / 1e6:.2f}M parameters on {cfg.data} ({len(dataset)} images, "
                f"{dataset.size}x{dataset.size}) on {device}"
                + (f" x{world} processes" if distributed else "")
                + f", steps {step}->{cfg.steps}",
                flush=True,
            )
        loop = TrainLoop(
            run, step, cfg.steps, stop, cfg.log_every, rank == 0 and progress,
            on_step=(lambda s, record: on_step(s, record["loss"])) if on_step else None,
            write_log=rank == 0,
            agree=(lambda wish: any_process(wish, device)) if distributed else None,
        )  # fmt: skip
        diffusion.train()
        while loop.running():
            batch = random_batch(dataset, cfg.batch_size, generators["data"])
            x0 = batch["image"].to(device)
            if vae is not None:  # the latents: a posterior sample, scaled to about unit variance
                with torch.no_grad():
                    x0 = vae.encode_latents(x0, generator=generators["noise"])
            x0 = x0.contiguous(memory_format=torch.channels_last)
            cond = batch_cond(batch, diffusion, cfg.cond_drop, generators["noise"], device)
            lr = lr_at(loop.step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(
                device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ):
                loss = diffusion_loss(
                    net, diffusion, x0, cond, generators["noise"], cfg.min_snr_gamma
                )
            loop.check_finite("loss", loss)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            update_ema(ema, diffusion, loop.step, cfg.ema_decay)
            loop.advance({"loss": loss.item()}, lr)
            if rank != 0:
                continue
            if loop.due(cfg.checkpoint_every):
                save_state(run, loop.step, cfg, diffusion, ema, opt, generators)
                loop.saved_step = loop.step
            if loop.due(cfg.sample_every):
                run.plot_loss()
                preview(ema, run.dir / "samples" / f"step_{loop.step:06d}.png", vae=vae)
                if tracks_alignment(cfg):
                    run.append_log({"step": loop.step, **alignment_probe(ema)})
                    run.plot_alignment()
        loop.close()
        step = loop.step
        if rank == 0 and (step != loop.saved_step or not run.exists()):
            save_state(run, step, cfg, diffusion, ema, opt, generators)
        if rank == 0:
            run.plot_loss()
            preview(ema, run.dir / "samples.png", vae=vae)
            if progress:
                print(
                    f"stopped at step {step} after {loop.elapsed() / 60:.1f} min; "
                    f"EMA weights in {run.model_path}"
                )

    if distributed:
        dist.barrier()
    stop.end_if_signalled(run, loop.step, report=rank == 0)
    return run.dir
