"""Auxiliary score models ``s_phi ≈ s_q`` of the current samples.

An auxiliary exposes ``denoiser(x, sigma)`` like a prior and ``fit(particles, generator)``,
which takes a few steps of denoising score matching on fresh noisy copies of the particles
(or, for the exact kinds, recomputes the score from them).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from ..priors.base import Prior, as_sigma
from ..priors.network import DiffusionPrior
from .common import LogUniformSigma

AUX_KINDS = ("lora", "full", "residual", "kde", "gaussian")


class Auxiliary(nn.Module):
    """Base class: the denoiser of the distribution of the current particles."""

    def denoiser(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        raise NotImplementedError

    def fit(self, particles: Tensor, generator: torch.Generator) -> float | None:
        """Update the model to the current particles; return the last training loss, or ``None`` for exact kinds."""
        raise NotImplementedError

    @contextlib.contextmanager
    def frozen(self) -> Iterator[Auxiliary]:
        """Disable gradients into the auxiliary's parameters while the particles take a step."""
        flags = [p.requires_grad for p in self.parameters()]
        self.requires_grad_(False)
        try:
            yield self
        finally:
            for p, flag in zip(self.parameters(), flags):
                p.requires_grad_(flag)


class KernelDensityAuxiliary(Auxiliary):
    """Exact score of the kernel density ``(1/N) sum_j N(x_j, sigma^2 I)`` of the particles.

    Exact for the empirical distribution, but in high dimension with few particles each noisy
    particle sits next to its own centre, so the entropy force vanishes at small sigma.
    """

    def __init__(self) -> None:
        super().__init__()
        self.centres: Tensor | None = None

    def fit(self, particles: Tensor, generator: torch.Generator) -> float | None:
        self.centres = particles.detach().clone()
        return None

    def denoiser(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        if self.centres is None:
            raise RuntimeError("KernelDensityAuxiliary.fit must be called before denoiser")
        sigma_b = as_sigma(sigma, x).reshape(-1, 1)
        flat, centres = x.reshape(x.shape[0], -1), self.centres.reshape(self.centres.shape[0], -1)
        weights = torch.softmax(-torch.cdist(flat, centres) ** 2 / (2 * sigma_b**2), dim=1)
        return (weights @ centres).reshape(x.shape)


class GaussianFitAuxiliary(Auxiliary):
    """Exact denoiser of a Gaussian fitted to the particles (mean and covariance).

    Right when the target is Gaussian and there are more particles than dimensions; an
    oracle for closed-form tests, not a general-purpose auxiliary.
    """

    def __init__(self, jitter: float = 1e-6) -> None:
        super().__init__()
        self.jitter = jitter
        self.mean: Tensor | None = None

    def fit(self, particles: Tensor, generator: torch.Generator) -> float | None:
        flat = particles.detach().reshape(particles.shape[0], -1)
        self.mean = flat.mean(0)
        cov = torch.cov(flat.T).reshape(flat.shape[1], flat.shape[1])
        cov = cov + self.jitter * torch.eye(flat.shape[1], dtype=flat.dtype)
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(cov)
        self.eigenvalues = self.eigenvalues.clamp_min(0)
        return None

    def denoiser(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        if self.mean is None:
            raise RuntimeError("GaussianFitAuxiliary.fit must be called before denoiser")
        sigma_b = as_sigma(sigma, x).reshape(-1, 1)
        coeffs = (x.reshape(x.shape[0], -1) - self.mean) @ self.eigenvectors
        shrink = self.eigenvalues / (self.eigenvalues + sigma_b**2)
        return (self.mean + (coeffs * shrink) @ self.eigenvectors.T).reshape(x.shape)


class TrainedAuxiliary(Auxiliary):
    """Base of auxiliaries trained by denoising score matching on the particles.

    ``L_aux = E lambda(sigma) ||D_phi(x0 + sigma eps, sigma) - x0||^2`` with the EDM weighting
    ``lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` and sigma drawn from the same
    proposal as the particle step, so the auxiliary is accurate where that step puts its weight.
    """

    def __init__(self, proposal: LogUniformSigma, steps: int, lr: float, sigma_data: float):
        super().__init__()
        if steps < 1:
            raise ValueError(f"aux_steps must be >= 1; got {steps}")
        if lr <= 0:
            raise ValueError(f"aux_lr must be positive; got {lr}")
        self.proposal = proposal
        self.steps = steps
        self.lr = lr
        self.sigma_data = sigma_data
        self._optimizer: torch.optim.Optimizer | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def optimizer(self) -> torch.optim.Optimizer:
        """Return the AdamW optimizer of the trainable parameters, created on first use."""
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=self.lr, weight_decay=0.0)
        return self._optimizer

    def fit(self, particles: Tensor, generator: torch.Generator, average_gradients: Callable[[list[nn.Parameter]], None] | None = None) -> float | None:
        """Take ``steps`` DSM steps on fresh noisy copies of ``particles``; return the last loss.

        ``average_gradients`` (for data-parallel training) is applied to the trainable
        parameters after each backward pass.
        """
        optimizer = self.optimizer()
        x0 = particles.detach()
        loss = torch.tensor(float("nan"))
        for _ in range(self.steps):
            sigma = self.proposal.sample(x0.shape[0], generator, dtype=x0.dtype).to(x0.device)
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
            weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
            denoised = self.denoiser(x0 + sigma.reshape(-1, 1, 1, 1) * eps, sigma)
            loss = (weight.reshape(-1, 1, 1, 1) * (denoised - x0) ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if average_gradients is not None:
                average_gradients(self.trainable_parameters())
            optimizer.step()
        return float(loss.detach())


class NetworkAuxiliary(TrainedAuxiliary):
    """Copy of a network prior, adapted with LoRA (``mode="lora"``) or fine-tuned in full.

    The copy starts equal to the prior, so the PPM prior term is zero at the first step. LoRA
    adapters (``peft``) go on the residual blocks' convolutions and noise-embedding layers.
    """

    LORA_TARGETS = ("conv0", "conv1", "affine")

    def __init__(self, prior: DiffusionPrior, proposal: LogUniformSigma, mode: str = "lora", steps: int = 1, lr: float = 1e-3, rank: int = 8, feature: LikelihoodFeature | None = None, event_shape: tuple[int, int, int] | None = None):
        super().__init__(proposal, steps, lr, prior.sigma_data)
        self.feature = feature
        self.head = None
        if feature is not None:
            if event_shape is None:
                raise ValueError("event_shape is needed with a likelihood feature")
            channels, height, width = event_shape
            # Zero-initialized, so the auxiliary still equals the prior at the first step.
            self.head = _ResidualConv(channels, 32, context_channels=2 * channels, feature_channels=channels)
            nn.init.zeros_(self.head.body[-1].weight)
            nn.init.zeros_(self.head.body[-1].bias)
            self.register_buffer("context", torch.zeros(1, 2 * channels, height, width))
        self.model = copy.deepcopy(prior)
        if mode == "full":
            self.model.requires_grad_(True)
        elif mode == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            if rank < 1:
                raise ValueError(f"lora_rank must be >= 1; got {rank}")
            config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(self.LORA_TARGETS))
            self.model.net = inject_adapter_in_model(config, self.model.net)
            self.model.requires_grad_(False)
            for name, p in self.model.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True)
        else:
            raise ValueError(f"mode must be 'lora' or 'full'; got {mode!r}")
        self.model.train()

    def fit(self, particles: Tensor, generator: torch.Generator) -> float | None:
        if self.head is not None:
            self.context = particle_context(particles).to(self.context.dtype)
        return super().fit(particles, generator)

    def denoiser(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        denoised = self.model.denoiser(x, sigma)
        if self.head is None:
            return denoised
        sigma_b = as_sigma(sigma, x)
        c_in = 1 / (sigma_b**2 + self.sigma_data**2).sqrt()
        c_out = sigma_b * self.sigma_data * c_in
        features = self.feature(x, sigma_b.reshape(-1))
        return denoised + c_out * self.head(c_in * x, sigma_b.log().reshape(-1) / 4, self.context, features)


def particle_context(particles: Tensor) -> Tensor:
    """Per-pixel mean and log standard deviation of the particles, shape ``(1, 2C, H, W)``."""
    x0 = particles.detach()
    spread = x0.std(dim=0, keepdim=True) if x0.shape[0] > 1 else torch.ones_like(x0[:1])
    return torch.cat([x0.mean(dim=0, keepdim=True), spread.clamp_min(1e-6).log()], dim=1)


class _ResidualMLP(nn.Module):
    def __init__(self, dim: int, width: int, feature_dim: int = 0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim + 1 + feature_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x: Tensor, c_noise: Tensor, features: Tensor | None = None) -> Tensor:
        parts = [x.reshape(x.shape[0], -1), c_noise.reshape(-1, 1)] + ([features.reshape(x.shape[0], -1)] if features is not None else [])
        return self.body(torch.cat(parts, dim=1)).reshape(x.shape)


class _ResidualConv(nn.Module):
    """Convolutional residual fed the noisy image, a noise-level map and per-pixel context maps."""

    def __init__(self, channels: int, width: int, context_channels: int, feature_channels: int = 0):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels + 1 + context_channels + feature_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, channels, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: Tensor, c_noise: Tensor, context: Tensor, features: Tensor | None = None) -> Tensor:
        noise_map = c_noise.reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])
        inputs = [x, noise_map, context.expand(x.shape[0], -1, -1, -1)] + ([features] if features is not None else [])
        return self.body(torch.cat(inputs, dim=1))


