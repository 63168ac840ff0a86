"""Consistency distillation (Latent Consistency Models, Luo et al. 2023) of a trained model
into a student that draws in one to a few steps, with the run-folder conventions of
`difusion train`.

The student starts as the teacher, its guidance scale w as a new input (a zero-initialised
projection of w's embedding, so it starts as exactly the teacher). Each step, for clean
samples x0 of the data and a w drawn from the range:

    sigma_a > sigma_b       neighbours on a skipping schedule of `solver_steps` teacher steps
    x_a = x0 + sigma_a eps
    x_b = one DDIM step of the teacher from x_a, with classifier-free guidance at w
    loss = d(f_student(x_a, sigma_a, w), f_target(x_b, sigma_b, w))

f is the consistency function c_skip(sigma) x + (1 - c_skip(sigma)) D(x, sigma) (x itself at
the schedule's smallest sigma), the target an EMA of the student, d the pseudo-Huber
distance. A distilled model records what it is, and defaults to 4 steps of the `lcm`
sampler at the teacher's guidance. Run folder:

    model.safetensors        the target (EMA) student, ModelConfig with "consistency" set
    train_state.safetensors  student, target, optimizer, RNG states and the place in the data:
                             exact --resume
    train_config.json        the DistillConfig (with "model": "distill")
    log.jsonl, loss.png      losses along the run; samples/, samples.png as for training
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .batches import Batches, restore_stream, stream_metadata, training_batches
from .checkpoints import file_sha256, read_safetensors
from .configs import DictConfig
from .data import load_dataset
from .denoiser import Denoiser, bind, clamped, consistency, guided
from .loop import Stop, TrainLoop
from .lora import add_trainable, save_run_model
from .model import DiffusionModel, build_network, resolve_checkpoint
from .previews import alignment_probe, preview
from .runs import (
    Run,
    TrainingError,
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

GUIDANCE_EMBED_DIM = 64


@dataclass
class DistillConfig(DictConfig):
    teacher: str = "default"  # "default", a run folder or a model file
    out: str = "runs/distill"
    data: str | None = None  # default: the teacher run's data ("shapes" for "default")
    data_options: dict = field(default_factory=dict)
    steps: int = 5000
    minutes: float | None = None
    batch_size: int = 32
    lr: float = 5e-5
    warmup: int = 100
    ema_decay: float = 0.95  # the target network (LCM's)
    guidance_min: float = 1.0  # w drawn uniformly from [min, max] each sample
    guidance_max: float = 4.0
    solver_steps: int = 50  # the teacher's ODE steps across the schedule (LCM: 50 DDIM steps)
    huber_c: float = 0.03  # pseudo-Huber distance; ~0.00054 sqrt(dimensions), Song et al.
    precision: str = "fp32"
    device: str = "auto"
    seed: int = 0
    log_every: int = 25
    sample_every: int = 500
    checkpoint_every: int = 250
    keep: int = 0
    workers: int = 0  # DataLoader worker processes decoding the data (0: in the training one)
    model: str = "distill"  # marks the run folder's train_config.json
    lora: int = 0  # > 0: distil into a LoRA adapter of this rank on the frozen teacher (LCM-LoRA)


def teacher_data(teacher: str) -> str:
    """The data a teacher was trained on, from its run folder (the shipped model: shapes)."""
    if teacher == "default":
        return "shapes"  # with more two-object scenes than the default: see docs/few-steps.md
    config = Path(teacher) / "train_config.json"
    if Path(teacher).is_dir() and config.is_file():
        return json.loads(config.read_text())["data"]
    raise TrainingError(f"give --data: {teacher} has no run folder to read its data from")


def student_of(teacher: DiffusionModel, cfg: DistillConfig, source: str) -> DiffusionModel:
    """The teacher's network with a guidance input whose projection is zero: at the start,
    exactly the teacher. With `cfg.lora`: the teacher's network as it is, frozen, with a LoRA
    adapter on every layer (zero at first) and no guidance input (an LCM-LoRA: the guidance
    range is learnt into the adapter, which is sampled at guidance 1)."""
    if cfg.lora:
        return lora_student(teacher, cfg, source)
    conditional = teacher.config.cond is not None
    network = replace(
        teacher.config.network, time_cond_proj_dim=GUIDANCE_EMBED_DIM if conditional else None
    )
    unet = build_network(teacher.config.with_network(network)).to(teacher.device)
    missing, unexpected = unet.load_state_dict(teacher.unet.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("cond_proj.weight") for k in missing), missing
    for name, p in unet.named_parameters():
        if name.endswith("cond_proj.weight"):
            torch.nn.init.zeros_(p)
    config = replace(
        teacher.config.with_network(network),
        sampler="lcm",
        steps=4,
        consistency=consistency_spec(teacher, cfg, source, conditional),
    )
    if conditional:
        config.guidance = min(max(config.guidance, cfg.guidance_min), cfg.guidance_max)
    return DiffusionModel(config, unet, teacher.text_encoder).to(
        teacher.device, memory_format=torch.channels_last
    )


def consistency_spec(teacher: DiffusionModel, cfg: DistillConfig, source: str, guided: bool):
    """What a distilled model records: its boundary sigma, the guidance scales it takes, its
    teacher and solver."""
    return {
        "sigma_min": teacher.schedule.sigma_min,
        "guidance": [cfg.guidance_min, cfg.guidance_max] if guided else [1.0, 1.0],
        "teacher": {"source": source, "sha256": file_sha256(resolve_checkpoint(source))},
        "solver_steps": cfg.solver_steps,
    }


def lora_student(teacher: DiffusionModel, cfg: DistillConfig, source: str) -> DiffusionModel:
    config = replace(
        teacher.config, sampler="lcm", steps=4, guidance=1.0,
        consistency={**consistency_spec(teacher, cfg, source, False), "lora": cfg.lora},
    )  # fmt: skip
    student = DiffusionModel(config, copy.deepcopy(teacher.unet), teacher.text_encoder)
    add_trainable(student, cfg.lora, None, "all")
    return student.to(teacher.device, memory_format=torch.channels_last)


def skipping_sigmas(model: DiffusionModel, solver_steps: int) -> torch.Tensor:
    """sigmas of the timesteps k-1, 2k-1, ..., T-1 (k = T / solver_steps) with the smallest
    sigma (t = 0) in front: neighbours are one teacher step apart."""
    T = model.schedule.num_steps
    k = T // solver_steps
    ts = torch.arange(k - 1, T, k)
    return torch.cat([model.schedule.sigmas[:1], model.schedule.sigmas[ts]]).float()


def consistency_fn(model: DiffusionModel, net: torch.nn.Module, cond, w: torch.Tensor):
    """f(x, sigma) of a student (through `net`, its U-Net or a DDP wrapper of it)."""
    d = Denoiser(net, model.schedule, model.config.prediction)
    fn = bind(d, {**(cond or {}), "guidance": w} if w is not None else cond)
    return consistency(fn, model.config.consistency["sigma_min"])


def distill_loss(
    student: DiffusionModel,
    net: torch.nn.Module,
    target: DiffusionModel,
    teacher: DiffusionModel,
    x0: torch.Tensor,
    cond,
    uncond,
    sigmas: torch.Tensor,
    cfg: DistillConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """One consistency-distillation loss (see the module's docstring)."""
    b, dev = x0.shape[0], x0.device
    j = torch.randint(1, len(sigmas), (b,), generator=generator, device=generator.device)
    sigma_a, sigma_b = sigmas[j].to(dev), sigmas[j - 1].to(dev)
    eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(dev)
    per = (-1, 1, 1, 1)
    x_a = x0 + sigma_a.view(per) * eps
    w = None
    if teacher.config.cond is not None:
        u = torch.rand(b, generator=generator, device=generator.device).to(dev)
        w = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * u
    with torch.no_grad():
        if w is not None:
            fn = guided(teacher.denoiser(), cond, uncond, w.view(per))
        else:
            fn = bind(teacher.denoiser(), cond)
        if teacher.config.clip_x0:
            fn = clamped(fn)
        x0_teacher = fn(x_a, sigma_a)
        x_b = x0_teacher + (sigma_b / sigma_a).view(per) * (x_a - x0_teacher)  # DDIM
        w_in = (
            w if student.config.network.time_cond_proj_dim is not None else None
        )  # only a student with a guidance input sees w
        want = consistency_fn(target, target.unet, cond, w_in)(x_b, sigma_b)
    got = consistency_fn(student, net, cond, w_in)(x_a, sigma_a)
    diff = (got.float() - want.float()).flatten(1)
    c = cfg.huber_c
    return ((diff.pow(2).mean(1) + c * c).sqrt() - c).mean()


def save_distill_state(
    run: Run, step: int, cfg: DistillConfig, student, target, opt, generators, batches: Batches
) -> None:
    modules = {"student": student.weights(), "target": target.weights()}
    tensors, metadata = training_state(modules, {"student": opt}, generators)
    metadata.update(step=str(step), train_config=json.dumps(cfg.to_dict()),
                    model_config=json.dumps(student.config.to_dict()),
                    **stream_metadata(batches))  # fmt: skip
    write_target = lambda path: target.save(path, {"step": str(step)})  # noqa: E731
    if cfg.lora:  # the target merged into the teacher, and the adapter alone beside it
        write_target = lambda path: save_run_model(target, path, step)  # noqa: E731
    save_checkpoint(run, step, write_target, tensors, metadata, cfg.keep)


def stored_distill_config(out: str | Path) -> DistillConfig:
    _, metadata = read_safetensors(Run(out).state_path)
    stored = json.loads(metadata.get("train_config", "{}"))
    if stored.get("model") != "distill":
        raise TrainingError(f"{out} is not a distillation run")
    return DistillConfig.from_dict(stored)


def distill(
    cfg: DistillConfig,
    resume: bool = False,
    dataset: Dataset | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
) -> Path:
    """Distil (or continue distilling) cfg.teacher into the run in cfg.out; returns the folder."""
    run = Run(cfg.out)
    check_run_folder(run, resume)
    if resume:
        cfg = resumed_config(cfg, stored_distill_config(run.dir))
    check_budget(cfg)
    if not 0 <= cfg.ema_decay < 1:
        raise TrainingError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if not 1 <= cfg.guidance_min <= cfg.guidance_max <= 30:
        raise TrainingError("the guidance range must satisfy 1 <= min <= max <= 30")
    if cfg.precision not in ("fp32", "bf16"):
        raise TrainingError(f"--precision must be fp32 or bf16, got {cfg.precision!r}")
    device = pick_device(cfg.device)
    teacher = DiffusionModel.load(resolve_checkpoint(cfg.teacher), device).requires_grad_(False)
    if teacher.config.consistency is not None:
        raise TrainingError(f"{cfg.teacher} is already a distilled model")
    T = teacher.schedule.num_steps
    if not 2 <= cfg.solver_steps <= T or T % cfg.solver_steps:
        raise TrainingError(f"--solver-steps must divide {T} (e.g. 50), got {cfg.solver_steps}")
    data = cfg.data or teacher_data(cfg.teacher)
    cfg = replace(cfg, data=data)
    if dataset is None:
        dataset = load_dataset(data, teacher.config.image_size, **cfg.data_options)
    vae = None
    if teacher.config.latent is not None:
        from .vae_train import vae_for

        vae = vae_for(teacher.config.latent, device)

    torch.manual_seed(cfg.seed)
    student = student_of(teacher, cfg, cfg.teacher)
    target = copy.deepcopy(student).requires_grad_(False)
    trainable = [p for p in student.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    generators = seeded_generators(cfg.seed)
    batches = training_batches(
        dataset, cfg.batch_size, cfg.seed, generators["data"], device, workers=cfg.workers
    )
    sigmas = skipping_sigmas(teacher, cfg.solver_steps).to(device)
    stop = Stop(cfg.minutes)
    with stop.catching_signals(), run_folder_errors(run), contextlib.closing(batches):
        step = 0
        if resume:
            tensors, metadata = read_safetensors(run.state_path)
            student.load_weights(module_state(tensors, "student"))
            target.load_weights(module_state(tensors, "target"))
            restore_training_state(tensors, metadata, {"student": opt}, generators)
            restore_stream(batches, metadata)
            step = int(metadata["step"])
            run.truncate_log(step)
        write_run_config(run, cfg)
        if progress:
            print(
                f"distilling {cfg.teacher} ({sum(p.numel() for p in student.unet.parameters()) / 1e6:.2f}M "
                f"parameters) on {data} on {device}, steps {step}->{cfg.steps}",
                flush=True,
            )
        loop = TrainLoop(run, step, cfg.steps, stop, cfg.log_every, progress, on_step)
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        student.train()
        while loop.running():
            batch = batches.next()
            x0 = batch["image"].to(device, non_blocking=True)
            if vae is not None:
                with torch.no_grad():
                    x0 = vae.encode_latents(x0, generator=generators["noise"])
            x0 = x0.contiguous(memory_format=torch.channels_last)
            cond = uncond = None
            if teacher.config.cond == "text":
                cond = teacher.text_cond(batch["caption"])
                uncond = teacher.text_cond([""] * len(x0))
            elif teacher.config.cond == "label":
                cond, uncond = teacher.label_cond(batch["label"])
            lr = cfg.lr * min(1.0, (loop.step + 1) / max(1, cfg.warmup))
            for group in opt.param_groups:
                group["lr"] = lr
            with amp:
                loss = distill_loss(
                    student, student.unet, target, teacher, x0, cond, uncond, sigmas, cfg,
                    generators["noise"],
                )  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            update_ema(target, student, loop.step, cfg.ema_decay)
            loop.advance({"loss": loss}, lr)
            loop.verify_before(cfg.checkpoint_every, cfg.sample_every)
            if loop.due(cfg.checkpoint_every):
                save_distill_state(run, loop.step, cfg, student, target, opt, generators, batches)
                loop.saved_step = loop.step
            if loop.due(cfg.sample_every):
                run.plot_loss()
                preview(target, run.dir / "samples" / f"step_{loop.step:06d}.png", vae=vae)
                if data == "shapes" and teacher.config.cond == "text" and vae is None:
                    run.append_log({"step": loop.step, **alignment_probe(target)})
                    run.plot_alignment()
        loop.close()
        if loop.step != loop.saved_step or not run.exists():
            save_distill_state(run, loop.step, cfg, student, target, opt, generators, batches)
        run.plot_loss()
        preview(target, run.dir / "samples.png", vae=vae)
        if progress:
            print(
                f"stopped at step {loop.step} after {loop.elapsed() / 60:.1f} min; "
                f"the student (4 lcm steps by default) is in {run.model_path}"
            )
    stop.end_if_signalled(run, loop.step)
    return run.dir
