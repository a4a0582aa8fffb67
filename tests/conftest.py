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


def _digits_splits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """load_digits as (N, 1, 8, 8) in [0, 1], stratified 75/25: x_train, y_train, x_test, y_test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.25, random_state=0,
                                           stratify=digits.target)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
           adamw: bool) -> nn.Module:
    """Train with one-cycle Adam(W), batch 64, fixed seeds, one thread; returns it in eval mode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny layers: one thread is faster and immune to busy neighbours
    try:
        batch = 64
        opt = (torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01) if adamw
               else torch.optim.Adam(model.parameters(), lr=lr))
        steps = epochs * ((len(x) + batch - 1) // batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        g = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(perm), batch):
                b = perm[i:i + batch]
                opt.zero_grad()
                F.cross_entropy(model(x[b]), y[b]).backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="session")
def digits_cnn() -> DigitsSetup:
    """scikit-learn's load_digits (8x8, scaled to [0, 1]; upsampling to 16x16 did not help), a
    stratified 75/25 split, and a DigitsCNN trained once per session (fixed seeds, one thread,
    a few seconds on CPU)."""
    x_train, y_train, x_test, y_test = _digits_splits()

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = _train(DigitsCNN(), x_train, y_train, epochs=15, lr=1e-2, adamw=False)
    return DigitsSetup(model, x_train, y_train, x_test, y_test,
                       accuracy(model, x_test, y_test), time.perf_counter() - t0)


@pytest.fixture(scope="session")
def digits_vit() -> DigitsSetup:
    """A small torchvision VisionTransformer (8x8 input, 2x2 patches, 2 encoder blocks of width
    48 with 2 heads, MLP 96) trained once per session on the digits splits of :func:`digits_cnn`, the
    grey image repeated on 3 channels (a few seconds on CPU)."""
    import torchvision

    x_train, y_train, x_test, y_test = _digits_splits()
    x_train, x_test = (t.expand(-1, 3, -1, -1).contiguous() for t in (x_train, x_test))
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=8, patch_size=2, num_layers=2,
                                                 num_heads=2, hidden_dim=48, mlp_dim=96,
                                                 num_classes=10)
    model = _train(model, x_train, y_train, epochs=60, lr=3e-3, adamw=True)
    return DigitsSetup(model, x_train, y_train, x_test, y_test,
                       accuracy(model, x_test, y_test), time.perf_counter() - t0)