class LikelihoodFeature:
    """The likelihood's score at the noisy input, scaled for use as a network input.

    ``phi(x, sigma) = sigma g(x) / (1 + sigma^2 L)`` with ``g = -grad_x nll(x, y)`` and ``L`` the
    largest curvature of the nll (power iteration on Hessian-vector products). Take a Gaussian
    prior and a linear operator with ``A A^T = a I``. At noise levels well below the prior's
    scale, the posterior's denoiser then differs from the prior's by about ``sigma phi``, so the
    feature is the shape of the correction that the auxiliary has to learn.
    The gradient stays differentiable in ``x`` when ``x`` requires it, so the particle step's
    gradient includes the feature's dependence on the particles.
    """

    def __init__(self, operator, y: Tensor, curvature: float):
        if not 0 < curvature < math.inf:
            raise ValueError(f"curvature must be positive and finite; got {curvature}")
        self.operator = operator
        self.y = y
        self.curvature = float(curvature)

    @staticmethod
    def estimate_curvature(operator, y: Tensor, x: Tensor, iterations: int = 30, seed: int = 0) -> float:
        """Largest eigenvalue of the Hessian of ``nll(., y)`` at ``x`` (one image), by power iteration."""
        generator = torch.Generator().manual_seed(seed)
        point = x.detach()[:1].clone().requires_grad_(True)
        try:
            (grad,) = torch.autograd.grad(operator.nll(point, y).sum(), point, create_graph=True)
        except RuntimeError as error:
            raise ValueError(f"the likelihood feature needs an operator.nll that torch can differentiate twice in x ({error}); pass aux_feature=False") from error
        v = torch.randn(point.shape, generator=generator, dtype=point.dtype).to(point.device)
        value = 0.0
        for _ in range(iterations):
            v = v / v.norm().clamp_min(1e-30)
            (hv,) = torch.autograd.grad(grad, point, grad_outputs=v, retain_graph=True)
            value = float((hv * v).sum())
            v = hv.detach()
        return abs(value)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma_b = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        with torch.enable_grad():
            point = x if x.requires_grad else x.detach().requires_grad_(True)
            nll = self.operator.nll(point, self.y.expand(x.shape[0], *self.y.shape[1:])).sum()
            (grad,) = torch.autograd.grad(nll, point, create_graph=x.requires_grad)
        return -sigma_b * grad / (1 + sigma_b**2 * self.curvature)


