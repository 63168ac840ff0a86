"""The LoRA files a server offers (`--lora-dir`): listed at /sdapi/v1/loras in AUTOMATIC1111's
shape, and applied to one request by a prompt's `<lora:NAME:SCALE>`, as its web UI writes it.

The tags are taken out of the prompt before the request is checked; the adapters go into the
model inside the request's job and out again when it ends (the base weights bit for bit). A
model with an adapter in it serves no other request meanwhile: jobs with LoRAs hold the model
alone, the others share it (a readers-writer lock per pipeline).
"""

from __future__ import annotations

import contextlib
import re
import threading
import weakref
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request

from .errors import APIError

if TYPE_CHECKING:
    from .models import Generation

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])
TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


def lora_files(folder: str | Path | None) -> dict[str, Path]:
    """The folder's .safetensors files (its subfolders' too) by name: the file's stem."""
    if folder is None:
        return {}
    return {p.stem: p for p in sorted(Path(folder).rglob("*.safetensors"))}


def file_metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # not readable: listed, refused when used
        return {}


@router.get("/loras")
def loras(request: Request) -> list[dict]:
    folder = request.app.state.server.settings.lora_dir
    return [
        {"name": name, "alias": name, "path": str(path), "metadata": file_metadata(path)}
        for name, path in lora_files(folder).items()
    ]


def take_lora_tags(g: Generation, folder: str | Path | None) -> Generation:
    """The request with its prompt's `<lora:NAME[:SCALE]>` tags taken out into `g.loras`
    ([(file, scale)]); a name the folder does not have is refused (422, naming the prompt)."""
    tags = TAG.findall(g.prompt)
    if not tags:
        return g
    files = lora_files(folder)
    chosen = []
    for name, scale in tags:
        if name not in files:
            known = ", ".join(files) or "none: the server has no --lora-dir"
            raise APIError(422, f"no LoRA named {name!r} (see /sdapi/v1/loras: {known})", g.field("prompt"))  # fmt: skip
        try:
            chosen.append((files[name], float(scale) if scale else 1.0))
        except ValueError:
            raise APIError(422, f"<lora:{name}:{scale}>: the scale is not a number", g.field("prompt")) from None  # fmt: skip
    prompt = " ".join(TAG.sub(" ", g.prompt).split())
    return replace(g, prompt=prompt, loras=chosen)


class SharedOrAlone:
    """A readers-writer lock: many holders `shared`, or one `alone`."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.shared_count, self.alone_held = 0, False

    @contextlib.contextmanager
    def hold(self, alone: bool) -> Iterator[None]:
        with self.cond:
            self.cond.wait_for(lambda: not self.alone_held and (not alone or not self.shared_count))
            if alone:
                self.alone_held = True
            else:
                self.shared_count += 1
        try:
            yield
        finally:
            with self.cond:
                if alone:
                    self.alone_held = False
                else:
                    self.shared_count -= 1
                self.cond.notify_all()


LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def applied(pipe, loras: list[tuple[Path, float]]) -> Iterator[None]:
    """`pipe` with these adapters in it for the block (alone), or as it is (shared)."""
    from ..lora import LoraError, apply_loras, unload

    with LOCKS_GUARD:
        lock = LOCKS.setdefault(pipe, SharedOrAlone())
    with lock.hold(alone=bool(loras)):
        if not loras:
            yield
            return
        try:
            names = apply_loras(pipe.model, loras)
        except LoraError as e:
            raise APIError(422, str(e), "prompt") from None
        try:
            yield
        finally:
            unload(pipe.model, names=names)
