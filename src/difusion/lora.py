"""Low-rank adapters (LoRA): the files people share, applied at a scale, merged or unloaded,
and new ones trained.

An adapter adds `scale * alpha / rank * up @ down` to a layer's weight (for a convolution,
`down` is a conv of the layer's kernel into `rank` channels and `up` a 1x1 conv out of them).
Two file layouts are read, both safetensors:

- diffusers / PEFT (what `pipe.save_lora_weights` writes): `unet.<module>.lora_A.weight`
  (down) and `.lora_B.weight` (up), `text_encoder.<module>...` for the CLIP encoder, alpha =
  rank unless `.alpha` tensors or diffusers' `lora_adapter_metadata` say otherwise; also the
  older `<attention>.processor.to_q_lora.down.weight` and `<layer>.lora_linear_layer.up.weight`;
- kohya-ss (most SD LoRA files shared): `lora_unet_<module with _ for .>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`, and `lora_te_` (`lora_te1_`) for the text encoder.

The adapter layers are peft's, the ones diffusers' `load_lora_weights` puts in: our U-Net has
diffusers' module names, so `inject_adapter_in_model` wraps its nn.Linear / nn.Conv2d as it
wraps diffusers' own, and two implementations agree by construction. Not peft's here: the key
layouts (diffusers' converters live in diffusers, not a runtime dependency), and unloading,
done by putting each wrapped layer's base layer back (peft's `unload` lives on its PeftModel
wrapper, which our models are not): the base weights were never touched, so that restores
them bit for bit. Files we write bake alpha / rank into `lora_B`, so any reader gets the
same adapter whether or not it knows about alphas.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoints import atomic_save
from .errors import first_line

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers saves and loads
LORA_BASE = "lora_base"  # metadata of a run's model file that is an adapter: its base's path
TRAIN = "trained"  # the adapter being trained (not "train": ModuleDict keys are attributes)
TARGETS = {  # --lora-targets: the layers an adapter is trained on (None: every one)
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "attn+ff": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2"),
    "all": None,
}  # fmt: skip
KOHYA_ROOTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
# a tensor's key -> (layer stem, part): the layouts above, most specific first
KEY_FORMS = [
    (re.compile(r"(.+)\.processor\.(to_q|to_k|to_v)_lora\.(down|up)\.weight"), r"\1.\2"),
    (re.compile(r"(.+)\.processor\.to_out_lora\.(down|up)\.weight"), r"\1.to_out.0"),
    (re.compile(r"(.+)\.lora_linear_layer\.(down|up)\.weight"), r"\1"),
    (re.compile(r"(.+)\.lora_(A|B|down|up)\.weight"), r"\1"),
    (re.compile(r"(.+)\.(alpha)"), r"\1"),
]
PARTS = {"A": "down", "down": "down", "B": "up", "up": "up", "alpha": "alpha"}


class LoraError(ValueError):
    """A LoRA file that cannot be read or does not fit the model (one line, naming it)."""


@dataclass
class LoraFile:
    """A LoRA file's adapters by layer stem ("unet.down_blocks.0..." or "lora_unet_down_...").
    `alpha` None means alpha = rank (a scale of 1 before the user's)."""

    path: Path
    down: dict[str, Tensor]
    up: dict[str, Tensor]
    alpha: dict[str, float]
    ignored: list[str]  # keys of no known LoRA form (DoRA, LoHa, ...)

    @property
    def name(self) -> str:
        return self.path.stem


def parse_spec(spec: str) -> tuple[str, float]:
    """ "FILE[:SCALE]" -> (FILE, SCALE); the scale defaults to 1."""
    path, sep, scale = spec.rpartition(":")
    if not sep or not path:
        return spec, 1.0
    try:
        return path, float(scale)
    except ValueError:
        return spec, 1.0  # a colon in the path (C:\...), no scale


def _split(key: str) -> tuple[str, str] | None:
    for rx, stem in KEY_FORMS:
        if m := rx.fullmatch(key):
            return m.expand(stem), PARTS[m.groups()[-1]]
    return None


def read_lora(path: str | Path) -> LoraFile:
    """A LoRA file in the diffusers/PEFT or kohya layout, checked for whole, rank-consistent
    adapters (not yet against a model: see `apply_loras`)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(f"{path}: not a safetensors file ({first_line(e)})") from None
    lora = LoraFile(path, {}, {}, {}, [])
    for key, t in tensors.items():
        split = _split(key.removeprefix("base_model.model."))
        if split is None:
            lora.ignored.append(key)
        elif split[1] == "alpha":
            lora.alpha[split[0]] = float(t)
        else:
            getattr(lora, split[1])[split[0]] = t.float()
    if not lora.down and not lora.up:
        example = next(iter(tensors), "none")
        raise LoraError(
            f"{path}: no LoRA adapters among its {len(tensors)} tensors (e.g. {example}): not "
            "a LoRA file in the diffusers/PEFT or kohya layout"
        )
    for stem in lora.down.keys() ^ lora.up.keys():
        half = "down (lora_A)" if stem in lora.down else "up (lora_B)"
        raise LoraError(f"{path}: {stem} has only its {half} half")
    for stem, down in lora.down.items():
        if down.shape[0] != lora.up[stem].shape[1]:
            raise LoraError(
                f"{path}: {stem}: down is rank {down.shape[0]}, up rank {lora.up[stem].shape[1]}"
            )
    _alphas_from_metadata(lora, metadata)
    return lora


def _alphas_from_metadata(lora: LoraFile, metadata: dict[str, str]) -> None:
    """diffusers' `lora_adapter_metadata`: the LoraConfig of each part ("unet.lora_alpha",
    "unet.alpha_pattern", ...), for files whose alphas are not rank."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        return
    for stem in lora.down.keys() - lora.alpha.keys():
        root, _, module = stem.partition(".")
        patterns = config.get(f"{root}.alpha_pattern") or {}
        key = next((p for p in patterns if re.fullmatch(rf"(.*\.)?({p})", module)), None)
        alpha = patterns[key] if key is not None else config.get(f"{root}.lora_alpha")
        if alpha is not None:
            lora.alpha[stem] = float(alpha)


