import json
from dataclasses import MISSING, dataclass, field, fields, replace

import pytest

from difusion.checkpoints import read_safetensors
from difusion.clip_train import ClipTrainConfig
from difusion.compare.config import CompareConfig
from difusion.configs import DictConfig
from difusion.distill import DistillConfig
from difusion.gan_train import GANTrainConfig
from difusion.model import ModelConfig, resolve_checkpoint
from difusion.nn.dit import DiTConfig
from difusion.nn.gan import GANConfig
from difusion.nn.unet import UNetConfig
from difusion.nn.vae import VAEConfig
from difusion.prior import PriorConfig
from difusion.prior_train import PriorTrainConfig
from difusion.schedule import ScheduleConfig
from difusion.text import ScratchConfig
from difusion.train import TrainConfig
from difusion.vae_train import VAETrainConfig

UNET = UNetConfig(
    block_out_channels=(32, 64), attention_levels=(False, True), context_dim=16, layout_map=True
)
DIT = DiTConfig(sample_size=16, patch_size=4, num_layers=2, num_classes=11)
MODEL = ModelConfig(
    unet=UNET, schedule=ScheduleConfig(kind="edm", sigma_max=40.0), prediction="edm",
    cond="label", class_names=["circle", "square"], backbone="dit", dit=DIT,
    latent={"vae": VAEConfig().to_dict(), "sha256": "ab", "path": "vae.safetensors"},
)  # fmt: skip
# one instance of every config class, each with some fields off their defaults
CONFIGS = [
    TrainConfig(
        data="shapes", minutes=1.5, cond="text", channel_mult=(1, 2), attention_resolutions=(8,),
        data_options={"count": 3}, lora=4, lora_alpha=8.0,
    ),
    GANTrainConfig(data="fashion", z_dim=64, d_channels=32),
    VAETrainConfig(channel_mult=(1, 2, 4), kl_weight=1e-5, size=16),
    PriorTrainConfig(clip="runs/clip", width=128, data_options={"languages": ["en", "fr"]}),
    ClipTrainConfig(size=16, embed_dim=32, minutes=0.5),
    DistillConfig(teacher="runs/t", data="digits", lora=8, guidance_max=6.0),
    CompareConfig(data=("digits",), seeds="0,4,7", preset="tiny", feature_net="x.safetensors"),
    MODEL,
    ScheduleConfig(kind="flow", shift=3.0, zero_terminal_snr=True),
    PriorConfig(schedule=ScheduleConfig(kind="linear"), layers=2, clip={"embed_dim": 64}),
    ScratchConfig(tokenizer='{"model": {}}', dim=64, layers=2),
    UNET,
    GANConfig(image_size=16, channels=3, data="fashion"),
    VAEConfig(block_out_channels=(32, 64, 64), shift_factor=0.1, use_quant_conv=False),
    DIT,
]  # fmt: skip
SHIPPED = ("default", "default-fast", "default-bilingual")


def as_stored(d: dict) -> dict:
    return json.loads(json.dumps(d))


def test_every_config_class_is_covered():
    assert {type(c) for c in CONFIGS} == set(DictConfig.__subclasses__())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_round_trip_through_json(config):
    default = {f.name: f.default for f in fields(config) if f.default is not MISSING}
    assert any(getattr(config, k) != v for k, v in default.items()), "not a non-default instance"
    d = config.to_dict()
    assert d == as_stored(d)  # JSON-ready: tuples as lists, nested configs as dicts
    back = type(config).from_dict(as_stored(d))
    assert back == config
    assert back.to_dict() == d


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_unknown_keys(config):
    d = {**config.to_dict(), "a_field_of_a_newer_version": 1}
    if type(config) in (UNetConfig, VAEConfig):  # strict: a network this version cannot build
        with pytest.raises(ValueError, match="unknown .*a_field_of_a_newer_version"):
            type(config).from_dict(d)
    else:
        assert type(config).from_dict(d) == config


def test_lists_become_tuples_and_missing_keys_defaults():
    train = TrainConfig.from_dict({"channel_mult": [1, 2, 4], "attention_resolutions": [8]})
    assert train.channel_mult == (1, 2, 4) and train.attention_resolutions == (8,)
    assert train == TrainConfig(channel_mult=(1, 2, 4), attention_resolutions=(8,))
    assert VAETrainConfig.from_dict({"channel_mult": [1, 2]}).channel_mult == (1, 2)
    assert CompareConfig.from_dict({"data": ["shapes"]}).data == ("shapes",)
    unet = UNetConfig.from_dict({"block_out_channels": [8, 16], "attention_levels": [0, 1]})
    assert unet.block_out_channels == (8, 16) and unet.attention_levels == (False, True)
    # a list-typed field stays a list, a dict-typed one a dict
    model = ModelConfig.from_dict(
        {"unet": {}, "schedule": {}, "class_names": ["a", "b"], "latent": {"vae": {}}}
    )
    assert model.class_names == ["a", "b"] and model.latent == {"vae": {}}
    assert PriorConfig.from_dict({}) == PriorConfig()


def test_nested_configs():
    d = as_stored(MODEL.to_dict())
    model = ModelConfig.from_dict(d)
    assert isinstance(model.unet, UNetConfig) and isinstance(model.dit, DiTConfig)
    assert model.schedule == ScheduleConfig(kind="edm", sigma_max=40.0)
    assert ModelConfig.from_dict({**d, "dit": None}).dit is None
    # an older file, before the DiT backbone: the U-Net model it was
    old = {k: v for k, v in d.items() if k not in ("backbone", "dit")}
    assert ModelConfig.from_dict(old) == replace(model, backbone="unet", dit=None)
    # a dict without a network or a schedule is not a model's configuration
    for key in ("unet", "schedule"):
        with pytest.raises(ValueError, match=f"ModelConfig needs {key}"):
            ModelConfig.from_dict({k: v for k, v in d.items() if k != key})
    # the nested U-Net stays strict, the model around it does not
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        ModelConfig.from_dict({**d, "unet": {**d["unet"], "levels": 3}})


def test_generic_field_types():
    @dataclass
    class Inner(DictConfig):
        size: tuple[int, ...] = (1,)

    @dataclass
    class Outer(DictConfig):
        inner: Inner = field(default_factory=Inner)
        maybe: Inner | None = None
        sizes: tuple[int, int] | None = None
        names: list[str] = field(default_factory=list)

    outer = Outer.from_dict(
        {"inner": {"size": [2, 3]}, "maybe": {"size": [4]}, "sizes": [5, 6], "names": ["x"]}
    )
    assert outer == Outer(Inner((2, 3)), Inner((4,)), (5, 6), ["x"])
    assert outer.to_dict() == {
        "inner": {"size": [2, 3]}, "maybe": {"size": [4]}, "sizes": [5, 6], "names": ["x"]
    }  # fmt: skip
    assert Outer.from_dict({"maybe": None, "sizes": None}) == Outer()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_round_trip(name):
    _, metadata = read_safetensors(resolve_checkpoint(name))
    stored = json.loads(metadata["config"])
    config = ModelConfig.from_dict(stored)
    d = config.to_dict()
    assert ModelConfig.from_dict(as_stored(d)) == config
    # what the file holds comes back unchanged (keys it predates take their defaults)
    assert holds(d, stored)


def holds(d: dict, stored: dict) -> bool:
    """`d` has every key of `stored` with the same value (nested dicts: at least theirs)."""
    return all(
        k in d and (holds(d[k], v) if isinstance(v, dict) else d[k] == v) for k, v in stored.items()
    )
