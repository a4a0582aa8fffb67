"""Small models shared by the tests (and the tools: ``--model tests.models:tiny_cnn``)."""
from __future__ import annotations

import torch
import torch.fx
from torch import nn


class TinyCNN(nn.Module):
    """conv-bn-relu, a residual add, pooling and a linear classifier (8x8 inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = y + self.conv2(y)
        return self.fc(torch.flatten(self.pool(y), 1))


def tiny_cnn() -> nn.Module:
    return TinyCNN()


def tiny_cnn_with_inputs() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A factory may also return (module, example_inputs)."""
    return TinyCNN(), (torch.randn(2, 3, 6, 6),)


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 2))


def not_a_model() -> int:
    return 3


class ReluModel(nn.Module):
    """Two torch.relu calls around an add (the pass-manager tests rewrite them)."""

    def forward(self, x):
        return torch.relu(torch.relu(x) + 1)


def relu_graph() -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(ReluModel())
