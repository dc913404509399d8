"""Train a tiny amortized generator under torchrun and save each process's generator weights.

Run as ``python -m torch.distributed.run --nproc_per_node=2 --standalone tests/ddp_amortized_worker.py OUT``.
Each process writes ``OUT/rank{r}.safetensors`` (its generator after training); rank 0 also
writes ``OUT/rank0_initial.safetensors`` (before training) and the model to ``OUT/model``.
``tests/test_amortized.py`` checks the files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ppm_core.operators import Downsampling
from ppm_core.priors import DiffusionPrior, UNetConfig
from ppm_core.training.amortized import AmortizedConfig, train_amortized


def main(out: Path) -> None:
    torch.manual_seed(0)
    prior = DiffusionPrior(UNetConfig(base_channels=8, channel_mults=[1, 2], blocks_per_level=1, embedding_dim=16), sigma_data=0.5)
    prior.eval().requires_grad_(False)
    operator = Downsampling(2, (1, 16, 16), noise_std=0.1)
    generator = torch.Generator().manual_seed(0)
    ys = operator.simulate(torch.randn(16, 1, 16, 16, generator=generator) * 0.5, generator=generator)
    initial = {f"base.{k}": v.detach().clone().contiguous() for k, v in prior.net.state_dict().items()}
    model = train_amortized(ys, operator, prior, out / "model", AmortizedConfig(steps=4, batch_size=4, lr=1e-3, log_every=1))
    weights = model.generator.state_tensors()
    save_file(weights, str(out / f"rank{dist.get_rank()}.safetensors"))
    if dist.get_rank() == 0:
        save_file(initial, str(out / "rank0_initial.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
