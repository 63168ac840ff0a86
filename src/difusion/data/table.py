"""A table (an Arrow table: what parquet files and Hugging Face datasets hold) with an
image column and, optionally, a caption column. Items: see `encoded.py`.

An image cell is encoded bytes, or a {"bytes": ..., "path": ...} struct as Hugging Face's
`Image` feature stores it (read from "path" when "bytes" is empty; a relative path is
taken from `base`). Columns: `image_column=` / `caption_column=` when given, else the
first of the usual names ("image", "img", ...; "text", "caption", "prompt", ...), else
the first binary or image-struct column; no caption column: uncaptioned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .encoded import CAPTION_COLUMNS, IMAGE_COLUMNS, EncodedImageDataset, pick_column


def _holds_images(arrow_type: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_struct(arrow_type):
        return any(arrow_type.field(k).name == "bytes" for k in range(arrow_type.num_fields))
    return pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)


class TableDataset(EncodedImageDataset):
    """Built by the loaders (`ParquetDataset`, `HFDiskDataset`) from a `pyarrow.Table`."""

    def _load_table(
        self,
        table: Any,
        where: str,
        base: Path,
        size: int,
        channels: int,
        image_column: str | None,
        caption_column: str | None,
        cache: bool | None,
        background: tuple[int, int, int],
    ) -> None:
        names = table.column_names
        image = pick_column(names, image_column, IMAGE_COLUMNS, "image column", where)
        if image is None:
            image = next((c for c in names if _holds_images(table.schema.field(c).type)), None)
        if image is None:
            raise ValueError(f"{where}: no image column (columns: {', '.join(names)})")
        caption = pick_column(names, caption_column, CAPTION_COLUMNS, "caption column", where)
        self.base, self.image_column, self.caption_column = base, image, caption
        self._images = table.column(image)
        captions = table.column(caption).to_pylist() if caption is not None else None
        self._keep_usable(
            where,
            [f"row {r}" for r in range(table.num_rows)],
            captions,
            size,
            channels,
            background,
            cache,
        )

    def _read(self, row: int) -> bytes | Path:
        cell = self._images[row].as_py()
        if isinstance(cell, dict):
            if cell.get("bytes"):
                return cell["bytes"]
            if cell.get("path"):
                return self.base / cell["path"]
            raise ValueError("an empty image cell")
        if isinstance(cell, (bytes, bytearray)):
            return bytes(cell)
        raise ValueError(f"an image cell of type {type(cell).__name__}")
