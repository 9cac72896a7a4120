"""Shared test setup."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and immune to OpenMP spin-waiting when other
    processes load the CPU (two threads on a busy 2-core machine ran these tests ~100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