# --- the model's side -----------------------------------------------------------------------


def adaptable_roots(model: nn.Module) -> dict[str, nn.Module]:
    """The parts of a DiffusionModel adapters go in: its U-Net, and a CLIP text encoder's
    transformers model (Stable Diffusion's) when it has one."""
    roots = {"unet": model.unet}
    clip = getattr(getattr(model.text_encoder, "clip", model.text_encoder), "model", None)
    if clip is not None and type(clip).__name__ == "CLIPTextModel":
        roots["text_encoder"] = clip
    return roots


def _layers(root: nn.Module) -> dict[str, nn.Module]:
    """Adaptable layers (Linear, Conv2d; already wrapped ones as their base) by their name
    with "_" for "." (kohya's spelling, to which every layout's stems are reduced)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out, wrapped = {}, ()
    for name, m in root.named_modules():
        if isinstance(m, BaseTunerLayer):
            out[name.replace(".", "_")] = (name, m.get_base_layer())
            wrapped = (*wrapped, name + ".")
        elif isinstance(m, nn.Linear | nn.Conv2d) and not name.startswith(wrapped):
            out[name.replace(".", "_")] = (name, m)
    return out


def _fit(t: Tensor, like: tuple[int, ...]) -> Tensor | None:
    """`t` as a tensor of shape `like`, when they differ only by 1x1 kernel dimensions
    (a linear adapter on a 1x1 conv, or the other way round)."""
    if tuple(t.shape) == like:
        return t
    return (
        t.reshape(like)
        if t.numel() == torch.Size(like).numel() and t.shape[:2] == like[:2]
        else None
    )


def _root_of(stem: str) -> tuple[str | None, str]:
    """A stem's part of the model and its module name there (either spelling)."""
    for prefix, root in KOHYA_ROOTS.items():
        if stem.startswith(prefix):
            return root, stem.removeprefix(prefix)
    if stem.startswith("lora_"):
        return None, stem
    root, _, rest = stem.partition(".")
    if root in ("unet", "text_encoder"):
        return root, rest
    return "unet", stem  # peft's own files (base_model.model.<module>): a U-Net's


