"""WebDataset tar shards, as img2dataset writes them, read in place (never unpacked).

`shards` is a tar file, a folder of tar files (searched recursively), or a pattern with
brace ranges and lists: "shards/{000000..000009}.tar", "{train,val}-{0..3}.tar". A
sample is the members sharing a key (the member name up to the first dot of its base
name): an image (`image_column=` names its extension; by default the first of jpg, jpeg,
png, webp) and a caption from `key.txt`, or from `key.json` under "caption" / "text" /
"prompt" (`caption_column=` names another extension or JSON key). No sample has a
caption: uncaptioned. Items: see `encoded.py`.

Random access: building the data set scans each shard's tar headers once (tarfile
seeks past the member data) and keeps every image's (shard, offset, length); captions,
being small, are read during that scan. An item reads its image by offset.
"""

from __future__ import annotations

import itertools
import json
import re
import tarfile
from pathlib import Path

from .encoded import CAPTION_COLUMNS, DEFAULT_SIZE, IMAGE_COLUMNS, EncodedImageDataset

BRACES = re.compile(r"\{([^{}]*)\}")
RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
MAX_SHARDS = 1_000_000


def is_shard_pattern(spec: str) -> bool:
    return any(RANGE.match(m) or "," in m for m in BRACES.findall(spec))


def expand_braces(spec: str) -> list[str]:
    """ "a{00..02}b{x,y}" -> a00bx, a00by, a01bx, ... (a range keeps its first bound's width)."""
    parts = BRACES.split(spec)  # text, group, text, group, ...
    choices: list[list[str]] = []
    for k, part in enumerate(parts):
        if k % 2 == 0:
            choices.append([part])
            continue
        bounds = RANGE.match(part)
        if bounds:
            lo, hi = (int(b) for b in bounds.groups())
            if hi < lo or hi - lo >= MAX_SHARDS:
                raise ValueError(f"{spec}: bad shard range {{{part}}}")
            width = len(bounds.group(1))
            choices.append([str(n).zfill(width) for n in range(lo, hi + 1)])
        else:
            choices.append(part.split(","))
    return ["".join(combo) for combo in itertools.product(*choices)]


def shard_paths(shards: str | Path) -> list[Path]:
    """The tar files `shards` names; a ValueError naming the first one missing."""
    spec = str(shards)
    path = Path(spec).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.rglob("*.tar") if not p.name.startswith("."))
        if not found:
            raise ValueError(f"no .tar shards in {path}")
        return found
    paths = (
        [Path(s).expanduser() for s in expand_braces(spec)] if is_shard_pattern(spec) else [path]
    )
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"shard not found: {missing[0]}{more}")
    return paths


def _split_key(name: str) -> tuple[str, str]:
    folder, _, base = name.removeprefix("./").rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _caption(members: dict[str, bytes], asked: str | None) -> str | None:
    text_keys = [asked] if asked else ["txt"]
    for ext in text_keys:
        if ext in members:
            return members[ext].decode("utf-8", errors="replace")
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        keys = [asked] if asked else CAPTION_COLUMNS
        if isinstance(meta, dict):
            return next((meta[k] for k in keys if meta.get(k) is not None), None)
    return None


class WebDataset(EncodedImageDataset):
    def __init__(
        self,
        shards: str | Path,
        size: int = DEFAULT_SIZE,
        channels: int = 3,
        image_column: str | None = None,
        caption_column: str | None = None,
        cache: bool | None = None,
        background: tuple[int, int, int] = (255, 255, 255),
    ):
        self.shards = shard_paths(shards)
        image_exts = [image_column.lower()] if image_column else list(IMAGE_COLUMNS)
        self.locations: list[tuple[int, int, int]] = []  # (shard, data offset, length)
        names: list[str] = []
        captions: list[str | None] = []
        no_image = f"no .{image_column} member" if image_column else "no image member"
        skips: dict[str, list[str]] = {"unreadable shard": [], no_image: []}
        for s, shard in enumerate(self.shards):
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            texts: dict[str, dict[str, bytes]] = {}
            try:
                with tarfile.open(shard, "r:") as tar:
                    for info in tar:
                        if not info.isfile():
                            continue
                        key, ext = _split_key(info.name)
                        samples.setdefault(key, {})[ext] = info
                        if ext in ("txt", "json") or ext == caption_column:
                            texts.setdefault(key, {})[ext] = tar.extractfile(info).read()
            except (tarfile.TarError, OSError) as e:
                skips["unreadable shard"].append(f"{shard.name} ({e})")
            for key, members in samples.items():
                name = f"{shard.name}:{key}"
                ext = next((e for e in image_exts if e in members), None)
                if ext is None:
                    skips[no_image].append(name)
                    continue
                info = members[ext]
                self.locations.append((s, info.offset_data, info.size))
                names.append(f"{name}.{ext}")
                captions.append(_caption(texts.get(key, {}), caption_column))
        if caption_column and all(c is None for c in captions):
            raise ValueError(f"{shards}: no caption {caption_column!r} in any sample")
        where = str(shards)
        self._keep_usable(
            where,
            names,
            captions if any(c is not None for c in captions) else None,
            size,
            channels,
            background,
            cache,
            skips,
        )

    def _read(self, row: int) -> bytes:
        s, offset, length = self.locations[row]
        with open(self.shards[s], "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise ValueError(f"truncated shard: {len(data)} of {length} bytes")
        return data
