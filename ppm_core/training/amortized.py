"""Training an amortized generator with the PPM loss: checkpoints, resume and DDP.

Each step draws a batch of measurements ``y_i`` (no ground truth), one sample
``x_i = f_theta(y_i, z_i)`` for each, fits the auxiliary score to the batch by denoising score
matching (``aux_steps`` Adam steps), then takes one Adam step of the generator on

    mean_i [ data_weight * nll(x_i, y_i) + w(sigma_i) / pi(sigma_i) * L_sigma(x_i) ]

with ``L_sigma`` the PPM surrogate (``objective="ppm"``) or the IKL / DAVI term
(``objective="ikl"``, no network Jacobian; a biased baseline). See
:mod:`ppm_core.inference.amortized` for the generator and the two forms of the auxiliary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..inference.amortized import (
    AUX_CONDITIONS,
    FORMAT_VERSION,
    MODEL_KIND,
    WEIGHTS_NAME,
    AmortizedGenerator,
    AmortizedModel,
    ConditionedAuxiliary,
    MeasurementEmbedding,
    read_amortized_config,
    save_amortized,
)
from ..inference.baselines import ikl_prior_term
from ..inference.common import LogUniformSigma, weighting
from ..inference.ppm import ppm_prior_term
from ..io import atomic_path
from ..priors.base import Prior
from ..priors.network import DiffusionPrior
from .train import _distributed_context, step_generator, stop_requested

logger = logging.getLogger(__name__)

STATE_DIR = "training_state"
OBJECTIVES = ("ppm", "ikl")


@dataclass
class AmortizedConfig:
    """Settings of :func:`train_amortized`; stored in the model's config."""

    steps: int = 2000  # generator steps in total (a resumed run continues up to this number)
    batch_size: int = 16  # measurements per step, summed over all DDP processes
    lr: float = 1e-4  # Adam learning rate of the generator
    warmup_steps: int = 50  # linear learning-rate warm-up of the generator
    lr_milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of steps where the generator's lr is multiplied by lr_gamma
    lr_gamma: float = 0.3
    objective: str = "ppm"  # "ppm" (exact gradient) or "ikl" (DAVI's, biased)
    aux_condition: str = "measurement"  # "measurement": the exact per-y KL; "none": the marginal form of the PPM paper
    aux_steps: int = 2  # auxiliary DSM steps per generator step (2 widened the microscopy samples, 4 did not add to that)
    aux_lr: float = 2e-3  # AdamW learning rate of the auxiliary
    lora_rank: int = 8  # LoRA rank of the auxiliary's copy of a network prior
    generator_sigma: float = 1.0  # noise level at which the generator applies the copied denoiser
    residual_width: int | None = None  # hidden width of the residual networks (default per shape)
    sigma_min: float = 0.01  # noise-level range of the PPM integral
    sigma_max: float = 20.0
    data_weight: float = 1.0  # 1 targets p(x | y)
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0

    def validate(self, world_size: int) -> None:
        for name in ("steps", "batch_size", "aux_steps", "checkpoint_every", "log_every", "lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer; got {self.warmup_steps!r}")
        for name in ("lr", "aux_lr", "generator_sigma", "data_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number; got {value!r}")
        if not all(isinstance(m, (int, float)) and 0 < m < 1 for m in self.lr_milestones):
            raise ValueError(f"lr_milestones must be fractions of the steps in (0, 1); got {self.lr_milestones!r}")
        if not 0 < self.lr_gamma <= 1:
            raise ValueError(f"lr_gamma must be in (0, 1]; got {self.lr_gamma!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}; got {self.objective!r}")
        if self.aux_condition not in AUX_CONDITIONS:
            raise ValueError(f"aux_condition must be one of {AUX_CONDITIONS}; got {self.aux_condition!r}")
        LogUniformSigma(self.sigma_min, self.sigma_max)  # raises for a bad range
        if self.batch_size % world_size:
            raise ValueError(f"batch_size must be a multiple of the number of processes ({world_size}); got {self.batch_size}")


def check_measurements(measurements: Tensor, operator) -> Tensor:
    """Validate a training set ``(N, *operator.out_shape)`` and return it."""
    if not isinstance(measurements, Tensor):
        raise TypeError(f"measurements must be a torch.Tensor; got {type(measurements).__name__}")
    out_shape = tuple(operator.out_shape)
    if measurements.ndim != len(out_shape) + 1 or tuple(measurements.shape[1:]) != out_shape or measurements.shape[0] < 1:
        raise ValueError(f"measurements must have shape (N, {', '.join(map(str, out_shape))}) with N >= 1 to match the operator; "
                         f"got {tuple(measurements.shape)}")
    if not measurements.is_floating_point():
        raise TypeError(f"measurements must have a floating dtype; got {measurements.dtype}")
    if not bool(torch.isfinite(measurements).all()):
        bad = int((~torch.isfinite(measurements)).flatten(1).any(1).sum())
        raise ValueError(f"measurements contain NaN or infinite values ({bad} of {measurements.shape[0]} measurements)")
    return measurements


