"""Denoising score matching for network priors: EMA, checkpoints, resume and DDP."""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ..io import atomic_path
from ..priors.network import DiffusionPrior, load_prior
from ..priors.unet import UNetConfig
from .data import ImageSource, estimate_sigma_data

logger = logging.getLogger(__name__)

STATE_DIR = "training_state"


@dataclass
class TrainConfig:
    """Settings of :func:`train_prior`; stored in the checkpoint config."""

    steps: int = 20000  # optimizer steps in total (a resumed run continues up to this number)
    batch_size: int = 16  # images per step, summed over all DDP processes
    crop_size: int = 64  # side of the square training crops, pixels
    lr: float = 5e-4  # Adam learning rate after warm-up
    warmup_steps: int = 200  # linear learning-rate warm-up
    ema_halflife: float = 500.0  # EMA half-life, optimizer steps
    p_mean: float = -1.2  # mean of log(sigma) in training (EDM)
    p_std: float = 1.2  # standard deviation of log(sigma) in training (EDM)
    checkpoint_every: int = 1000  # steps between checkpoints (and at the end)
    log_every: int = 50  # steps between loss log lines
    seed: int = 0

    def validate(self, world_size: int) -> None:
        for name in ("steps", "batch_size", "crop_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not self.lr > 0 or self.lr == float("inf"):
            raise ValueError(f"lr must be a positive finite number; got {self.lr}")
        if not self.ema_halflife > 0:
            raise ValueError(f"ema_halflife must be positive; got {self.ema_halflife}")
        if self.batch_size % world_size:
            raise ValueError(f"batch_size must be a multiple of the number of processes ({world_size}); got {self.batch_size}")


def edm_loss(prior: torch.nn.Module, x0: Tensor, sigma: Tensor, eps: Tensor, sigma_data: float) -> Tensor:
    """EDM-weighted denoising loss ``lambda(sigma) ||D(x0 + sigma eps, sigma) - x0||^2``, mean over pixels.

    ``prior`` is called as ``prior(x, sigma)`` so that a DDP wrapper can sit around it.
    """
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    denoised = prior(x0 + sigma.reshape(-1, 1, 1, 1) * eps, sigma)
    return (weight.reshape(-1, 1, 1, 1) * (denoised - x0) ** 2).mean()


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """Random stream of one process at one step, so a resumed run draws what an unbroken run would."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + step) % (2**63))


def stop_requested(callback: Callable[[dict], bool | None] | None, state: dict, world_size: int, device: torch.device) -> bool:
    """Send ``state`` to the callback and return whether it requests a stop.

    Under DDP a stop requested on any process stops all of them, so no process waits in a collective.
    """
    stop = bool(callback(state)) if callback else False
    if world_size > 1:
        flag = torch.tensor(float(stop), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag)
    return stop


def _distributed_context(device: torch.device) -> tuple[int, int]:
    """Initialize torch.distributed when launched by torchrun; return ``(rank, world_size)``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        logger.info("initialized %s process group: rank %d of %d", backend, dist.get_rank(), world_size)
    return dist.get_rank(), dist.get_world_size()


def _save_training_state(directory: Path, prior: DiffusionPrior, optimizer: torch.optim.Optimizer, step: int, extra: dict) -> None:
    """Write raw weights and Adam moments as safetensors plus a JSON of scalars."""
    state_dir = directory / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().contiguous().cpu() for k, v in prior.net.state_dict().items()}
    optim_state = optimizer.state_dict()
    for index, param_state in optim_state["state"].items():
        for key, value in param_state.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    with atomic_path(state_dir / "state.safetensors") as tmp:
        save_file(tensors, str(tmp))
    scalars = {"step": step, "param_groups": optim_state["param_groups"]} | extra
    with atomic_path(state_dir / "state.json") as tmp:
        tmp.write_text(json.dumps(scalars, indent=2) + "\n")


def _load_training_state(directory: Path, prior: DiffusionPrior, optimizer: torch.optim.Optimizer) -> dict:
    state_dir = directory / STATE_DIR
    if not (state_dir / "state.json").is_file():
        raise FileNotFoundError(f"cannot resume: no training state in {state_dir}")
    scalars = json.loads((state_dir / "state.json").read_text())
    tensors = load_file(str(state_dir / "state.safetensors"))
    prior.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True)
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": scalars["param_groups"]})
    return scalars