class ResidualAuxiliary(TrainedAuxiliary):
    """The prior's denoiser plus a learned, zero-initialized residual network.

    ``D_phi(x, sigma) = D_p(x, sigma) + c_out(sigma) R(c_in(sigma) x, ln(sigma)/4)`` with EDM's
    ``c_in`` and ``c_out``. ``R`` is an MLP for vector problems (``H = 1``), which takes every
    coordinate as input, and a small convolutional network for images. A convolution cannot
    tell where in the image it is, yet the particles' spread varies from pixel to pixel
    (observed or hidden, in focus or not). So the convolutional residual also receives the
    particles' per-pixel mean and log standard deviation, refreshed at each :meth:`fit`.
    """

    def __init__(self, prior: Prior, event_shape: tuple[int, int, int], proposal: LogUniformSigma, steps: int = 2, lr: float = 1e-3, width: int | None = None, sigma_data: float = 1.0, feature: LikelihoodFeature | None = None):
        super().__init__(proposal, steps, lr, sigma_data)
        self.prior = prior
        self.feature = feature
        channels, height, width_px = event_shape
        self.is_vector = height == 1
        extra = channels if feature is not None else 0
        if self.is_vector:
            self.residual = _ResidualMLP(channels * width_px, width or 256, feature_dim=extra * width_px)
        else:
            self.residual = _ResidualConv(channels, width or 32, context_channels=2 * channels, feature_channels=extra)
        self.register_buffer("context", torch.zeros(1, 2 * channels, height, width_px))
        last = self.residual.body[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.residual.parameters() if p.requires_grad]

    def fit(self, particles: Tensor, generator: torch.Generator) -> float | None:
        if not self.is_vector:
            self.context = particle_context(particles).to(self.context.dtype)
        return super().fit(particles, generator)

    def denoiser(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        sigma_b = as_sigma(sigma, x)
        c_in = 1 / (sigma_b**2 + self.sigma_data**2).sqrt()
        c_out = sigma_b * self.sigma_data * c_in
        # The prior is fixed, so its graph is needed only when gradients must reach x.
        tracking = contextlib.nullcontext() if x.requires_grad else torch.no_grad()
        with tracking:
            prior_denoised = self.prior.denoiser(x, sigma)
        c_noise = sigma_b.log().reshape(-1) / 4
        features = self.feature(x, sigma_b.reshape(-1)) if self.feature is not None else None
        if self.is_vector:
            return prior_denoised + c_out * self.residual(c_in * x, c_noise, features)
        return prior_denoised + c_out * self.residual(c_in * x, c_noise, self.context, features)


def make_auxiliary(
    kind: str,
    prior: Prior,
    event_shape: tuple[int, int, int],
    proposal: LogUniformSigma,
    steps: int,
    lr: float,
    lora_rank: int,
    sigma_data: float | None = None,
    feature: LikelihoodFeature | None = None,
) -> Auxiliary:
    """Build the auxiliary named ``kind`` (one of ``AUX_KINDS``)."""
    if kind == "kde":
        return KernelDensityAuxiliary()
    if kind == "gaussian":
        return GaussianFitAuxiliary()
    if kind in ("lora", "full"):
        if not isinstance(prior, DiffusionPrior):
            raise ValueError(f"aux={kind!r} needs a network prior (DiffusionPrior); for {type(prior).__name__} use aux='residual', 'kde' or 'gaussian'")
        return NetworkAuxiliary(prior, proposal, mode=kind, steps=steps, lr=lr, rank=lora_rank, feature=feature, event_shape=event_shape)
    if kind == "residual":
        sd = sigma_data if sigma_data is not None else getattr(prior, "sigma_data", 1.0)
        return ResidualAuxiliary(prior, event_shape, proposal, steps=steps, lr=lr, sigma_data=sd, feature=feature)
    raise ValueError(f"aux must be one of {AUX_KINDS}; got {kind!r}")


def auxiliary_fit(aux: Auxiliary, prior: Prior, particles: Tensor, proposal: LogUniformSigma, generator: torch.Generator, bands: int = 4, draws: int = 4) -> dict[str, float]:
    """Compare the auxiliary's denoising error on the current particles with the prior's, per noise band.

    For each of ``bands`` log-spaced bands of ``[sigma_min, sigma_max]``, draws ``draws`` fresh
    noisy copies of every particle and returns ``E||D_phi - x0||^2 / E||D_p - x0||^2``. Below 1,
    the auxiliary has learned how the particles differ from the prior at that noise level; 1 means
    it has learned nothing there, and the particle step then gets no entropy force beyond the
    prior's. Values well below 1 are expected wherever the particles differ from the prior:
    at high noise levels through their mean, at noise levels near the posterior's width through
    their spread.
    """
    x0 = particles.detach()
    edges = torch.logspace(math.log10(proposal.sigma_min), math.log10(proposal.sigma_max), bands + 1, dtype=torch.float64)
    result: dict[str, float] = {}
    for low, high in zip(edges[:-1].tolist(), edges[1:].tolist()):
        aux_error = prior_error = 0.0
        for _ in range(draws):
            u = torch.rand(x0.shape[0], generator=generator, dtype=torch.float64)
            sigma = torch.exp(math.log(low) + u * math.log(high / low)).to(x0.dtype).to(x0.device)
            noisy = x0 + sigma.reshape(-1, *([1] * (x0.ndim - 1))) * torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
            with torch.no_grad():
                aux_error += float((aux.denoiser(noisy, sigma) - x0).pow(2).sum())
                prior_error += float((prior.denoiser(noisy, sigma) - x0).pow(2).sum())
        result[f"sigma {low:.3g}-{high:.3g}"] = aux_error / max(prior_error, 1e-300)
    return result
