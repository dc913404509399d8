"""The reconstruct API: determinism, callbacks, cancellation, errors and auxiliaries."""

import pytest
import torch

from ppm_core import ReconstructionCancelled, reconstruct
from ppm_core.inference import DEFAULTS, METHODS, DivergenceError, NetworkAuxiliary, ppm_surrogate
from ppm_core.inference.common import LogUniformSigma
from ppm_core.operators import Inpainting
from ppm_core.priors import DiffusionPrior, GaussianPrior, UNetConfig
from ppm_core.problems import linear_gaussian_problem


@pytest.fixture(scope="module")
def problem():
    return linear_gaussian_problem(dim=16, n_measurements=8, noise_std=0.2, seed=0)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_returns_samples(problem, method):
    options = {"aux": "kde"} if method in ("ppm", "ppm-sim", "ikl") else {}
    posterior = reconstruct(problem.y, problem.operator, problem.prior, method=method, n_samples=4, steps=5, **options)
    assert posterior.samples.shape == (4, 1, 1, 16)
    assert posterior.mean.shape == (1, 1, 16)
    assert posterior.std.shape == (1, 1, 16)
    assert torch.isfinite(posterior.samples).all()
    assert posterior.method == method
    assert all(len(values) == 5 for values in posterior.history.values())


def test_same_seed_same_samples(problem):
    runs = [reconstruct(problem.y, problem.operator, problem.prior, n_samples=8, steps=20, seed=seed) for seed in (3, 3, 4)]
    assert torch.equal(runs[0].samples, runs[1].samples)
    assert not torch.equal(runs[0].samples, runs[2].samples)


def test_callback_reports_and_cancels(problem):
    states = []

    def callback(state):
        states.append(state)
        return state["iteration"] == 3

    with pytest.raises(ReconstructionCancelled, match="iteration 3"):
        reconstruct(problem.y, problem.operator, problem.prior, n_samples=4, steps=50, callback=callback)
    assert [s["iteration"] for s in states] == [1, 2, 3]
    assert states[0]["steps"] == 50
    assert {"data term", "prior term", "auxiliary loss"} <= set(states[0]["losses"])
    assert states[0]["mean"].shape == (1, 1, 16)


class _PoisonedPrior(GaussianPrior):
    """Gaussian prior whose denoiser returns NaN from a given call on."""

    def __init__(self, mean, cov, poison_after):
        super().__init__(mean, cov)
        self.calls = 0
        self.poison_after = poison_after

    def denoiser(self, x, sigma):
        self.calls += 1
        out = super().denoiser(x, sigma)
        return out * float("nan") if self.calls > self.poison_after else out


def test_nan_in_prior_sampler_rejected(problem):
    prior = _PoisonedPrior(problem.prior.mean, problem.prior.cov, poison_after=5)
    with pytest.raises(DivergenceError, match="prior's sampler returned NaN"):
        reconstruct(problem.y, problem.operator, prior, n_samples=4, steps=20, aux="kde")


def test_nan_names_the_term(problem):
    # init='prior' makes 63 denoiser calls (32 Heun steps) before the first particle step.
    prior = _PoisonedPrior(problem.prior.mean, problem.prior.cov, poison_after=70)
    with pytest.raises(DivergenceError, match="prior term became NaN or infinite at iteration .*sigma_min"):
        reconstruct(problem.y, problem.operator, prior, n_samples=4, steps=20, aux="kde")


def test_divergence_names_the_learning_rate(problem):
    with pytest.raises(DivergenceError, match="lr"):
        reconstruct(problem.y, problem.operator, problem.prior, n_samples=4, steps=20, aux="kde", lr=1e12)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"method": "map"}, ValueError, "method must be one of"),
        ({"n_samples": 0}, ValueError, "n_samples must be a positive integer"),
        ({"steps": 0}, ValueError, "steps must be >= 1"),
        ({"aux": "lora"}, ValueError, "aux='lora' needs a network prior"),
        ({"aux": "oracle"}, ValueError, "aux must be one of"),
        ({"distance": "l1"}, ValueError, "distance must be one of"),
        ({"weighting": "flat"}, ValueError, "weighting must be one of"),
        ({"sigma_min": 5.0, "sigma_max": 1.0}, ValueError, "sigma_min < sigma_max"),
        ({"init": "zeros"}, ValueError, "init must be"),
        ({"zeta": 1.0}, ValueError, "unknown option"),
        ({"n_samples": True}, ValueError, "n_samples must be a positive integer"),
        ({"steps": 2.5}, TypeError, "steps must be an integer or None"),
        ({"seed": None}, TypeError, "seed must be an integer"),
    ],
)
def test_invalid_options_rejected(problem, kwargs, error, pattern):
    arguments = {"steps": 2, "n_samples": 2} | kwargs
    with pytest.raises(error, match=pattern):
        reconstruct(problem.y, problem.operator, problem.prior, **arguments)


