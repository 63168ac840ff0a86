"""A parquet file (or a folder of them, read as one table) of images and captions, as
Hugging Face writes data sets: see `table.py` for the columns. Needs pyarrow (imported
here only). The table is read into memory when the data set is built.
"""

from __future__ import annotations

from pathlib import Path

from .encoded import DEFAULT_SIZE
from .table import TableDataset


def parquet_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.parquet") if not p.name.startswith("."))


class ParquetDataset(TableDataset):
    def __init__(
        self,
        path: str | Path,
        size: int = DEFAULT_SIZE,
        channels: int = 3,
        image_column: str | None = None,
        caption_column: str | None = None,
        cache: bool | None = None,
        background: tuple[int, int, int] = (255, 255, 255),
    ):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("reading parquet needs pyarrow: pip install pyarrow") from None
        path = Path(path).expanduser()
        files = parquet_files(path) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"no parquet files in {path}")
        try:
            table = pa.concat_tables(pq.read_table(f, memory_map=True) for f in files)
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"{path}: not a readable parquet file ({e})") from None
        self.path = path
        base = path if path.is_dir() else path.parent
        self._load_table(
            table, str(path), base, size, channels, image_column, caption_column, cache, background
        )
