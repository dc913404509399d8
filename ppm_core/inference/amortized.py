"""Amortized PPM: one generator ``x = f_theta(y, z)`` for every measurement of a forward model.

The generator is trained on measurements alone (no ground truth) with the PPM loss
(:func:`ppm_core.training.amortized.train_amortized`). After that, a posterior sample of a new
measurement costs one forward pass.

Generator. With ``b(y)`` an image-shaped view of the measurement (see
:class:`MeasurementEmbedding`) and ``z ~ N(0, I)`` of the image's shape,

    u = b(y) + sigma_g z,    f_theta(y, z) = D_theta(u, sigma_g) + c_out R_theta(c_in u, c_in b(y), z)

``D_theta`` starts as the prior's denoiser (a trainable copy of a network prior; an analytic
prior stays fixed) and ``R_theta`` is a zero-initialized residual network. At the start a sample
is therefore the prior's one-step denoising of a noisy back-projection of ``y``. ``u`` alone
cannot separate ``y`` from ``z``, so the residual gets both: for a linear-Gaussian problem
``R`` can then express the exact posterior sample ``M y + L z``.

Auxiliary score. The PPM gradient needs the score of the generator's output distribution. Two
forms (option ``aux_condition``):

- ``"measurement"`` (default): ``s_phi(x_sigma, sigma; y)`` takes ``b(y)`` as input, so it learns the score
  of ``q(x | y)`` for each ``y``. The loss is then the average over measurements of the exact
  per-measurement ``KL(q(. | y) || p(. | y))``, whose minimum is the posterior for every ``y``.
- ``"none"``: ``s_phi`` ignores ``y``, as in the Principled Posterior Matching paper. It learns
  the score of the mixture ``q(x) = E_y q(x | y)`` and the loss becomes ``E_y E_q[-log p(y | x)] + KL(q(x) || p(x))``.
  This equals the per-measurement objective minus the mutual information ``I(x; y)`` under
  ``q``, so it rewards samples that depend on ``y`` more than the posterior does. Measured on
  the linear-Gaussian problem (tests and docs/amortized.md), it gives too narrow samples.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..io import atomic_path
from ..priors.base import Prior, as_sigma
from ..priors.network import DiffusionPrior
from .auxiliary import NetworkAuxiliary, TrainedAuxiliary, _ResidualConv
from .common import LogUniformSigma, Posterior

logger = logging.getLogger(__name__)

MODEL_KIND = "ppm-amortized"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "generator.safetensors"
AUX_CONDITIONS = ("measurement", "none")
EMBEDDINGS = ("adjoint", "likelihood-gradient")


class MeasurementEmbedding(nn.Module):
    """``b(y)``: a fixed, image-shaped view of a measurement, linear in ``y`` where possible.

    ``"adjoint"`` (linear operators): ``b(y) = alpha A^T y`` with ``alpha`` the least-squares
    scale that makes ``A b(y)`` closest to ``y`` over the training measurements.
    ``"likelihood-gradient"`` (any differentiable likelihood, such as closure products):
    ``b(y) = -alpha grad_x nll(x_ref, y)`` at a fixed reference image ``x_ref``, with ``alpha``
    making its root-mean-square 1 over the training measurements. ``x_ref`` is 0 in the prior's
    space by default. For closure data it is a compact source, where visibilities do not vanish.
    """

    def __init__(self, operator, kind: str, scale: float, reference: Tensor | None = None):
        super().__init__()
        if kind not in EMBEDDINGS:
            raise ValueError(f"embedding kind must be one of {EMBEDDINGS}; got {kind!r}")
        if kind == "adjoint" and not hasattr(operator, "A_adjoint"):
            raise ValueError("the 'adjoint' embedding needs a linear operator with A_adjoint")
        if not (math.isfinite(scale) and scale != 0):
            raise ValueError(f"embedding scale must be finite and non-zero; got {scale}")
        self.operator = operator
        self.kind = kind
        self.scale = float(scale)
        shape = (1, *operator.in_shape)
        if reference is not None and tuple(reference.shape) != shape:
            raise ValueError(f"the embedding's reference image must have shape {shape}; got {tuple(reference.shape)}")
        self.register_buffer("reference", torch.zeros(shape) if reference is None else reference.detach().clone())

    @classmethod
    def fit(cls, operator, measurements: Tensor, batch: int = 64, reference: Tensor | None = None) -> MeasurementEmbedding:
        """Choose the kind from the operator and the scale from ``measurements`` ``(N, *out_shape)``."""
        kind = "adjoint" if hasattr(operator, "A_adjoint") else "likelihood-gradient"
        embedding = cls(operator, kind, 1.0, reference)
        numerator = denominator = 0.0
        for start in range(0, measurements.shape[0], batch):
            y = measurements[start : start + batch]
            raw = embedding(y)
            if kind == "adjoint":
                with torch.no_grad():
                    forward = operator.A(raw)
                numerator += float((forward * y).sum())
                denominator += float((forward**2).sum())
            else:
                numerator += float(raw.numel())
                denominator += float((raw**2).sum())
        if kind == "adjoint":
            scale = numerator / max(denominator, 1e-30)
        else:
            scale = math.sqrt(numerator / max(denominator, 1e-30))
        if not (math.isfinite(scale) and scale != 0):
            raise ValueError(f"cannot scale the measurement embedding (got {scale}); are the measurements all zero?")
        return cls(operator, kind, scale, reference)

    def forward(self, y: Tensor) -> Tensor:
        if self.kind == "adjoint":
            with torch.no_grad():
                return self.scale * self.operator.A_adjoint(y)
        with torch.enable_grad():
            x_ref = self.reference.to(y.dtype).expand(y.shape[0], *self.operator.in_shape).clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.operator.nll(x_ref, y).sum(), x_ref)
        return -self.scale * grad.detach()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "scale": self.scale}


class _LinearPlusMLP(nn.Module):
    """``W v + MLP(v)`` on flattened inputs; a linear skip lets it express linear maps exactly."""

    def __init__(self, in_dim: int, out_dim: int, width: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, out_dim))
        for layer in (self.linear, self.mlp[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, parts: list[Tensor]) -> Tensor:
        v = torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)
        return self.linear(v) + self.mlp(v)


class _ConditionedResidual(nn.Module):
    """Zero-initialized residual ``R(c_in x, c_noise, condition)``: an MLP for vectors, a CNN for images."""

    def __init__(self, event_shape: tuple[int, int, int], condition_channels: int, width: int | None):
        super().__init__()
        channels, height, width_px = event_shape
        self.is_vector = height == 1
        if self.is_vector:
            d = channels * width_px
            self.body = _LinearPlusMLP(d * (1 + condition_channels // channels) + 1, d, width or 256)
        else:
            self.body = _ResidualConv(channels, width or 32, context_channels=condition_channels)
            nn.init.zeros_(self.body.body[-1].weight)
            nn.init.zeros_(self.body.body[-1].bias)

    def forward(self, x: Tensor, c_noise: Tensor, condition: Tensor | None) -> Tensor:
        if self.is_vector:
            parts = [x, c_noise.reshape(-1, 1)] + ([condition] if condition is not None else [])
            return self.body(parts).reshape(x.shape)
        if condition is None:
            condition = x.new_zeros(x.shape[0], 0, *x.shape[-2:])
        return self.body(x, c_noise, condition)


def _edm_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_in, sigma * sigma_data * c_in


class AmortizedGenerator(nn.Module):
    """``f_theta(y, z) = D_theta(b(y) + sigma_g z, sigma_g) + c_out R_theta(c_in u, c_in b(y), z)``.

    Parameters
    ----------
    prior : Prior
        The diffusion prior; a network prior is copied and trained in full, an analytic prior
        stays fixed and only the residual is trained.
    embedding : MeasurementEmbedding
    event_shape : (C, H, W)
    sigma_g : float
        Noise level at which the copied denoiser is applied; also the scale of ``z`` in ``u``.
    width : int, optional
        Hidden width of the residual (default 32 channels for images, 256 units for vectors).
    """

    def __init__(self, prior: Prior, embedding: MeasurementEmbedding, event_shape: tuple[int, int, int], sigma_g: float = 1.0, width: int | None = None):
        super().__init__()
        if not (math.isfinite(sigma_g) and sigma_g > 0):
            raise ValueError(f"generator_sigma must be positive and finite; got {sigma_g}")
        self.embedding = embedding
        self.event_shape = tuple(int(s) for s in event_shape)
        self.sigma_g = float(sigma_g)
        self.sigma_data = float(getattr(prior, "sigma_data", 1.0))
        self.is_network = isinstance(prior, DiffusionPrior)
        if self.is_network:
            self.base = copy.deepcopy(prior).requires_grad_(True).train()
        else:
            self.base = prior
        channels = self.event_shape[0]
        self.residual = _ConditionedResidual(self.event_shape, 2 * channels, width)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.residual.parameters()).dtype

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.residual.parameters())
        if self.is_network:
            params += list(self.base.net.parameters())
        return params

    def state_tensors(self) -> dict[str, Tensor]:
        """Return the trained weights (and the embedding's reference image) as CPU tensors for safetensors."""
        tensors = {f"residual.{k}": v for k, v in self.residual.state_dict().items()}
        tensors["embedding.reference"] = self.embedding.reference
        if self.is_network:
            tensors |= {f"base.{k}": v for k, v in self.base.net.state_dict().items()}
        return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        residual = {k[len("residual.") :]: v for k, v in tensors.items() if k.startswith("residual.")}
        self.residual.load_state_dict(residual, strict=True)
        if "embedding.reference" in tensors:
            if tuple(tensors["embedding.reference"].shape) != tuple(self.embedding.reference.shape):
                raise RuntimeError(f"embedding reference of shape {tuple(tensors['embedding.reference'].shape)}; expected {tuple(self.embedding.reference.shape)}")
            self.embedding.reference.copy_(tensors["embedding.reference"])
        if self.is_network:
            base = {k[len("base.") :]: v for k, v in tensors.items() if k.startswith("base.")}
            self.base.net.load_state_dict(base, strict=True)

    def forward(self, y: Tensor, z: Tensor, b: Tensor | None = None) -> Tensor:
        """Samples for the measurements ``y`` and noise ``z``; ``b``, when given, is ``embedding(y)``."""
        b = (self.embedding(y) if b is None else b).to(z.dtype)
        if tuple(b.shape[1:]) != self.event_shape or b.shape[0] != z.shape[0]:
            raise ValueError(f"z must have shape ({b.shape[0]}, {', '.join(map(str, self.event_shape))}); got {tuple(z.shape)}")
        sigma = torch.full((z.shape[0],), self.sigma_g, dtype=z.dtype, device=z.device)
        sigma_b = as_sigma(sigma, z)
        c_in, c_out = _edm_scalings(sigma_b, self.sigma_data)
        u = b + sigma_b * z
        base = self.base.denoiser(u, sigma)
        condition = torch.cat([c_in * b, z], dim=1)
        return base + c_out * self.residual(c_in * u, sigma_b.log().reshape(-1) / 4, condition)


class ConditionedAuxiliary(TrainedAuxiliary):
    """Auxiliary score of the generator's samples, optionally conditioned on the measurement.

    ``D_phi(x, sigma; y) = D_base(x, sigma) + c_out R_phi(c_in x, ln(sigma)/4, c_in b(y))``. For a
    network prior ``D_base`` is a LoRA copy of the prior; for an analytic prior it is the
    prior itself and only ``R_phi`` learns. ``R_phi`` is zero-initialized, so the auxiliary
    starts equal to the prior. With ``condition=False`` it is not given ``b(y)`` (and for a
    network prior there is no ``R_phi``: the LoRA copy alone, as in the PPM paper).

    :meth:`set_condition` gives the per-sample ``b(y)`` of the batch that :meth:`fit` and
    :meth:`denoiser` see next.
    """

    def __init__(self, prior: Prior, event_shape: tuple[int, int, int], proposal: LogUniformSigma, condition: bool, steps: int = 1, lr: float = 1e-3, lora_rank: int = 8, width: int | None = None):
        sigma_data = float(getattr(prior, "sigma_data", 1.0))
        super().__init__(proposal, steps, lr, sigma_data)
        self.conditioned = bool(condition)
        self.is_network = isinstance(prior, DiffusionPrior)
        self._condition: Tensor | None = None
        if self.is_network:
            self.base: nn.Module | Prior = NetworkAuxiliary(prior, proposal, mode="lora", steps=steps, lr=lr, rank=lora_rank)
        else:
            self.base = prior
        channels = event_shape[0]
        needs_residual = self.conditioned or not self.is_network
        self.residual = _ConditionedResidual(tuple(event_shape), channels if self.conditioned else 0, width) if needs_residual else None

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.residual.parameters() if p.requires_grad] if self.residual is not None else []
        if self.is_network:
            params += self.base.trainable_parameters()
        return params

    def set_condition(self, condition: Tensor | None) -> None:
        self._condition = None if condition is None else condition.detach()

    def denoiser(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        denoised = self.base.denoiser(x, sigma)
        if self.residual is None:
            return denoised
        sigma_b = as_sigma(sigma, x)
        c_in, c_out = _edm_scalings(sigma_b, self.sigma_data)
        condition = None
        if self.conditioned:
            if self._condition is None or self._condition.shape[0] != x.shape[0]:
                raise RuntimeError("ConditionedAuxiliary.set_condition must be given the batch's b(y) before denoiser")
            condition = c_in * self._condition.to(x.dtype)
        return denoised + c_out * self.residual(c_in * x, sigma_b.log().reshape(-1) / 4, condition)


class AmortizedModel(nn.Module):
    """A trained generator with its measurement embedding: draws posterior samples in one pass.

    Use :func:`load_amortized` to read one from disk and :meth:`sample` to draw samples.
    """

    def __init__(self, generator: AmortizedGenerator, config: dict[str, Any]):
        super().__init__()
        self.generator = generator.eval()
        self.config = dict(config)

    @property
    def operator(self):
        return self.generator.embedding.operator

    def sample(self, y: Tensor, n_samples: int = 8, seed: int = 0, batch_size: int = 64) -> Posterior:
        """Posterior samples for one measurement ``y``, shape ``(n_samples, C, H, W)``."""
        from .common import prepare_measurement

        y = prepare_measurement(y, self.operator)
        samples = self.sample_many(y, n_samples, seed, batch_size)[0]
        return Posterior(samples, {}, "ppm-amortized", {"model": self.config.get("description", {})})

    def sample_many(self, ys: Tensor, n_samples: int = 8, seed: int = 0, batch_size: int = 64) -> Tensor:
        """Samples for each of the measurements ``ys`` ``(B, *out_shape)``, shape ``(B, n_samples, C, H, W)``.

        The generator runs on batches of ``batch_size`` (measurement, noise) pairs.
        """
        from .api import _is_int

        if not _is_int(n_samples) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer; got {n_samples!r}")
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        out_shape = tuple(self.operator.out_shape)
        if not isinstance(ys, Tensor) or ys.ndim != len(out_shape) + 1 or tuple(ys.shape[1:]) != out_shape:
            raise ValueError(f"measurements must have shape (B, {', '.join(map(str, out_shape))}); got {tuple(getattr(ys, 'shape', ()))}")
        if not bool(torch.isfinite(ys).all()):
            raise ValueError("the measurements contain NaN or infinite values")
        dtype = self.generator.dtype
        device = next(self.generator.residual.parameters()).device
        ys = ys.to(dtype=dtype, device=device)
        generator = torch.Generator().manual_seed(int(seed))
        z = torch.randn((ys.shape[0], n_samples, *self.generator.event_shape), generator=generator, dtype=dtype)
        pairs_y = ys.repeat_interleave(n_samples, dim=0)
        pairs_z = z.reshape(-1, *self.generator.event_shape).to(device)
        chunks = []
        with torch.no_grad():
            for start in range(0, pairs_y.shape[0], batch_size):
                chunks.append(self.generator(pairs_y[start : start + batch_size], pairs_z[start : start + batch_size]))
        samples = torch.cat(chunks).reshape(ys.shape[0], n_samples, *self.generator.event_shape)
        if not bool(torch.isfinite(samples).all()):
            raise FloatingPointError("the amortized generator returned NaN or infinite values for these measurements")
        return samples


def save_amortized(directory: str | os.PathLike, generator: AmortizedGenerator, config: dict[str, Any]) -> Path:
    """Write ``generator.safetensors`` and ``config.json`` into ``directory``, each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(generator.state_tensors(), str(tmp), metadata={"format": "pt"})
    with atomic_path(directory / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_amortized_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check the JSON config of an amortized model folder."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"amortized model folder not found: {directory}")
    if not path.is_file():
        raise FileNotFoundError(f"amortized model config not found: {path} (a model is a folder with {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"amortized model config {path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("kind") != MODEL_KIND:
        found = config.get("kind") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path} is not an amortized model config (kind must be {MODEL_KIND!r}; got {found!r}); "
                         "give the folder written by train-amortized (a diffusion prior folder goes to --prior)")
    return config


def load_amortized(directory: str | os.PathLike, operator, prior: Prior | None = None, device: str | torch.device = "cpu") -> AmortizedModel:
    """Load an amortized model for ``operator`` (the forward model of the new measurements).

    The generator of a network prior is rebuilt from the architecture stored in the config, so
    ``prior`` is needed only for models trained on an analytic prior. The operator must have
    the image and measurement shapes the model was trained with. Weights are read with
    safetensors.
    """
    directory = Path(directory)
    config = read_amortized_config(directory)
    try:
        in_shape, out_shape = tuple(config["in_shape"]), tuple(config["out_shape"])
        generator_config = config["generator"]
        embedding_config = config["embedding"]
    except KeyError as exc:
        raise ValueError(f"amortized model config in {directory} lacks {exc}") from exc
    if tuple(operator.in_shape) != in_shape or tuple(operator.out_shape) != out_shape:
        raise ValueError(f"the model was trained for images of shape {in_shape} and measurements of shape {out_shape}; "
                         f"this operator maps {tuple(operator.in_shape)} to {tuple(operator.out_shape)}")
    if config.get("prior", {}).get("kind") == "edm-unet":
        prior = DiffusionPrior.from_config(config["prior"])
    elif prior is None:
        raise ValueError(f"the model in {directory} was trained on an analytic prior; pass that prior to load_amortized")
    embedding = MeasurementEmbedding(operator, embedding_config["kind"], float(embedding_config["scale"]))
    generator = AmortizedGenerator(prior, embedding, in_shape, generator_config["sigma"], generator_config.get("width"))
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"amortized model weights not found: {weights}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"amortized model weights {weights} are corrupt or not a safetensors file: {exc}") from exc
    # The weights' own dtype (float32 for network priors, the analytic prior's otherwise), set before loading so no digit is lost.
    dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    generator = generator.to(dtype=dtype)
    try:
        generator.load_state_tensors(tensors)
    except RuntimeError as exc:
        raise ValueError(f"amortized model weights {weights} do not match its config: {exc}") from exc
    non_finite = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if non_finite:
        raise ValueError(f"amortized model weights {weights} contain NaN or infinite values in {non_finite[:3]}")
    generator = generator.to(device=device).requires_grad_(False)
    if generator.is_network:
        generator.base.eval()
    logger.info("loaded amortized model from %s (trained %s steps)", directory, config.get("trained_steps"))
    return AmortizedModel(generator, config)