def match(model: nn.Module, lora: LoraFile) -> tuple[dict[str, dict], list[str]]:
    """The adapters of `lora` on `model`'s layers, {root: {module: (down, up, alpha)}}, and the
    stems that match no layer. A rank or shape that does not fit its layer is an error."""
    roots = adaptable_roots(model)
    tables = {r: _layers(m) for r, m in roots.items()}
    matched: dict[str, dict] = {}
    unmatched = []
    for stem, down in lora.down.items():
        root, rest = _root_of(stem)
        hit = tables.get(root, {}).get(rest.replace(".", "_"))
        if hit is None:
            unmatched.append(stem)
            continue
        name, layer = hit
        w = tuple(layer.weight.shape)
        rank = down.shape[0]
        d, u = _fit(down, (rank, *w[1:])), _fit(lora.up[stem], (w[0], rank, *(1,) * (len(w) - 2)))
        if d is None or u is None:
            raise LoraError(
                f"{lora.path}: {stem}: a rank-{rank} adapter of shapes {tuple(down.shape)} and "
                f"{tuple(lora.up[stem].shape)} does not fit the layer {name} "
                f"({type(layer).__name__} of weight {w})"
            )
        matched.setdefault(root, {})[name] = (d, u, lora.alpha.get(stem, float(rank)))
    return matched, unmatched


