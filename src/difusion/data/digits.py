"""scikit-learn's handwritten digits: 1,797 grayscale 8x8 images, 10 labels.

Ships with scikit-learn (no download). The images (values 0..16, white digit on black)
are scaled to [-1, 1] and upscaled bilinearly to `size` (default 16). The whole set lives
in memory as one tensor, so indexing is a slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

DIGITS_DEFAULT_SIZE = 16


class DigitsDataset(Dataset):
    """Items: {"image": FloatTensor [1, size, size] in [-1, 1], "label": int 0..9}."""

    channels = 1
    num_classes = 10

    def __init__(self, size: int = DIGITS_DEFAULT_SIZE):
        from sklearn.datasets import load_digits  # lazy: keep `import difusion.data` light

        if size < 8:
            raise ValueError(f"digits: size must be at least 8, got {size}")
        d = load_digits()
        x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
        if size != 8:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        self.images = x.clamp_(-1.0, 1.0).contiguous()
        self.labels = torch.as_tensor(d.target, dtype=torch.long)
        self.size = size
        self.class_names = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}