def _flat_average(tensors: list[Tensor], world_size: int) -> None:
    """Average ``tensors`` in place across processes with one all-reduce."""
    if world_size <= 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].reshape(t.shape))
        offset += t.numel()


def _average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _flat_average([p.grad for p in params], world_size)


def _optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, Tensor], list]:
    state = optimizer.state_dict()
    tensors = {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            tensors[f"{prefix}.{index}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    return tensors, state["param_groups"]


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], prefix: str, groups: list) -> None:
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


def _aux_tensors(aux: ConditionedAuxiliary) -> dict[str, Tensor]:
    trainable = {id(p) for p in aux.trainable_parameters()}
    return {f"aux.{name}": p.detach().contiguous().cpu() for name, p in aux.named_parameters() if id(p) in trainable}


def train_amortized(
    measurements: Tensor,
    operator,
    prior: Prior,
    out_dir: str | os.PathLike,
    config: AmortizedConfig | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    callback: Callable[[dict], bool | None] | None = None,
    description: dict[str, Any] | None = None,
    reference: Tensor | None = None,
) -> AmortizedModel:
    """Train a generator ``x = f_theta(y, z)`` on ``measurements`` and save it to ``out_dir``.

    Under ``torchrun --nproc_per_node=K`` each process draws ``batch_size / K`` measurements per
    step. The gradients of the generator and of the auxiliary are averaged over processes (gloo
    on CPU, nccl on GPU), so every process has the same weights. Only rank 0 writes.

    Parameters
    ----------
    measurements : (N, *operator.out_shape) tensor
        The training set: measurements of one forward model, in the prior's units.
    operator : Operator
        Forward model with its likelihood; ``operator.nll(x, y)`` must accept a batch of ``y``.
    prior : Prior
        Diffusion prior; the generator starts from its denoiser.
    out_dir : path
        Model folder: ``generator.safetensors`` and ``config.json`` form the model;
        ``training_state/`` contains what ``resume`` needs.
    config : AmortizedConfig
        ``aux_condition="measurement"`` trains the auxiliary on ``(x, b(y))`` pairs and targets
        the posterior of every ``y``; ``"none"`` is the paper's marginal form (see
        :mod:`ppm_core.inference.amortized` for what it targets instead).
    callback : callable, optional
        Called after every step with ``{"step", "steps", "loss", "data term", "prior term",
        "auxiliary loss"}``; returning ``True`` stops training after a checkpoint is written.
    description : dict, optional
        What the measurements are (forward model, source, units), stored in the config.
    reference : (1, *operator.in_shape) tensor, optional
        Reference image of the likelihood-gradient embedding (operators without an adjoint);
        see :class:`~ppm_core.inference.amortized.MeasurementEmbedding`.

    Returns
    -------
    AmortizedModel
        The trained generator; ``model.history`` contains the per-step losses of this run.
    """
    config = config or AmortizedConfig()
    device = torch.device(device)
    rank, world_size = _distributed_context(device)
    config.validate(world_size)
    measurements = check_measurements(measurements, operator)
    if prior.event_shape is not None and tuple(prior.event_shape) != tuple(operator.in_shape):
        raise ValueError(f"the prior is defined on images of shape {tuple(prior.event_shape)} but the operator's in_shape is {tuple(operator.in_shape)}")
    channels = getattr(prior, "in_channels", operator.in_shape[0])
    if channels != operator.in_shape[0]:
        raise ValueError(f"the prior models images with {channels} channel(s) but the operator's images have {operator.in_shape[0]}")
    out_dir = Path(out_dir)
    dtype = prior.dtype if not isinstance(prior, DiffusionPrior) else torch.float32
    measurements = measurements.to(dtype)
    local_batch = config.batch_size // world_size
    event_shape = tuple(int(s) for s in operator.in_shape)

    # What the model is trained on; a resumed run must match it.
    problem = json.loads(json.dumps({
        "in_shape": list(event_shape),
        "out_shape": [int(s) for s in operator.out_shape],
        "prior": prior.config_dict() if isinstance(prior, DiffusionPrior) else {"kind": type(prior).__name__},
        "measurements": int(measurements.shape[0]),
        "description": dict(description or {}),
    }, default=str))

    # Every process builds the same networks from the same seed.
    torch.manual_seed(config.seed)
    if resume:
        stored = read_amortized_config(out_dir)
        _check_resumable(stored, problem, config, out_dir)
        embedding = MeasurementEmbedding(operator, stored["embedding"]["kind"], float(stored["embedding"]["scale"]))
    elif (out_dir / "config.json").exists():
        raise ValueError(f"{out_dir} already contains a model; pass resume=True (--resume) to continue training it, or choose another folder")
    else:
        embedding = MeasurementEmbedding.fit(operator, measurements, reference=None if reference is None else reference.to(dtype))
    generator = AmortizedGenerator(prior, embedding, event_shape, config.generator_sigma, config.residual_width).to(device=device, dtype=dtype)
    proposal = LogUniformSigma(config.sigma_min, config.sigma_max)
    aux = ConditionedAuxiliary(prior, event_shape, proposal, config.aux_condition == "measurement", config.aux_steps, config.aux_lr,
                               config.lora_rank, config.residual_width).to(device=device, dtype=dtype)
    generator_params = generator.trainable_parameters()
    optimizer = torch.optim.Adam(generator_params, lr=config.lr)
    aux_optimizer = aux.optimizer()
    if config.objective == "ikl":
        prior_term = ikl_prior_term(prior, aux, proposal, 1.0)
    else:
        prior_term = ppm_prior_term(prior, aux, proposal, weighting("kl"), "l2", 1.0, False)

    start_step = 0
    if resume:
        start_step = _load_state(out_dir, generator, aux, optimizer, aux_optimizer)
        logger.info("resumed amortized training from %s at step %d", out_dir, start_step)

    model_config: dict[str, Any] = {
        "kind": MODEL_KIND,
        "format_version": FORMAT_VERSION,
        "generator": {"sigma": config.generator_sigma, "width": config.residual_width},
        "embedding": embedding.to_dict(),
        "training": asdict(config) | {"lr_milestones": list(config.lr_milestones), "world_size": world_size},
    } | problem

    def checkpoint(step: int, loss: float) -> None:
        if rank == 0:
            save_amortized(out_dir, generator, model_config | {"trained_steps": step, "final_loss": loss})
            _save_state(out_dir, aux, optimizer, aux_optimizer, step)
            logger.info("checkpoint at step %d written to %s", step, out_dir)
        if world_size > 1:
            dist.barrier()

    history: dict[str, list[float]] = {}
    loss_value = float("nan")
    step = start_step
    started = time.perf_counter()
    while step < config.steps:
        rng = step_generator(config.seed, rank, step)
        index = torch.randint(measurements.shape[0], (local_batch,), generator=rng)
        y = measurements[index].to(device)
        z = torch.randn((local_batch, *event_shape), generator=rng, dtype=dtype).to(device)
        b = generator.embedding(y).to(dtype)
        x = generator(y, z, b)
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(f"amortized training: the generator's samples became NaN or infinite at step {step + 1}; "
                                     f"lower lr (now {config.lr})")
        if config.aux_condition == "measurement":
            aux.set_condition(b)

        # Stage 1: the auxiliary's denoising score matching on this batch.
        aux_loss = aux.fit(x.detach(), rng, lambda params: _average_gradients(params, world_size))

        # Stage 2: one generator step with the auxiliary frozen.
        with aux.frozen():
            prior_value, _ = prior_term(x, step, rng)
        data_value = operator.nll(x, y)
        loss = (config.data_weight * data_value + prior_value).mean()
        decay = config.lr_gamma ** sum(step >= round(m * config.steps) for m in config.lr_milestones)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * decay * min(1.0, (step + 1) / max(config.warmup_steps, 1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _average_gradients(generator_params, world_size)
        optimizer.step()
        step += 1

        terms = torch.stack([loss.detach(), data_value.detach().mean(), prior_value.detach().mean(), torch.tensor(aux_loss, dtype=loss.dtype, device=loss.device)])
        _flat_average([terms], world_size)
        values = dict(zip(("loss", "data term", "prior term", "auxiliary loss"), (float(v) for v in terms)))
        if not all(math.isfinite(v) for v in values.values()):
            bad = next(k for k, v in values.items() if not math.isfinite(v))
            raise FloatingPointError(f"amortized training: {bad} became NaN or infinite at step {step}; lower lr (now {config.lr}) or aux_lr")
        for name, value in values.items():
            history.setdefault(name, []).append(value)
        loss_value = values["loss"]
        if step % config.log_every == 0 and rank == 0:
            logger.info("step %d/%d loss %.4g (data %.4g, prior %.4g, aux %.4g), %.2f s/step", step, config.steps, loss_value,
                        values["data term"], values["prior term"], values["auxiliary loss"], (time.perf_counter() - started) / (step - start_step))
        stop = stop_requested(callback, {"step": step, "steps": config.steps} | values, world_size, device)
        if step % config.checkpoint_every == 0 or step == config.steps or stop:
            checkpoint(step, loss_value)
        if stop:
            logger.info("amortized training stopped at step %d on request", step)
            break

    if world_size > 1:
        flat = torch.cat([p.detach().reshape(-1) for p in generator_params])
        rank0 = flat.clone()
        dist.broadcast(rank0, src=0)
        if float((flat - rank0).abs().max()) != 0.0:
            raise RuntimeError(f"DDP generator weights diverged across processes on rank {rank}")
    generator.requires_grad_(False).eval()
    model = AmortizedModel(generator, model_config | {"trained_steps": step, "final_loss": loss_value})
    model.history = history
    return model


def _check_resumable(stored: dict[str, Any], problem: dict[str, Any], config: AmortizedConfig, out_dir: Path) -> None:
    """Raise ``ValueError`` unless ``config`` and the training problem match the model being resumed."""
    fixed = ("objective", "aux_condition", "generator_sigma", "residual_width", "lora_rank")
    training = stored.get("training", {})
    changed = [f"{name} ({training.get(name)!r} -> {getattr(config, name)!r})" for name in fixed if training.get(name) != getattr(config, name)]
    if changed:
        raise ValueError(f"cannot resume {out_dir} with other settings of the networks or the loss: {', '.join(changed)}")
    different = [key for key in problem if _comparable(stored.get(key)) != _comparable(problem[key])]
    if different:
        details = "; ".join(f"{key}: {_differences(stored.get(key), problem[key])}" for key in different)
        raise ValueError(f"cannot resume {out_dir}: the training data or the forward model differ from the model's ({details}). "
                         "Resume with the same data and settings, or train a new model in another folder")
    trained = int(stored.get("trained_steps") or 0)
    if config.steps <= trained:
        raise ValueError(f"{out_dir} is already trained for {trained} steps; pass a larger steps (--steps) to continue")


#: Description entries that name files rather than describe the data; the same data may be given by another path.
PATH_ENTRIES = ("input", "uvfits", "prior_folder", "layer", "psf_source")


def _comparable(value):
    return {k: v for k, v in value.items() if k not in PATH_ENTRIES} if isinstance(value, dict) else value


def _differences(old, new) -> str:
    old, new = _comparable(old), _comparable(new)
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return "differ in " + ", ".join(keys[:5])
    return f"{str(old)[:60]} -> {str(new)[:60]}"


def _save_state(directory: Path, aux: ConditionedAuxiliary, optimizer, aux_optimizer, step: int) -> None:
    state_dir = directory / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = _aux_tensors(aux)
    generator_tensors, generator_groups = _optimizer_tensors(optimizer, "optimizer")
    aux_tensors, aux_groups = _optimizer_tensors(aux_optimizer, "aux_optimizer")
    with atomic_path(state_dir / "state.safetensors") as tmp:
        save_file(tensors | generator_tensors | aux_tensors, str(tmp))
    scalars = {"step": step, "optimizer_groups": generator_groups, "aux_optimizer_groups": aux_groups}
    with atomic_path(state_dir / "state.json") as tmp:
        tmp.write_text(json.dumps(scalars, indent=2) + "\n")


def _load_state(directory: Path, generator: AmortizedGenerator, aux: ConditionedAuxiliary, optimizer, aux_optimizer) -> int:
    state_dir = directory / STATE_DIR
    if not (state_dir / "state.json").is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"cannot resume: no amortized training state in {directory}")
    try:
        scalars = json.loads((state_dir / "state.json").read_text())
        step = int(scalars["step"])
        generator_tensors = load_file(str(directory / WEIGHTS_NAME))
        tensors = load_file(str(state_dir / "state.safetensors"))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise ValueError(f"cannot resume: the training state in {directory} is corrupt or incomplete ({exc!r})") from exc
    trained = read_amortized_config(directory).get("trained_steps")
    if trained != step:
        raise ValueError(f"cannot resume: {WEIGHTS_NAME} is from step {trained} but {STATE_DIR}/state.json from step {step} "
                         "(an interrupted checkpoint); train a new model")
    try:
        generator.load_state_tensors(generator_tensors)
    except RuntimeError as exc:
        raise ValueError(f"cannot resume: {directory / WEIGHTS_NAME} does not match the generator ({exc})") from exc
    named = dict(aux.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("aux."):
                name = key[len("aux.") :]
                if name not in named:
                    raise ValueError(f"cannot resume: the training state has auxiliary weight {name!r} that this configuration lacks")
                named[name].copy_(value)
    _load_optimizer(optimizer, tensors, "optimizer", scalars["optimizer_groups"])
    _load_optimizer(aux_optimizer, tensors, "aux_optimizer", scalars["aux_optimizer_groups"])
    return step
