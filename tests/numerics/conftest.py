"""Fixtures shared by the numerics tests."""
from __future__ import annotations

import pytest

from qpasses.numerics import native_requant


@pytest.fixture
def native_any_threads(monkeypatch):
    """The compiled kernels step aside for many intra-op threads; with this they run whatever
    the count (tests of the kernels themselves)."""
    monkeypatch.setattr(native_requant, "MAX_THREADS", 1 << 30)
