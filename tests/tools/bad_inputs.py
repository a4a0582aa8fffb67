"""Model factories a user gets wrong, for tests/tools/test_cli_robustness.py."""
from __future__ import annotations

from torch import nn


def raises() -> nn.Module:
    raise RuntimeError("the factory's own bug")


def needs_args(width: int) -> nn.Module:
    return nn.Linear(width, width)


def exits() -> nn.Module:
    raise SystemExit(3)


def tiny_linear(width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 3), nn.ReLU(), nn.Linear(3, 2))
