"""A small CNN classifier per data set: the feature network of the metrics and the judge
of mode coverage.

Images of 1 or 3 channels at 16, 32 or 64 px (any power of two from 8): stages of two
3x3 convolutions and a 2x2 max-pool until 4x4 is left, global average pooling, a linear
layer whose output is the penultimate *feature* vector, then ReLU and the linear layer
to the class logits. `train_classifier` fits one in well under a minute on a CPU for
`digits`; it is saved as safetensors with its configuration as JSON in the metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

FORMAT = "difusion-classifier/1"


@dataclass
class ClassifierConfig:
    channels: int = 1
    image_size: int = 16
    num_classes: int = 10
    width: int = 32  # channels of the first stage; doubled per stage up to 4x
    feature_dim: int = 128  # size of the penultimate layer (the metric's features)
    dataset: str | None = None  # name of the data set it was trained on (informative)
    class_names: list[str] | None = field(default=None)

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"classifier: channels must be 1 or 3, got {self.channels}")
        s = self.image_size
        if s < 8 or s & (s - 1):
            raise ValueError(f"classifier: image_size must be a power of two >= 8, got {s}")
        if self.num_classes < 2:
            raise ValueError(f"classifier: needs at least 2 classes, got {self.num_classes}")


class Classifier(nn.Module):
    """`forward(x) -> logits`; `features(x)` is the penultimate layer; `forward_all` both.

    Inputs are [N, C, H, W] in [-1, 1]; other sizes are resized (bilinear, antialiased)
    to `image_size`, 1 <-> 3 channels converted (grey repeated, RGB averaged).
    """

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or ClassifierConfig()
        layers: list[nn.Module] = []
        c_in, c = config.channels, config.width
        for i in range(int(math.log2(config.image_size // 4))):
            c_out = config.width * min(2**i, 4)
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.GroupNorm(8, c_out),
                nn.SiLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.GroupNorm(8, c_out),
                nn.SiLU(),
                nn.MaxPool2d(2),
            ]
            c_in = c = c_out
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c * 16, config.feature_dim)  # 4x4 map flattened
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Any [N, 1|3, H, W] in [-1, 1] -> what the network takes."""
        cfg = self.config
        x = x.to(self.fc.weight.device, torch.float32)
        if x.shape[1] != cfg.channels:
            if x.shape[1] == 1:
                x = x.expand(-1, cfg.channels, -1, -1)
            elif x.shape[1] == 3:
                x = x.mean(1, keepdim=True)
            else:
                raise ValueError(f"classifier: expected 1 or 3 channels, got {x.shape[1]}")
        if x.shape[-2:] != (cfg.image_size, cfg.image_size):
            x = F.interpolate(x, size=(cfg.image_size,) * 2, mode="bilinear", antialias=True)
        return x

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N, feature_dim], logits [N, num_classes])."""
        h = self.body(self.prepare(x)).flatten(1)
        feats = self.fc(h)
        return feats, self.head(F.relu(feats))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[1]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Predicted labels [N] (eval mode, batched)."""
        was = self.training
        self.eval()
        out = torch.cat(
            [self(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
        )
        self.train(was)
        return out.cpu()

    # ---- safetensors with the configuration in the metadata ----

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "config": json.dumps(asdict(self.config))}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Classifier:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such classifier file")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as e:  # several exception types for a corrupt header
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        if meta.get("format") != FORMAT or "config" not in meta:
            raise ValueError(f"{path}: not a difusion classifier (no classifier config)")
        model = cls(ClassifierConfig(**json.loads(meta["config"])))
        model.load_state_dict(tensors)
        return model.to(device).eval()


def is_classifier_file(path: str | Path) -> bool:
    """Whether `path` is a safetensors file written by `Classifier.save`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:
        return False


def _tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of a finite labelled data set, as two tensors."""
    images, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
        return images, labels
    items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    if not items or "label" not in items[0]:
        raise ValueError("classifier: the data set has no labels")
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])


def _shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to `max_shift` pixels (background -1 fills the border)."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=generator)
    out = torch.empty_like(x)
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            sel = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            out[sel] = padded[sel, :, dy : dy + h, dx : dx + w]
    return out


def train_classifier(
    dataset: Dataset | str,
    steps: int = 300,
    *,
    batch_size: int = 128,
    lr: float = 3e-3,
    width: int = 32,
    feature_dim: int = 128,
    max_shift: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log_every: int = 0,
) -> Classifier:
    """Fit a `Classifier` to a labelled data set (or a data set name) and return it in eval
    mode. AdamW with a one-cycle schedule, random shifts of 1/16 of the size as augmentation.

    The data set must be finite and labelled (items with "image" and "label"); its
    `channels`, `size`, `num_classes` and `class_names` attributes are used when present.
    """
    name = None
    if isinstance(dataset, str):
        from ..data import load_dataset

        name, dataset = dataset, load_dataset(dataset)
    images, labels = _tensors(dataset)
    base = getattr(dataset, "dataset", dataset)  # a Subset keeps its parent's attributes
    num_classes = getattr(base, "num_classes", None) or int(labels.max()) + 1
    size = images.shape[-1]
    config = ClassifierConfig(
        channels=images.shape[1],
        image_size=size,
        num_classes=num_classes,
        width=width,
        feature_dim=feature_dim,
        dataset=name or type(base).__name__,
        class_names=getattr(base, "class_names", None),
    )
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Classifier(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    shift = max(1, size // 16) if max_shift is None else max_shift
    for step in range(steps):
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
        x = _shift(images[idx], shift, gen).to(device)
        loss = F.cross_entropy(model(x), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"classifier step {step + 1}/{steps} loss {loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def accuracy(model: Classifier, dataset: Dataset, batch_size: int = 256) -> float:
    """Fraction of correctly classified items of a labelled data set."""
    images, labels = _tensors(dataset)
    return (model.predict(images, batch_size) == labels).float().mean().item()