def _check_ranks_agree(prior: DiffusionPrior) -> None:
    """Raise if the weights of this process differ from those of rank 0."""
    flat = torch.cat([p.detach().reshape(-1) for p in prior.net.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    difference = float((flat - reference).abs().max())
    if difference != 0.0:
        raise RuntimeError(f"DDP weights diverged across processes: max difference {difference:.3g} on rank {dist.get_rank()}")


def train_prior(
    source: ImageSource,
    out_dir: str | os.PathLike,
    unet_config: UNetConfig | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    callback: Callable[[dict], bool | None] | None = None,
) -> DiffusionPrior:
    """Train a :class:`DiffusionPrior` by denoising score matching and save it to ``out_dir``.

    Under ``torchrun --nproc_per_node=K`` each process draws ``batch_size / K`` images and
    gradients are averaged by DDP (gloo on CPU, nccl on GPU); only rank 0 writes files.

    Parameters
    ----------
    source : ImageSource
        Training images (a folder or a synthetic generator).
    out_dir : path
        Checkpoint folder: ``model.safetensors`` (EMA weights) and ``config.json`` form the
        prior; ``training_state/`` contains what ``resume`` needs.
    callback : callable, optional
        Called after every step with ``{"step", "steps", "loss", "lr"}``; returning ``True``
        stops training after a checkpoint is written.

    Returns
    -------
    DiffusionPrior
        The EMA prior, in eval mode.
    """
    return _train(source, Path(out_dir), unet_config, config or TrainConfig(), resume, torch.device(device), callback)


def _train(
    source: ImageSource,
    out_dir: Path,
    unet_config: UNetConfig | None,
    config: TrainConfig,
    resume: bool,
    device: torch.device,
    callback: Callable[[dict], bool | None] | None,
) -> DiffusionPrior:
    rank, world_size = _distributed_context(device)
    config.validate(world_size)
    local_batch = config.batch_size // world_size

    # Model, EMA copy and optimizer; every rank starts from the same seed.
    torch.manual_seed(config.seed)
    if resume:
        prior = load_prior(out_dir, device=device)
        if unet_config is not None and unet_config != prior.unet_config:
            logger.warning("resume ignores the requested architecture %s; the checkpoint's %s is used", unet_config, prior.unet_config)
        unet_config, sigma_data = prior.unet_config, prior.sigma_data
        latest = prior.data_description.get("resumed_with", prior.data_description)
        if source.describe() != latest:
            logger.warning("resuming on different training data than the checkpoint's (%s); the config records both", str(latest))
            prior.data_description = prior.data_description | {"resumed_with": source.describe()}
        ema = copy.deepcopy(prior)
        prior.requires_grad_(True).train()
    else:
        sigma_data = estimate_sigma_data(source, config.crop_size, seed=config.seed)
        unet_config = unet_config or UNetConfig(in_channels=source.channels)
        if unet_config.in_channels != source.channels:
            raise ValueError(f"in_channels ({unet_config.in_channels}) must match the training images' channels ({source.channels})")
        prior = DiffusionPrior(unet_config, sigma_data, source.normalization, source.describe()).to(device)
        ema = copy.deepcopy(prior).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(prior.net.parameters(), lr=config.lr)
    start_step = 0
    if resume:
        scalars = _load_training_state(out_dir, prior, optimizer)
        start_step = scalars["step"]
        logger.info("resumed from %s at step %d", out_dir, start_step)
    model = DistributedDataParallel(prior) if world_size > 1 else prior
    ema_decay = 0.5 ** (1.0 / config.ema_halflife)
    extra_config = {"training": asdict(config) | {"world_size": world_size}}

    def checkpoint(step: int, loss: float) -> None:
        if rank == 0:
            ema.save(out_dir, extra_config | {"trained_steps": step, "final_loss": loss})
            _save_training_state(out_dir, prior, optimizer, step, {"loss": loss})
            logger.info("checkpoint at step %d written to %s", step, out_dir)
        if world_size > 1:
            dist.barrier()

    loss_value = float("nan")
    step = start_step
    while step < config.steps:
        generator = step_generator(config.seed, rank, step)
        x0 = source.sample(local_batch, config.crop_size, generator).to(device)
        sigma = (torch.randn(local_batch, generator=generator) * config.p_std + config.p_mean).exp().to(device)
        eps = torch.randn(x0.shape, generator=generator).to(device)

        # One Adam step with linear warm-up.
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / max(config.warmup_steps, 1))
        loss = edm_loss(model, x0, sigma, eps, sigma_data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1

        # EMA of the weights; the EMA copy is the prior that ships.
        with torch.no_grad():
            for p_ema, p in zip(ema.net.parameters(), prior.net.parameters()):
                p_ema.lerp_(p, 1 - ema_decay)

        loss_value = float(loss.detach())
        if world_size > 1:
            reduced = loss.detach().clone()
            dist.all_reduce(reduced)
            loss_value = float(reduced) / world_size
        if not torch.isfinite(torch.tensor(loss_value)):
            raise FloatingPointError(f"training loss became {loss_value} at step {step}; lower --lr (now {config.lr})")
        if step % config.log_every == 0 and rank == 0:
            logger.info("step %d/%d loss %.5f", step, config.steps, loss_value)
        stop = stop_requested(callback, {"step": step, "steps": config.steps, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"]},
                              world_size, device)
        if step % config.checkpoint_every == 0 or step == config.steps or stop:
            checkpoint(step, loss_value)
        if stop:
            logger.info("training stopped at step %d on request", step)
            break

    if world_size > 1:
        _check_ranks_agree(prior)
    return ema.eval()
