"""Fixtures shared by the test modules."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests with one intra-op thread.

    On a 2-core machine, two OpenMP threads slow torch about 15x whenever another process keeps
    one core busy: the loss test took 145 s instead of 9.5 s. On an idle machine one thread is
    about 1.2x slower than two (measured on 2 AMD EPYC cores with torch 2.13).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_prior(tmp_path_factory) -> Path:
    """Save an untrained small network prior: enough to exercise a pipeline, not to judge quality."""
    from ppm_core.priors import DiffusionPrior, UNetConfig

    torch.manual_seed(0)
    config = UNetConfig(base_channels=8, channel_mults=[1, 2], blocks_per_level=1, embedding_dim=16, patch_size=2)
    prior = DiffusionPrior(config, sigma_data=0.5, normalization={"method": "percentile", "low": 0.1, "high": 99.9})
    path = tmp_path_factory.mktemp("prior") / "tiny"
    prior.save(path)
    return path
