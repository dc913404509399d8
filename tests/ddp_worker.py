"""Train a tiny prior under torchrun and save each process's initial, raw and EMA weights.

Run as ``python -m torch.distributed.run --nproc_per_node=2 --standalone tests/ddp_worker.py OUT``.
Each process writes ``OUT/rank{r}.safetensors`` with keys ``init.*`` (weights at the first
forward pass), ``raw.*`` (optimized weights after training) and ``ema.*`` (the returned prior);
rank 0 also writes the checkpoint to ``OUT/prior``. ``tests/test_training.py`` checks the files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ppm_core.priors import DiffusionPrior, UNetConfig
from ppm_core.training import SyntheticSource, TrainConfig, train_prior

STEPS = 5


def main(out: Path) -> None:
    # train_prior returns only the EMA prior, so a global forward hook keeps a reference to the
    # trained DiffusionPrior (the only one called in training mode) and copies its initial weights.
    trained: dict[str, object] = {}

    def capture(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if isinstance(module, DiffusionPrior) and module.training and "prior" not in trained:
            trained["prior"] = module
            trained["init"] = {k: v.detach().clone() for k, v in module.net.state_dict().items()}

    handle = torch.nn.modules.module.register_module_forward_hook(capture)
    config = TrainConfig(steps=STEPS, batch_size=4, crop_size=16, lr=1e-3, warmup_steps=1, ema_halflife=2.0, log_every=1)
    unet_config = UNetConfig(base_channels=8, channel_mults=[1, 2], blocks_per_level=1, embedding_dim=32)
    ema = train_prior(SyntheticSource("blobs"), out / "prior", unet_config, config)
    handle.remove()

    tensors = {f"init.{k}": v for k, v in trained["init"].items()}
    tensors |= {f"raw.{k}": v.detach().clone() for k, v in trained["prior"].net.state_dict().items()}
    tensors |= {f"ema.{k}": v.detach().clone() for k, v in ema.net.state_dict().items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"rank{dist.get_rank()}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
