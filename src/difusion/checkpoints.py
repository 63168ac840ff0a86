"""Checkpoint files: safetensors written whole or not at all, read with their metadata
(never unpickled), and hashed; `CheckpointError` for one that cannot be read or does not fit."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit: its message is one line for users."""


def atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict) -> None:
    """Write next to the target, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return _read_safetensors(path, with_tensors=True)


def read_metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's metadata, without reading its tensors."""
    return _read_safetensors(path, with_tensors=False)[1]


def _read_safetensors(
    path: str | Path, with_tensors: bool
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}  # noqa: SIM118
    except Exception as e:  # safetensors raises several types for a corrupt header
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors, metadata


def file_sha256(path: str | Path) -> str:
    """The file's sha256, as `sha256sum` prints it."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