def lora_layers(root: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return ((n, m) for n, m in root.named_modules() if isinstance(m, LoraLayer))


def _inject(root: nn.Module, layers: dict[str, tuple], name: str, **options) -> None:
    """peft LoRA layers named `name` on `layers` ({module: (rank, alpha)}): the rank and
    alpha most layers have, the others by exact-name patterns."""
    from peft import LoraConfig, inject_adapter_in_model

    r = Counter(v[0] for v in layers.values()).most_common(1)[0][0]
    alpha = Counter(v[1] for v in layers.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=sorted(layers),
        rank_pattern={re.escape(m): v[0] for m, v in layers.items() if v[0] != r},
        alpha_pattern={re.escape(m): v[1] for m, v in layers.items() if v[1] != alpha},
        **options,
    )
    with warnings.catch_warnings():  # "already found a peft_config": several adapters, as meant
        warnings.simplefilter("ignore")
        inject_adapter_in_model(config, root, adapter_name=name)


def _activate(root: nn.Module, trainable: bool = False) -> None:
    """Every adapter of `root` on (injecting one turns the others off)."""
    layers = [m for _, m in lora_layers(root)]
    names = sorted({a for m in layers for a in m.lora_A})
    for m in layers:
        m.set_adapter(names, inference_mode=not trainable)


def apply_loras(
    model: nn.Module, loras: Sequence[tuple[str | Path | LoraFile, float]]
) -> list[str]:
    """Add each LoRA (a file or a `LoraFile`) at its scale to `model`, in place; returns the
    adapters' names. Adapters that match no layer of the model are reported (a warning), a file
    none of whose adapters match is refused."""
    names: list[str] = []
    try:
        for spec, scale in loras:
            names.append(_apply(model, spec, scale))
    except LoraError:
        unload(model, names=names)  # all of them or none
        raise
    _forget_prompts(model)
    return names


def _apply(model: nn.Module, spec: str | Path | LoraFile, scale: float) -> str:
    """One LoRA into `model`; returns its adapter's name."""
    lora = spec if isinstance(spec, LoraFile) else read_lora(spec)
    matched, unmatched = match(model, lora)
    if not matched:
        raise LoraError(
            f"{lora.path}: none of its {len(lora.down)} adapters matches a layer of this "
            f"model (e.g. {unmatched[0]})"
        )
    if unmatched or lora.ignored:
        left = [*unmatched, *lora.ignored]
        warnings.warn(
            f"{lora.path}: {len(left)} of its {len(lora.down) + len(lora.ignored)} adapters "
            f"fit no layer of this model and are ignored (e.g. {left[0]})",
            stacklevel=2,
        )
    taken = {a for root in adaptable_roots(model).values() for _, m in lora_layers(root)
             for a in m.lora_A}  # fmt: skip
    name = next(f"lora{i}" for i in range(len(taken) + 1) if f"lora{i}" not in taken)
    for root_name, layers in matched.items():
        root = adaptable_roots(model)[root_name]
        _inject(root, {m: (d.shape[0], a) for m, (d, _, a) in layers.items()}, name)
        for module, (down, up, _) in layers.items():
            layer = root.get_submodule(module)
            with torch.no_grad():
                layer.lora_A[name].weight.copy_(down)
                layer.lora_B[name].weight.copy_(up)
            layer.set_scale(name, scale)
        _activate(root)
    return name


def set_scale(model: nn.Module, name: str, scale: float) -> None:
    """Change an applied adapter's scale."""
    for root in adaptable_roots(model).values():
        for _, m in lora_layers(root):
            m.set_scale(name, scale)
    _forget_prompts(model)


def unload(model: nn.Module, merge: bool = False, names: Sequence[str] | None = None) -> nn.Module:
    """Take the adapters `names` (default: all) out of `model`, in place: the base weights as
    they were, bit for bit; or with `merge`, every adapter added into its layer's weight at its
    scale first."""
    for root in adaptable_roots(model).values():
        for name, m in list(lora_layers(root)):
            if merge:
                m.merge(adapter_names=list(m.active_adapters))
            for adapter in [] if names is None or merge else [a for a in names if a in m.lora_A]:
                m.delete_adapter(adapter)
            if names is None or merge or not m.lora_A:
                parent, _, child = name.rpartition(".")
                setattr(root.get_submodule(parent), child, m.get_base_layer())
        if "peft_config" in root.__dict__ and not any(True for _ in lora_layers(root)):
            del root.peft_config
    _forget_prompts(model)
    return model


def merged(model: nn.Module) -> nn.Module:
    """A copy of `model` with its adapters merged into its weights (a plain model again)."""
    return unload(copy.deepcopy(model), merge=True)


def _forget_prompts(model: nn.Module) -> None:
    """A text encoder's adapters change its embeddings: drop the ones the model kept."""
    cache = getattr(model, "_text_cache", None)
    if cache is not None:
        cache.clear()


# --- training -------------------------------------------------------------------------------


def add_trainable(model: nn.Module, rank: int, alpha: float | None, targets: str) -> int:
    """Freeze `model` and give its U-Net a new adapter (`TRAIN`) of `rank` on the `targets`
    layers (a key of TARGETS): down random, up zero, so the model is unchanged until trained.
    Returns the number of adapted layers."""
    if rank < 1:
        raise LoraError(f"--lora: the rank must be 1 or more, not {rank}")
    if targets not in TARGETS:
        raise LoraError(f"--lora-targets must be one of {', '.join(TARGETS)}, not {targets!r}")
    suffixes = TARGETS[targets]
    modules = {
        name: (rank, float(alpha or rank))
        for name, _ in _layers(model.unet).values()
        if suffixes is None or any(name == s or name.endswith("." + s) for s in suffixes)
    }
    if not modules:
        raise LoraError(f"--lora-targets {targets}: this model has no such layers")
    model.requires_grad_(False)
    _inject(model.unet, modules, TRAIN)
    _activate(model.unet, trainable=True)
    return len(modules)


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' own tensors under the U-Net's state-dict names (a training state's)."""
    return {k: v for k, v in model.unet.state_dict().items() if ".lora_" in k}


def load_adapter_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """`adapter_state`'s tensors back into a model given the same adapter (`add_trainable`)."""
    missing, unexpected = model.unet.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".lora_" in k]
    if missing or unexpected:
        raise LoraError(
            f"the adapter's weights do not fit the model ({len(missing)} missing, "
            f"{len(unexpected)} unexpected tensors, e.g. {(missing or unexpected)[0]})"
        )


def diffusers_layout(model: nn.Module, name: str = TRAIN) -> dict[str, Tensor]:
    """Adapter `name` of `model` in diffusers' layout (alpha / rank baked into lora_B)."""
    out = {}
    for root_name, root in adaptable_roots(model).items():
        for module, m in lora_layers(root):
            if name in m.lora_A:
                up = m.lora_B[name].weight * (m.lora_alpha[name] / m.r[name])
                out[f"{root_name}.{module}.lora_A.weight"] = m.lora_A[name].weight
                out[f"{root_name}.{module}.lora_B.weight"] = up
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def save_lora(model: nn.Module, path: str | Path, name: str = TRAIN, **metadata: str) -> None:
    """Adapter `name` as a diffusers LoRA file (what `load_lora_weights` reads)."""
    atomic_save(diffusers_layout(model, name), path, {"format": "pt", **metadata})


def save_run_model(model: nn.Module, path: Path, step: int, base: str | None = None) -> None:
    """A LoRA run's checkpoint: the model with its adapter merged (a plain model file, which
    every command reads) at `path`, and the adapter alone beside it (LORA_FILE). With `base`
    (a Stable Diffusion checkpoint's path: not ours to copy), `path` holds the adapter too,
    naming its base (LORA_BASE) for `Pipeline.from_pretrained` to apply it to."""
    if base is None:
        merged(model).save(path, {"step": str(step)})
    else:
        save_lora(model, path, step=str(step), **{LORA_BASE: base})
    save_lora(model, path.parent / LORA_FILE, step=str(step))
