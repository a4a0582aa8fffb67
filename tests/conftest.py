"""Session-wide fixtures shared by several test packages."""
from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class DigitsCNN(nn.Module):
    """A small residual CNN for 8x8 digits: conv-bn-relu stem, a stride-2 conv, a residual block
    (so fake-quant sees an add join), global pooling and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(x + self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@dataclass
class DigitsSetup:
    """The fp32 digits model (eval mode; copy before changing it) and its data splits."""
    model: nn.Module
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    fp32_acc: float
    train_seconds: float

    def batches(self, n: int, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``n`` training batches (calibration data: a held-out training subset)."""
        return [(self.x_train[i:i + size], self.y_train[i:i + size])
                for i in range(0, min(n * size, len(self.x_train)), size)]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="session")
def digits_cnn() -> DigitsSetup:
    """scikit-learn's load_digits (8x8, scaled to [0, 1]; upsampling to 16x16 did not help), a
    stratified 75/25 split, and a DigitsCNN trained once per session (fixed seeds, one thread,
    a few seconds on CPU)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.25, random_state=0,
                                           stratify=digits.target)
    x_train, y_train = x[idx_train], y[idx_train]
    x_test, y_test = x[idx_test], y[idx_test]

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread is faster and immune to busy neighbours
    try:
        torch.manual_seed(0)
        model = DigitsCNN()
        epochs, batch = 15, 64
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        steps = epochs * ((len(x_train) + batch - 1) // batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
        g = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x_train), generator=g)
            for i in range(0, len(perm), batch):
                b = perm[i:i + batch]
                opt.zero_grad()
                F.cross_entropy(model(x_train[b]), y_train[b]).backward()
                opt.step()
                sched.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)
    return DigitsSetup(model, x_train, y_train, x_test, y_test,
                       accuracy(model, x_test, y_test), time.perf_counter() - t0)
