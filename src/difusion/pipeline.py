"""Pipeline: prompt -> images, for the shipped model, a user's run, or Stable Diffusion."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoints import read_metadata
from .denoiser import Cond
from .frozen import compile_frozen
from .images import to_pil
from .lora import LORA_BASE
from .model import SHIPPED, DiffusionModel, resolve_checkpoint
from .sd import is_sd_checkpoint, load_checkpoint
from .sizes import FLEXIBLE_SIDES, check_memory, makes_size, sampling_bytes, size_rule, sizes_made

StepCallback = Callable[[int, float, torch.Tensor], None]
ImageInput = Image.Image | torch.Tensor
# the U-Net's weights, as `difusion generate --dtype` and `difusion serve --dtype` name them;
# bf16 is fast only where the CPU has native bf16 (AVX-512 bf16 or AMX) or on a GPU
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def dtype_named(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _cast_input_hook(dtype: torch.dtype):
    """Forward pre-hook: the U-Net's input and text context in its own dtype (the timesteps
    stay float32: bf16 would round t = 981 to 980)."""

    def hook(module, args, kwargs):
        if args and torch.is_tensor(args[0]):
            args = (args[0].to(dtype), *args[1:])
        if torch.is_tensor(kwargs.get("context")):
            kwargs = {**kwargs, "context": kwargs["context"].to(dtype)}
        return args, kwargs

    return hook


def img2img_strength(strength: float | None, inpainting: bool) -> float:
    """The strength asked for, or the default: 0.8 of the run for img2img, all of it (1) for
    inpainting."""
    return strength if strength is not None else (1.0 if inpainting else 0.8)


class Pipeline:
    """A DiffusionModel and, for latent models, the VAE that decodes it.

    The prompt is what the model is conditioned on: text for a text model, one of its class
    names for a class-conditional model (e.g. "7"), "" for an unconditional one.

    `set_alpha_to_one=False` makes the "ddim" sampler end as diffusers' DDIM configured so
    (Stable Diffusion): its last step goes to abar_0, not to the clean sample. `vae_tile`
    (latent pixels, e.g. 64) decodes larger latents in tiles, to bound the VAE's memory.
    """

    def __init__(
        self,
        model: DiffusionModel,
        vae: torch.nn.Module | None = None,
        *,
        set_alpha_to_one: bool = True,
        vae_tile: int | None = None,
    ) -> None:
        self.model = model
        self.vae = vae
        self.set_alpha_to_one = set_alpha_to_one
        self.vae_tile = vae_tile
        self._hook = None

    @property
    def kind(self) -> str:
        """What a prompt is to this model: "text", "label" (a class name) or "unconditional"."""
        return {"text": "text", "label": "label"}.get(self.model.config.cond, "unconditional")

    @property
    def class_names(self) -> list[str] | None:
        return self.model.config.class_names if self.kind == "label" else None

    @property
    def max_tokens(self) -> int | None:
        """The text encoder's window, in tokens (None for models without text)."""
        return self.model.text_encoder.max_length if self.kind == "text" else None

    def truncated(self, prompt: str) -> bool:
        """Whether the prompt is longer than the text encoder's window (its end is dropped)."""
        return self.kind == "text" and self.model.text_encoder.token_count(prompt) > self.max_tokens

    def conditions(
        self, prompts: list[str], negative_prompt: str = "", seed: int = 0
    ) -> tuple[Cond, Cond]:
        """The condition of each prompt and the unconditional (or negative) branch's. `seed`:
        of the conditions' own draws (an unCLIP prior's)."""
        if self.kind == "text":
            self.warn_about_prompts([*prompts, negative_prompt])
            cond = self.model.text_cond(prompts)
            uncond = self.model.text_cond([negative_prompt] * len(prompts))
            if all(
                c["context_mask"] is not None and bool(c["context_mask"].all())
                for c in (cond, uncond)
            ):
                cond["context_mask"] = uncond["context_mask"] = None  # no padding: faster attention
            return cond, uncond
        if negative_prompt:
            raise ValueError("a negative prompt needs a text model")
        for p in dict.fromkeys(prompts):
            self.check_prompt(p)
        if self.kind == "label":
            return self.model.label_cond([self.class_names.index(p) for p in prompts])
        return None, None

    def warn_about_prompts(self, prompts: list[str]) -> None:
        """One warning line for each prompt cut to the text encoder's window, and for each
        holding tokens the encoder never saw (where it can tell)."""
        count = getattr(self.model.text_encoder, "unknown_tokens", None)  # not SD's
        for p in dict.fromkeys(prompts):
            if self.truncated(p):
                warnings.warn(
                    f"prompt cut to the text encoder's {self.max_tokens} tokens: {p[:60]!r}...",
                    stacklevel=4,
                )
            unknown, tokens = count(p) if count else (0, 0)
            if unknown:
                warnings.warn(
                    f"{unknown} of the {tokens} tokens of {p[:60]!r} are unknown to the "
                    "text encoder (words it never saw): expect pictures that ignore them",
                    stacklevel=4,
                )

    def check_prompt(self, prompt: str) -> None:
        """Refuse a prompt this model cannot be conditioned on: a class-conditional model takes
        one of its class names, an unconditional one "" (a text model takes any text)."""
        if self.kind == "label" and prompt not in (names := self.class_names or []):
            raise ValueError(
                f"{prompt!r} is not a class of this model; choose one of {', '.join(names)}"
            )
        if self.kind == "unconditional" and prompt:
            raise ValueError("this model is unconditional: give an empty prompt")

    @property
    def downscale(self) -> int:
        """Image pixels per model pixel (8 for Stable Diffusion, 1 for pixel models)."""
        return 1 if self.vae is None else self.vae.config.downscale

    @property
    def image_size(self) -> int:
        """The default image size in pixels."""
        return self.model.config.image_size * self.downscale

    @property
    def flexible_size(self) -> bool:
        """Whether it makes sizes besides its own: a latent model trained at 256 px or more."""
        return self.vae is not None and self.image_size >= FLEXIBLE_SIDES[0]

    def sizes(self) -> list[str]:
        """The sizes this model names ("WxH"), its own first: what a face offers to choose."""
        return [f"{w}x{h}" for w, h in sizes_made(self.image_size, self.flexible_size)]

    def size_rule(self) -> str:
        """The sizes this model makes, in words ("this model makes 32x32")."""
        return size_rule(self.image_size, self.flexible_size)

    def check_size(
        self, height: int | None = None, width: int | None = None, n: int = 1
    ) -> tuple[int, int]:
        """The one check of a requested image size, for every face (`difusion generate`, the
        server): (height, width), the model's own size for a side not given; a ValueError
        saying what this model makes when it does not make that size (`difusion.sizes`), or
        when n images of it would not fit in the device's memory (`check_memory`)."""
        height, width = height or self.image_size, width or self.image_size
        if not makes_size(width, height, self.image_size, self.flexible_size):
            raise ValueError(f"cannot make {width}x{height}: {self.size_rule()}")
        self.check_memory(height, width, n)
        return height, width

    def check_memory(self, height: int, width: int, n: int) -> None:
        """A ValueError when sampling n images of height x width (both branches of guidance)
        and decoding them cannot fit in the device's free memory (lower bounds: `sizes.py`)."""
        f, unet = self.downscale, self.model.config.unet
        need = sampling_bytes(
            unet.block_out_channels, unet.layers_per_block, 2 * n, height // f, width // f
        )
        if self.vae is not None and self.vae_tile is None:  # the decoder's top level, whole
            need = max(need, 3 * 4 * n * self.vae.config.block_out_channels[0] * height * width)
        check_memory(need, self.model.device, f"{n} image(s) of {width}x{height}")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.unet.parameters()).dtype

    def compile(self, mode: str | None = None) -> Pipeline:
        """torch.compile the U-Net in place, for generation. The first generation of each
        batch shape compiles (about a minute for a small U-Net on a CPU), later ones run the
        compiled code. On a CPU, Inductor freezes the weights: it folds them into the graph as
        constants and lays them out for oneDNN once (convolutions and linear layers), and fuses
        the norms and element-wise work around them; in bf16 the attention stays the
        AVX512-BF16 kernel (`compile_frozen`). The weights must not change afterwards: `to` and
        `with_loras` undo the compilation (compile after them). On a GPU the default mode is
        "reduce-overhead" (CUDA graphs: the shapes of a generation do not change from step to
        step); a `mode` given is used as it is."""
        if mode is None and self.model.device.type != "cuda":
            compile_frozen(self.model.unet)
        else:
            self.model.unet.compile(mode=mode or "reduce-overhead")
        return self

    def _uncompile(self) -> None:
        self.model.unet._compiled_call_impl = None  # what nn.Module.compile set

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """Move the pipeline; `dtype` (e.g. torch.bfloat16) is the U-Net's and the VAE's,
        the text encoder and the sampler's arithmetic stay float32."""
        self._uncompile()
        if device is not None:
            self.model.to(device)
            if self.vae is not None:
                self.vae.to(device)
        if dtype is not None:
            self.model.unet.to(dtype)
            if self.vae is not None:
                self.vae.to(dtype)
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            if dtype != torch.float32:
                self._hook = self.model.unet.register_forward_pre_hook(
                    _cast_input_hook(dtype), with_kwargs=True
                )
        return self

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [-1, 1] (identity for pixel models)."""
        if self.vae is None:
            return x
        z = x.to(next(self.vae.parameters()).dtype)
        return self.vae.decode_latents(z, tile=self.vae_tile).float().clamp(-1, 1)

    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images in [-1, 1] -> model space (a posterior sample for latent models)."""
        if self.vae is None:
            return images
        dtype = next(self.vae.parameters()).dtype
        return self.vae.encode_latents(images.to(self.model.device, dtype), generator).float()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = "default",
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        lora: Sequence[str | tuple[str, float]] = (),
        **options,
    ) -> Pipeline:
        """ "default" (the model shipped with the package), a run folder or a model file, or a
        Stable Diffusion checkpoint: a diffusers folder (model_index.json) or a single original
        .safetensors / .ckpt (see `difusion.sd.load_checkpoint` for its `options`). `dtype`
        (torch.bfloat16) converts the U-Net's and the VAE's weights once, as `to` does. `lora`:
        LoRA files applied to it, each "FILE[:SCALE]" or (FILE, SCALE) (see `difusion.lora`)."""
        if str(name_or_path) not in SHIPPED and is_sd_checkpoint(name_or_path):
            sd = load_checkpoint(name_or_path, **options)
            pipe = cls(sd.model, sd.vae, set_alpha_to_one=sd.set_alpha_to_one)
            return pipe.with_loras(lora).to(device, dtype)
        if options:
            raise TypeError(f"options {sorted(options)} are for Stable Diffusion checkpoints")
        from .unclip import UnclipPipeline, is_unclip

        if is_unclip(name_or_path):  # a folder of prior, decoder and CLIP
            return UnclipPipeline.load(name_or_path, device, dtype)
        path = resolve_checkpoint(name_or_path)
        base = read_metadata(path).get(LORA_BASE)
        if base is not None:  # a LoRA run on Stable Diffusion: its adapter on that checkpoint
            return cls.from_pretrained(base, device, dtype, lora=[(path, 1.0), *lora])
        model = DiffusionModel.load(path, device)
        if model.config.cond == "image":
            raise ValueError(f"{path}: an unCLIP decoder; pack it with its prior (difusion unclip)")
        vae = None
        if model.config.latent is not None:  # a latent model of ours: its VAE decodes
            from .vae_train import vae_for

            vae = vae_for(model.config.latent, device)
        return cls(model, vae).with_loras(lora).to(dtype=dtype)

    def with_loras(self, loras: Sequence[str | tuple[str, float]]) -> Pipeline:
        """The pipeline with these LoRA files ("FILE[:SCALE]" or (FILE, SCALE)) applied."""
        if loras:
            from .lora import apply_loras, parse_spec

            self._uncompile()
            apply_loras(self.model, [parse_spec(x) if isinstance(x, str) else x for x in loras])
        return self

    @property
    def default_guidance(self) -> float:
        return self.model.config.guidance if self.kind != "unconditional" else 1.0

    def __call__(self, prompt: str | list[str], *args, **kwargs) -> list[Image.Image]:
        """n images for each prompt (prompt-major order), deterministic for a seed; the
        arguments are `sample`'s."""
        return to_pil(self.sample(prompt, *args, **kwargs))

    def variations(self, image: ImageInput, n: int = 4, **kwargs) -> list[Image.Image]:
        """New pictures of an image's content: an unCLIP model's (`unclip.UnclipPipeline`)."""
        raise ValueError("this model makes no variations: it is not an unCLIP model")

    def _size(self, height: int | None, width: int | None, image) -> tuple[int, int]:
        f = self.downscale
        if image is not None and (height is None or width is None):
            ih, iw = (
                (image.height, image.width) if isinstance(image, Image.Image) else image.shape[-2:]
            )
            height, width = height or ih // f * f, width or iw // f * f
        height, width = height or self.image_size, width or self.image_size
        if height % f or width % f or height < f or width < f:
            raise ValueError(
                f"height and width must be positive multiples of {f}, got {height}x{width}"
            )
        return height, width

    def _image(self, image: ImageInput, size: tuple[int, int]) -> torch.Tensor:
        """A PIL image (as grayscale for a grayscale model) or a [3, H, W] / [B, 3, H, W]
        tensor in [-1, 1] -> [B, C, h, w]."""
        h, w = size
        if isinstance(image, Image.Image):
            gray = self.vae is None and self.model.config.channels == 1  # a grayscale model
            image = image.convert("L" if gray else "RGB")
            if image.size != (w, h):
                image = image.resize((w, h), Image.LANCZOS)
            t = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            return t.view(h, w, -1).permute(2, 0, 1)[None].float() / 127.5 - 1
        t = image.float()[None] if image.dim() == 3 else image.float()
        if t.dim() != 4 or t.shape[1] != 3:
            raise ValueError(f"image must be [3, H, W] or [B, 3, H, W], got {tuple(image.shape)}")
        if t.shape[-2:] != (h, w):
            t = F.interpolate(t, size=(h, w), mode="bicubic", antialias=True).clamp(-1, 1)
        return t

    def _mask(self, mask: ImageInput, size: tuple[int, int]) -> torch.Tensor:
        """White (1) = generate, black (0) = keep; binarized at 0.5, then every model pixel
        that touches the masked area is generated."""
        h, w = size
        if isinstance(mask, Image.Image):
            mask = mask.convert("L").resize((w, h), Image.NEAREST)
            m = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).view(1, 1, h, w)
            m = m.float() / 255
        else:
            m = mask.float()
            m = m.view(1, 1, *m.shape[-2:]) if m.dim() <= 3 else m
            if m.shape[-2:] != (h, w):
                m = F.interpolate(m, size=(h, w), mode="nearest")
        m = (m > 0.5).float()
        f = self.downscale
        return (F.avg_pool2d(m, f) > 0).float() if f > 1 else m

    @torch.no_grad()
    def sample(
        self,
        prompt: str | list[str],
        negative_prompt: str = "",
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        seed: int = 0,
        n: int = 1,
        latents: torch.Tensor | None = None,
        callback: StepCallback | None = None,
        guidance_rescale: float = 0.0,
        *,
        height: int | None = None,
        width: int | None = None,
        image: ImageInput | None = None,
        strength: float | None = None,
        mask_image: ImageInput | None = None,
        decode: bool = True,
        conditions: tuple[Cond, Cond] | None = None,
        spacing: str | None = None,
    ) -> torch.Tensor:
        """As __call__, but the images as a tensor in [-1, 1]; `callback` sees model-space x0.
        `steps`, `guidance` and `sampler` default to the model's own (20 steps of dpmpp_2m for
        most; 4 of lcm for a distilled one).

        `latents`: the initial noise in model space ([len(prompts) * n, C, h, w], as diffusers'
        `latents`). `height`/`width`: the image size, multiples of the VAE's factor (8 for
        Stable Diffusion). `image` alone: img2img, starting from the image noised to the
        `strength` fraction of the run (default 0.8). With `mask_image` (white = generate):
        inpainting, the black area kept from the image at every step (default strength 1).
        `decode=False` returns the model-space sample (diffusers' output_type="latent").
        `conditions`: (cond, uncond) made beforehand, in place of the prompts' (an unCLIP
        decoder's image embeddings); the prompts then only count the images.

        `spacing`: the sampler's sigmas ("karras", or a timestep spacing); the model's own
        by default."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompt given")
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs the image to inpaint (image=)")
        prompts = [p for p in prompts for _ in range(n)]
        sampler, steps = sampler or self.model.config.sampler, steps or self.model.config.steps
        guidance = self.default_guidance if guidance is None else guidance
        if self.kind == "unconditional" and guidance != 1.0:
            raise ValueError("guidance needs a conditional model (this one is unconditional)")
        cfg = self.model.config
        height, width = self._size(height, width, image)
        self.check_memory(height, width, len(prompts))
        f = self.downscale
        shape = (len(prompts), cfg.channels, height // f, width // f)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        cond, uncond = conditions or self.conditions(prompts, negative_prompt, seed)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        init = mask = None
        if image is not None:
            # the posterior sample and then the noise come from one generator, as in diffusers
            init = self.encode(self._image(image, (height, width)), generator)
            if init.shape[0] not in (1, len(prompts)):
                raise ValueError(f"give 1 or {len(prompts)} images, got {init.shape[0]}")
            if mask_image is not None:
                mask = self._mask(mask_image, (height, width)).to(self.model.device)
            strength = img2img_strength(strength, inpainting=mask is not None)
        elif strength is not None:
            raise ValueError("strength= needs an image (img2img or inpainting)")
        step_info = None
        if callback is not None:

            def step_info(info: dict) -> None:
                callback(info["i"], info["sigma"], info["x0"])

        ddim_end = sampler == "ddim" and not self.set_alpha_to_one
        x = self.model.sample(
            len(prompts),
            sampler=sampler,
            steps=steps,
            cond=cond,
            uncond=uncond,
            guidance=guidance,
            guidance_rescale=guidance_rescale,
            noise=latents,
            callback=step_info,
            size=shape[-2:],
            init=init,
            strength=1.0 if strength is None else strength,
            mask=mask,
            generator=generator,
            final_sigma=self.model.schedule.sigma_min if ddim_end else 0.0,
            spacing=spacing,
        )
        # only here and in model.sample: the text cache must hold plain tensors, for training
        with torch.inference_mode():
            return self.decode(x) if decode else x
