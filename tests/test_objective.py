"""The edm and flow objectives: their preconditioning, their losses, and short runs of each."""

import pytest
import torch
from run_util import assert_same_training_state

from difusion.data import DigitsDataset
from difusion.denoiser import Denoiser
from difusion.model import DiffusionModel
from difusion.objective import Draws, edm_flow_loss
from difusion.schedule import NoiseSchedule, ScheduleConfig
from difusion.train import TrainConfig, train


class Net(torch.nn.Module):
    """A network of the denoiser's signature whose output is fixed noise: what D makes of it
    is the preconditioning alone."""

    def forward(self, x, t):
        return torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 50


def test_edm_preconditioning_is_the_identity_at_zero_and_right_in_the_limits():
    schedule = NoiseSchedule(ScheduleConfig(kind="edm"))
    d = Denoiser(Net(), schedule, "edm")
    x = torch.randn(3, 1, 4, 4)
    assert torch.equal(d(x, 0.0), x)  # c_skip = 1, c_out = 0, whatever the network says
    big = torch.tensor([1e6])
    c_skip, c_out, c_in, c_noise = schedule.preconditioning(big)
    assert c_skip.item() < 1e-12 and c_out.item() == pytest.approx(0.5)  # D -> sigma_data F
    assert (c_in * big).item() == pytest.approx(1.0)
    sigma = torch.tensor([0.002, 0.1, 1.0, 80.0])
    c_skip, c_out, c_in, c_noise = schedule.preconditioning(sigma)
    assert torch.allclose(c_noise, sigma.log() / 4)
    # data of std sigma_data: unit-variance network input and training target at every sigma
    x0 = 0.5 * torch.randn(200_000, 1)
    noise = torch.randn_like(x0)
    for s, skip, out, cin in zip(sigma, c_skip, c_out, c_in, strict=True):
        x = x0 + s * noise
        assert (cin * x).std().item() == pytest.approx(1.0, abs=0.01)
        assert ((x0 - skip * x) / out).std().item() == pytest.approx(1.0, abs=0.01)


def test_edm_loss_is_the_weighted_denoising_loss():
    """lambda(sigma) |D - x0|^2 with lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    schedule = NoiseSchedule(ScheduleConfig(kind="edm"))
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    model = lambda x, t: net(x) * (1 + t.view(-1, 1, 1, 1))  # noqa: E731
    x0 = torch.randn(6, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    draws = Draws(schedule.training_sigmas(6, g), torch.randn(x0.shape, generator=g), None)
    with torch.no_grad():
        loss = edm_flow_loss(model, schedule, x0, None, draws)
        sigma = draws.t.view(-1, 1, 1, 1)
        d = Denoiser(model, schedule, "edm")(x0 + sigma * draws.noise, draws.t)
        weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert loss.item() == pytest.approx((weight * (d - x0) ** 2).mean().item(), rel=1e-5)


def gaussian_velocity(mu, s, t):
    """The best velocity E[eps - x0 | x_t] for x0 ~ N(mu, s^2), x_t = (1 - t) x0 + t eps:
    x_t is N((1 - t) mu, (1 - t)^2 s^2 + t^2), and Cov(eps - x0, x_t) = t - (1 - t) s^2."""
    a = 1 - t
    gain = (t - a * s**2) / (a**2 * s**2 + t**2)
    return lambda x_t: -mu + gain * (x_t - a * mu)


class AnalyticFlow(torch.nn.Module):
    """The analytic optimum for Gaussian data, off by (da, db) in its gain and offset."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = mu, s
        self.da = torch.nn.Parameter(torch.zeros(()))
        self.db = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, c_noise):
        t = (c_noise / 1000).view(-1, *([1] * (x_t.dim() - 1))).double()
        best = gaussian_velocity(self.mu, self.s, t)(x_t.double())
        return (best + self.da * x_t + self.db).float()


def test_flow_objectives_optimum_on_gaussian_data_is_the_analytic_one():
    mu, s = 0.3, 0.6
    schedule = NoiseSchedule(ScheduleConfig(kind="flow"))
    net = AnalyticFlow(mu, s)
    g = torch.Generator().manual_seed(0)
    x0 = mu + s * torch.randn(400_000, 1, 1, 1, generator=g)
    draws = Draws(schedule.training_sigmas(len(x0), g), torch.randn(x0.shape, generator=g), None)
    loss = edm_flow_loss(net, schedule, x0, None, draws)
    loss.backward()
    # the analytic velocity is a stationary point of our loss ...
    assert abs(net.da.grad.item()) < 0.01 and abs(net.db.grad.item()) < 0.01
    with torch.no_grad():  # ... and a minimum: any step away from it costs
        for da, db in ((0.1, 0), (-0.1, 0), (0, 0.1), (0, -0.1)):
            net.da.fill_(da), net.db.fill_(db)
            assert edm_flow_loss(net, schedule, x0, None, draws) > loss
        net.da.fill_(0), net.db.fill_(0)
        # through the flow preconditioning it is the exact posterior mean in the sigma view
        sigma = torch.tensor([0.05, 0.5, 2.0, 30.0]).repeat_interleave(5)
        x = torch.randn(20, 1, 1, 1) * 3
        want = mu + s**2 / (s**2 + sigma.view(-1, 1, 1, 1) ** 2) * (x - mu)
        assert torch.allclose(Denoiser(net, schedule, "flow")(x, sigma), want, atol=1e-5)


