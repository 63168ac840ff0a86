"""An image folder captioned by `metadata.jsonl`: Hugging Face's imagefolder convention,
the one diffusers' text-to-image training reads.

Each line is a JSON object naming an image by "file_name" (relative to the folder of the
metadata file; `metadata.jsonl` files in subfolders, e.g. one per split, are all read)
with its caption under "text" (`caption_column=` picks another key; by default the
first of "text", "caption", "prompt", ... that a line has). Images the metadata does not
name, and names with no file, are skipped and counted. Items: see `encoded.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .encoded import CAPTION_COLUMNS, DEFAULT_SIZE, EncodedImageDataset
from .folder import IMAGE_EXTENSIONS

METADATA_FILE = "metadata.jsonl"


def has_metadata(root: Path) -> bool:
    return any(not _hidden(p, root) for p in root.rglob(METADATA_FILE))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


class MetadataDataset(EncodedImageDataset):
    def __init__(
        self,
        root: str | Path,
        size: int = DEFAULT_SIZE,
        channels: int = 3,
        caption_column: str | None = None,
        cache: bool | None = None,
        background: tuple[int, int, int] = (255, 255, 255),
    ):
        root = Path(root).expanduser()
        self.root = root
        self.paths: list[Path] = []
        captions: list[str | None] = []
        for meta in sorted(p for p in root.rglob(METADATA_FILE) if not _hidden(p, root)):
            for number, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    name = str(row["file_name"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    where = f"{meta.relative_to(root)} line {number}"
                    raise ValueError(f"{where}: not a JSON object with a file_name") from None
                keys = [caption_column] if caption_column else CAPTION_COLUMNS
                self.paths.append(meta.parent / name)
                captions.append(next((row[k] for k in keys if row.get(k) is not None), None))

        if caption_column and all(c is None for c in captions):
            raise ValueError(f"{root}: no caption {caption_column!r} in any sample")
        listed = {p.resolve() for p in self.paths}
        unlisted = [
            str(p.relative_to(root))
            for p in sorted(root.rglob("*"))
            if p.suffix.lower() in IMAGE_EXTENSIONS
            and not _hidden(p, root)
            and p.resolve() not in listed
        ]
        missing = [str(p.relative_to(root)) for p in self.paths if not p.is_file()]
        present = [k for k, p in enumerate(self.paths) if p.is_file()]
        self.paths = [self.paths[k] for k in present]
        captions = [captions[k] for k in present]
        self._keep_usable(
            str(root),
            [str(p.relative_to(root)) for p in self.paths],
            captions if any(c is not None for c in captions) else None,
            size,
            channels,
            background,
            cache,
            {"not in metadata.jsonl": unlisted, "missing file": missing},
        )

    def _read(self, row: int) -> Path:
        return self.paths[row]
