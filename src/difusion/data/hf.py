"""A Hugging Face `datasets` data set saved with `save_to_disk` (a folder with
`dataset_info.json` and `state.json`, or a `dataset_dict.json` of splits: `split=`
picks one, "train" by default, or the only one). Columns: see `table.py`. Needs the
`datasets` package (imported here only); the data stays memory-mapped.
"""

from __future__ import annotations

from pathlib import Path

from .encoded import DEFAULT_SIZE
from .table import TableDataset

HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def is_hf_saved(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or all(
        (root / name).is_file() for name in HF_MARKERS[:2]
    )


class HFDiskDataset(TableDataset):
    def __init__(
        self,
        root: str | Path,
        size: int = DEFAULT_SIZE,
        channels: int = 3,
        image_column: str | None = None,
        caption_column: str | None = None,
        split: str | None = None,
        cache: bool | None = None,
        background: tuple[int, int, int] = (255, 255, 255),
    ):
        try:
            import datasets
        except ImportError:
            raise ValueError(
                "reading a saved Hugging Face data set needs datasets: pip install datasets"
            ) from None
        root = Path(root).expanduser()
        try:
            data = datasets.load_from_disk(str(root))
        except Exception as e:
            message = " ".join(str(e).split())
            raise ValueError(f"{root}: not a readable Hugging Face data set ({message})") from None
        where = str(root)
        if isinstance(data, datasets.DatasetDict):
            splits = list(data)
            chosen = split or ("train" if "train" in splits or len(splits) != 1 else splits[0])
            if chosen not in data:
                raise ValueError(f"{root}: no split {chosen!r} (splits: {', '.join(splits)})")
            data, where = data[chosen], f"{root} [{chosen}]"
        elif split is not None:
            raise ValueError(f"{root}: a single data set without splits; drop split={split!r}")
        self.root = root
        table = data.with_format("arrow")[:]
        self._load_table(
            table, where, root, size, channels, image_column, caption_column, cache, background
        )