def test_continuous_schedules_sample_on_edm_and_sd3_grids():
    edm = NoiseSchedule(ScheduleConfig(kind="edm"))
    n, rho = 18, 7
    i = torch.arange(n, dtype=torch.float64)
    want = (80 ** (1 / rho) + i / (n - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    got = edm.sample_sigmas(n, "karras")
    assert torch.allclose(got[:-1].double(), want, rtol=1e-6) and got[-1] == 0
    flow = NoiseSchedule(ScheduleConfig(kind="flow"))
    shifted = NoiseSchedule(ScheduleConfig(kind="flow", shift=3.0))
    sigmas = flow.sample_sigmas(10)[:-1].double()
    t = sigmas / (1 + sigmas)  # evenly spaced from (nearly) 1: t_k = k / 1001 of the table
    step = torch.full((9,), 100 / 1001, dtype=torch.float64)
    assert torch.allclose(t[:-1] - t[1:], step, atol=1e-6) and t[0] == pytest.approx(1000 / 1001)
    # SD3's shift t -> 3t / (1 + 2t) is sigma -> 3 sigma
    assert torch.allclose(shifted.sample_sigmas(10)[:-1].double(), 3 * sigmas, rtol=1e-6)
    t_shift = 3 * t / (1 + 2 * t)
    assert torch.allclose(t_shift, 3 * sigmas / (1 + 3 * sigmas), rtol=1e-6)
    # training levels: ln sigma ~ N(-1.2, 1.2^2) (EDM); logit t ~ N(0, 1) (flow)
    g = torch.Generator().manual_seed(0)
    log_sigma = edm.training_sigmas(100_000, g).log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.02)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.02)
    logit = flow.training_sigmas(100_000, g).log()  # logit t = ln(t / (1 - t)) = ln sigma
    assert logit.mean().item() == pytest.approx(0.0, abs=0.02)
    assert logit.std().item() == pytest.approx(1.0, abs=0.02)
    # what the model calls unit noise: x_t = x / (1 + sigma) for flow
    assert flow.noise_std(9.0) == 10.0 and edm.noise_std(0.0) == 1.0


def test_predictions_must_fit_their_schedule():
    with pytest.raises(ValueError, match="a edm prediction does not fit a cosine schedule"):
        Denoiser(Net(), NoiseSchedule(), "edm")
    with pytest.raises(ValueError, match="a eps prediction does not fit a flow schedule"):
        Denoiser(Net(), NoiseSchedule(ScheduleConfig(kind="flow")), "eps")


def tiny(tmp_path, name, **kw) -> TrainConfig:
    base = dict(
        data="digits", out=str(tmp_path / name), size=8, steps=6, batch_size=4, channels=16,
        channel_mult=(1, 2), attention_resolutions=(4,), layers_per_block=1, head_dim=16,
        log_every=1, checkpoint_every=3, sample_every=1000, warmup=2, dropout=0.1,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def digits8():
    return DigitsDataset(size=8)


def assert_resumes_exactly(tmp_path, digits8, **kw) -> None:
    """Six steps in one run, and three then three more after a resume: the same bits."""
    full = train(tiny(tmp_path, "full", steps=6, **kw), dataset=digits8, progress=False)
    train(tiny(tmp_path, "half", steps=3, **kw), dataset=digits8, progress=False)
    resumed = train(tiny(tmp_path, "half", steps=6, **kw), resume=True, dataset=digits8,
                    progress=False)  # fmt: skip
    assert_same_training_state(full, resumed)


def assert_loss_falls(tmp_path, digits8, **kw) -> DiffusionModel:
    losses = []
    cfg = tiny(tmp_path, "long", steps=30, lr=2e-3, dropout=0.0, batch_size=16, **kw)
    out = train(cfg, dataset=digits8, progress=False, on_step=lambda s, loss: losses.append(loss))
    # (EDM's and flow's losses keep a large floor: the noise at high sigma is unpredictable)
    assert sum(losses[-10:]) / 10 < 0.85 * sum(losses[:5]) / 5, losses
    return DiffusionModel.load(out / "model.safetensors")


@pytest.mark.parametrize("objective", ["edm", "flow"])
def test_unet_recipe_lowers_its_loss_resumes_exactly_and_samples(tmp_path, digits8, objective):
    model = assert_loss_falls(tmp_path, digits8, objective=objective)
    assert model.config.prediction == objective and model.schedule.kind == objective
    assert model.config.sampler == ("heun_edm" if objective == "edm" else "dpmpp_2m")
    x = model.sample(2, steps=4)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    assert_resumes_exactly(tmp_path, digits8, objective=objective)


def test_objective_options_are_checked(tmp_path, digits8):
    from difusion.runs import TrainingError

    with pytest.raises(TrainingError, match="--prediction, --min-snr-gamma: for --objective ddpm"):
        train(tiny(tmp_path, "x", objective="edm", prediction="v", min_snr_gamma=5.0),
              dataset=digits8, progress=False)  # fmt: skip
    with pytest.raises(TrainingError, match="unknown objective 'rf'"):
        train(tiny(tmp_path, "y", objective="rf"), dataset=digits8, progress=False)


def test_models_saved_before_keep_loading():
    """The shipped models predate the edm and flow objectives and the DiT backbone."""
    from difusion.model import default_model_path

    for name in ("default", "default-fast"):
        model = DiffusionModel.load(default_model_path(name))
        assert model.config.backbone == "unet" and model.config.dit is None
        assert model.schedule.kind == "cosine" and model.config.prediction in ("eps", "v")
        cond, uncond = model.text_cond(["a red circle"]), model.text_cond([""])
        x = model.sample(1, steps=2, cond=cond, uncond=uncond, guidance=model.config.guidance
                         if model.config.consistency is None else 1.0)  # fmt: skip
        assert x.shape[1:] == (3, 32, 32) and torch.isfinite(x).all()
