"""Fixtures shared by the zoo tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on these small inputs threads only add OpenMP/oneDNN start-up and
    spin-wait costs, and the tests share a 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
