"""Fixtures shared by the test modules."""

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
