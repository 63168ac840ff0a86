"""CLIP text encoders from single files: the BPE tokenizer from a folder or from the installed
`open_clip_torch`, and OpenCLIP's weights in transformers' layout."""

from __future__ import annotations

import gzip
import importlib.util
import re
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints import CheckpointError
from ..errors import first_line
from .assemble import layer_indices, load_strict


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's byte -> printable character table for byte-level BPE."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def open_clip_bpe() -> Path:
    """CLIP's BPE merges file that ships inside the installed open_clip_torch package
    (found without importing open_clip, which would import torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "this checkpoint has no tokenizer: pass tokenizer=FOLDER (vocab.json + merges.txt), "
            "or install CLIP's vocabulary with: pip install --no-deps open_clip_torch"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise CheckpointError(f"{path}: CLIP's BPE vocabulary is missing from open_clip_torch")
    return path


@lru_cache(maxsize=4)
def _bpe_tables(path: str) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = tuple(tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1])
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def clip_tokenizer(
    bpe_path: str | Path | None = None,
    pad_token: str = "<|endoftext|>",
    max_length: int = 77,
    vocab_size: int | None = None,
):
    """CLIP's tokenizer (49408 tokens, as openai/clip-vit-large-patch14's vocab.json) built
    from the BPE merges file; `pad_token="!"` gives OpenCLIP's (SD 2.x) padding with id 0.
    A smaller `vocab_size` keeps CLIP's first merges only (the same ids for the tokens kept,
    the two special tokens last): any text still tokenizes, in more pieces."""
    from transformers import CLIPTokenizer

    vocab, merges = _bpe_tables(str(bpe_path or open_clip_bpe()))
    if vocab_size is not None and vocab_size != len(vocab):
        kept = vocab_size - 2 * 256 - 2
        if not 0 <= kept <= len(merges):
            raise ValueError(f"a CLIP vocabulary has {2 * 256 + 2} to {len(vocab)} tokens")
        tokens = sorted(vocab, key=vocab.__getitem__)[: vocab_size - 2] + list(vocab)[-2:]
        vocab, merges = {t: i for i, t in enumerate(tokens)}, merges[:kept]
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=max_length
    )


def tokenizer_from_folder(folder: str | Path, pad_token: str):
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    try:
        return CLIPTokenizer.from_pretrained(
            str(folder), local_files_only=True, pad_token=pad_token, model_max_length=77
        )
    except Exception as e:
        raise CheckpointError(
            f"cannot load a CLIP tokenizer from {folder}: {first_line(e)}"
        ) from None


def openclip_to_hf(o: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP text tower (prefix removed) -> transformers' CLIPTextModel names."""
    out: dict[str, Tensor] = {}
    names = {
        "token_embedding.weight": "embeddings.token_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_final.weight": "final_layer_norm.weight",
        "ln_final.bias": "final_layer_norm.bias",
    }
    layer = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for k, v in o.items():
        if k in names:
            out[names[k]] = v
            continue
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m is None:
            m2 = re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", k)
            if m2 is None:
                continue  # text_projection, logit_scale, attn_mask: not part of the encoder
            i, kind = m2.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3), strict=True):
                out[f"encoder.layers.{i}.self_attn.{name}.{kind}"] = part
            continue
        i, name, kind = m.groups()
        if name == "attn.in_proj":
            continue
        if name not in layer:
            raise CheckpointError(f"unknown OpenCLIP tensor {k}")
        out[f"encoder.layers.{i}.{layer[name]}.{kind}"] = v
    return out


def clip_from_state(
    t: dict[str, Tensor], tokenizer, act: str, drop_last: bool, what: str
) -> nn.Module:
    """A transformers CLIPTextModel holding these tensors (transformers' names, any prefix
    "text_model." removed); heads are 64-d, as in every SD text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    t = {k.removeprefix("text_model."): v for k, v in t.items() if not k.endswith("position_ids")}
    layers = len(layer_indices(t, r"encoder\.layers\.(\d+)\."))
    if drop_last:  # SD 2.x reads the penultimate layer: the last one is never used
        t = {k: v for k, v in t.items() if not k.startswith(f"encoder.layers.{layers - 1}.")}
        layers -= 1
    try:
        vocab, width = t["embeddings.token_embedding.weight"].shape
        positions = t["embeddings.position_embedding.weight"].shape[0]
        inner = t["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{what}: incomplete CLIP text encoder (no {e})") from None
    if len(tokenizer) > vocab:
        raise CheckpointError(
            f"{what}: the tokenizer has {len(tokenizer)} tokens, the text encoder {vocab}"
        )
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=inner,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
        max_position_embeddings=positions,
        hidden_act=act,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.device("meta"):
        model = CLIPTextModel(config)
    load_strict(model, t, f"{what} (text encoder)")
    for name, buf in list(model.named_buffers()):  # non-persistent buffers are still on meta
        if buf.is_meta:
            if not name.endswith("position_ids"):
                raise CheckpointError(f"{what}: cannot initialise the text encoder buffer {name}")
            owner, _, leaf = name.rpartition(".")
            ids = torch.arange(buf.shape[-1]).expand(buf.shape)
            model.get_submodule(owner).register_buffer(leaf, ids.clone(), persistent=False)
    return model
