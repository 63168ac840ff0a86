"""CLIP of our own: a small ViT and a causal text transformer over CLIP's BPE tokens, trained
contrastively, kept as a standard transformers CLIP folder.

The folder (config.json, model.safetensors, the tokenizer, preprocessor_config.json)
is what `transformers.CLIPModel.from_pretrained`, `CLIPTokenizer` and `CLIPProcessor` load;
`Clip` gives the same embeddings as transformers does on it, from images in [-1, 1] (the
project's convention) and prompts in any language the BPE spells.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB_SIZE = 49408  # CLIP's whole BPE vocabulary
BOS, EOS = VOCAB_SIZE - 2, VOCAB_SIZE - 1  # its <|startoftext|>, <|endoftext|> (also the padding)
FOLDER_FILES = ("config.json", "model.safetensors")


@dataclass
class ClipConfig:
    image_size: int = 32
    patch_size: int = 4
    vision_width: int = 192
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 192
    text_layers: int = 4
    text_heads: int = 4
    context_length: int = 32
    embed_dim: int = 128
    vocab_size: int = VOCAB_SIZE  # fewer: CLIP's BPE with its first merges only (clip_tokenizer)

    def to_hf(self):
        from transformers import CLIPConfig

        text = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.text_width,
            intermediate_size=4 * self.text_width,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            max_position_embeddings=self.context_length,
            bos_token_id=self.vocab_size - 2,
            eos_token_id=self.vocab_size - 1,
            pad_token_id=self.vocab_size - 1,
            projection_dim=self.embed_dim,
        )
        vision = dict(
            hidden_size=self.vision_width,
            intermediate_size=4 * self.vision_width,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=3,
            projection_dim=self.embed_dim,
        )
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=self.embed_dim)

    @classmethod
    def from_hf(cls, config) -> ClipConfig:
        t, v = config.text_config, config.vision_config
        return cls(
            image_size=v.image_size,
            patch_size=v.patch_size,
            vision_width=v.hidden_size,
            vision_layers=v.num_hidden_layers,
            vision_heads=v.num_attention_heads,
            text_width=t.hidden_size,
            text_layers=t.num_hidden_layers,
            text_heads=t.num_attention_heads,
            context_length=t.max_position_embeddings,
            embed_dim=config.projection_dim,
            vocab_size=t.vocab_size,
        )


MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps its temperature at 1/100


def contrastive_loss(logits: Tensor, keys: Tensor | None = None) -> Tensor:
    """CLIP's symmetric cross-entropy over `logits` [B, B] (image i, text j): each image
    should pick its own text and each text its own image. With `keys` [B], every pair of
    items of equal keys is a match (two pictures of one class, one emoji in two languages),
    the target spread evenly over them."""
    if keys is None:
        target = torch.eye(len(logits), device=logits.device)
    else:
        target = (keys[:, None] == keys[None, :]).float()
    target = target / target.sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T)) / 2


class Clip(nn.Module):
    """A transformers `CLIPModel` and its tokenizer, speaking the project's tensors."""

    def __init__(self, config: ClipConfig, model: nn.Module | None = None, tokenizer=None):
        super().__init__()
        from transformers import CLIPModel

        from .sd.clip import clip_tokenizer

        self.config = config
        self.model = model if model is not None else CLIPModel(config.to_hf())
        self.tokenizer = tokenizer or clip_tokenizer(
            max_length=config.context_length, vocab_size=config.vocab_size
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """input ids [B, L] and mask [B, L] (bool), padded to the batch's longest prompt."""
        batch = self.tokenizer(
            list(prompts),
            padding="longest",
            truncation=True,
            max_length=self.config.context_length,
            return_tensors="pt",
        )
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device).bool()

    def text_states(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """(unit-norm text embeddings [B, D], per-token final states [B, L, W], mask [B, L])."""
        ids, mask = self.tokenize(prompts)
        out = self.model.text_model(input_ids=ids, attention_mask=mask.long())
        embeds = self.model.text_projection(out.pooler_output)
        return F.normalize(embeds, dim=-1), out.last_hidden_state, mask

    def encode_text(self, prompts: list[str]) -> Tensor:
        return self.text_states(prompts)[0]

    def pixels(self, images: Tensor) -> Tensor:
        """Images in [-1, 1], [B, C, H, W] with C = 1 or 3, as the vision tower's input."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        return images.to(self.device, torch.float32)

    def encode_image(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings [B, D] of images in [-1, 1]."""
        out = self.model.vision_model(pixel_values=self.pixels(images))
        return F.normalize(self.model.visual_projection(out.pooler_output), dim=-1)

    def logits(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """[B_image, B_text] similarities times the learned temperature."""
        return self.model.logit_scale.exp() * image_embeds @ text_embeds.T

    def save(self, folder: str | Path) -> None:
        """A standard CLIP folder: transformers' config and weights, the BPE tokenizer, and an
        image processor whose normalisation maps [0, 255] to the [-1, 1] we train on."""
        from .text import _quiet_transformers

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with _quiet_transformers():
            self.model.save_pretrained(str(folder), safe_serialization=True)
        self.tokenizer.save_pretrained(str(folder))
        size = self.config.image_size
        processor = {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": size},
            "do_center_crop": True,
            "crop_size": {"height": size, "width": size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "do_convert_rgb": True,
            "resample": 3,
        }
        (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> Clip:
        """A CLIP folder, or "default": the one shipped in the package (`shipped_folder`); a
        missing file or a config that is not CLIP's is one ValueError line."""
        from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

        from .text import _load_hf, _load_tokenizer

        folder = shipped_folder() if str(folder) == "default" else Path(folder)
        if not folder.is_dir():
            raise ValueError(f"CLIP folder not found: {folder}")
        missing = [f for f in FOLDER_FILES if not (folder / f).is_file()]
        bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        if not (bpe or (folder / "tokenizer.json").is_file()):
            missing.append("tokenizer.json (or vocab.json + merges.txt)")
        if missing:
            raise ValueError(f"{folder} is not a CLIP folder: {', '.join(missing)} missing")
        try:
            raw = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{folder / 'config.json'} is not JSON: {e}") from None
        if raw.get("model_type") != "clip":
            raise ValueError(
                f"{folder / 'config.json'}: model_type is {raw.get('model_type')!r}, not 'clip'"
            )
        try:
            hf_config = CLIPConfig.from_dict(raw)
        except Exception as e:
            raise ValueError(f"{folder / 'config.json'}: not a CLIP config ({e})") from None
        model = _load_hf(CLIPModel, folder, "CLIP model").requires_grad_(True).train()
        tokenizer = _load_tokenizer(CLIPTokenizer, folder, "CLIP tokenizer")
        return cls(ClipConfig.from_hf(hf_config), model, tokenizer)

    def describe(self) -> str:
        return json.dumps(asdict(self.config))


def shipped_folder() -> Path:
    """The CLIP folder that ships in the package, trained by `difusion train --model clip` on
    shapes, emoji and fashion in English and Spanish (docs/clip/report.md)."""
    from importlib import resources

    return Path(str(resources.files("difusion") / "weights" / "clip"))
