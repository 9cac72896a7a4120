"""Shared test setup."""
import os

import pytest
import torch

# `metascale meta-train`/`evaluate` default to one process per core (--jobs); the suite's tiny
# runs stay in the calling process unless a test asks for --jobs (tests/test_parallel.py)
os.environ.setdefault("METASCALE_JOBS", "1")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same default generator: torch 2.13 seeds it at random in each
    process, so a test that builds a model without its own seed (``nn.Linear`` draws its
    initialisation from it) would see a new initialisation on every run and could pass or fail
    by chance. Tests that need their own draws still seed their own generators."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and immune to OpenMP spin-waiting when other
    processes load the CPU (two threads on a busy 2-core machine ran these tests ~100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