def test_invalid_measurement_rejected(problem):
    with pytest.raises(ValueError, match=r"y must have shape \(1, 1, 8\)"):
        reconstruct(torch.zeros(1, 1, 1, 9, dtype=torch.float64), problem.operator, problem.prior, steps=2)
    with pytest.raises(ValueError, match="y contains NaN"):
        reconstruct(torch.full((1, 1, 8), float("nan"), dtype=torch.float64), problem.operator, problem.prior, steps=2)
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        reconstruct([0.0] * 8, problem.operator, problem.prior, steps=2)


def test_prior_that_does_not_fit_operator_rejected(problem):
    prior = GaussianPrior(torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"prior is defined on images of shape \(1, 1, 4\).*\(1, 1, 16\)"):
        reconstruct(problem.y, problem.operator, prior, steps=2)


def test_pseudo_huber_tends_to_scaled_l2():
    # d(v) = sqrt(|v|^2 + c^2) - c -> |v|^2 / (2c) as c grows, so the gradients agree after scaling.
    prior = GaussianPrior(torch.zeros(4, dtype=torch.float64), torch.diag(torch.tensor([1.0, 0.5, 0.2, 0.1], dtype=torch.float64)))
    aux = GaussianPrior(torch.full((4,), 0.3, dtype=torch.float64), 0.4 * torch.eye(4, dtype=torch.float64))
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(32, 1, 1, 4, generator=generator, dtype=torch.float64).requires_grad_(True)
    eps = torch.randn(32, 1, 1, 4, generator=generator, dtype=torch.float64)
    sigma = torch.linspace(0.1, 2.0, 32, dtype=torch.float64)
    huber_c = 1e5
    c_h = huber_c * 2.0 / sigma  # huber_c * sqrt(dim) / sigma
    (grad_l2,) = torch.autograd.grad(ppm_surrogate(x0, sigma, eps, prior, aux, "l2").sum(), x0)
    huber = ppm_surrogate(x0, sigma, eps, prior, aux, "pseudo-huber", huber_c=huber_c)
    (grad_huber,) = torch.autograd.grad((2 * c_h * huber).sum(), x0)
    torch.testing.assert_close(grad_huber, grad_l2, rtol=1e-6, atol=1e-8)


def _tiny_network_prior():
    torch.manual_seed(0)
    prior = DiffusionPrior(UNetConfig(base_channels=8, channel_mults=[1, 2], blocks_per_level=1, embedding_dim=32), sigma_data=0.5)
    # Give the zero-initialized output layer weights so the network is not the identity map.
    torch.nn.init.normal_(prior.net.conv_out.weight, std=0.05)
    return prior.eval().requires_grad_(False)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_network_auxiliary_starts_at_prior(mode):
    prior = _tiny_network_prior()
    aux = NetworkAuxiliary(prior, LogUniformSigma(), mode=mode, steps=2, lr=1e-2, rank=2)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.1, 1.0, 5.0])
    torch.testing.assert_close(aux.denoiser(x, sigma), prior.denoiser(x, sigma), rtol=1e-5, atol=1e-6)

    # Training moves the auxiliary but never the prior.
    before = {k: v.clone() for k, v in prior.state_dict().items()}
    aux.fit(torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(2)), torch.Generator().manual_seed(3))
    assert all(torch.equal(before[k], v) for k, v in prior.state_dict().items())
    assert not torch.allclose(aux.denoiser(x, sigma), prior.denoiser(x, sigma))
    if mode == "lora":
        trainable = [name for name, p in aux.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in name for name in trainable)


def test_ppm_with_lora_on_inpainting():
    prior = _tiny_network_prior()
    mask = torch.ones(1, 16, 16)
    mask[:, 4:12, 4:12] = 0
    operator = Inpainting(mask, noise_std=0.1)
    y = operator.simulate(torch.zeros(1, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    posterior = reconstruct(y, operator, prior, n_samples=3, steps=4, lora_rank=2)
    assert posterior.options["aux"] == "lora"
    assert posterior.samples.shape == (3, 1, 16, 16)
    assert len(posterior.history["auxiliary loss"]) == 4


def test_defaults_documented_for_every_method():
    assert set(DEFAULTS) == set(METHODS)
