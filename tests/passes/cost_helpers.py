"""Models and helpers shared by the cost / budget / MixQuant tests."""
from __future__ import annotations

import functools

import torch
import torchvision
from torch import nn

import qpasses
from passes_registry import PassManager


class MobileNetV1(nn.Module):
    """MobileNetV1 1.0 (Howard et al.): a user-defined model, not in torchvision."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()

        def conv_bn(c_in, c_out, stride):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                                 nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

        def conv_dw(c_in, c_out, stride):
            return nn.Sequential(
                nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                nn.BatchNorm2d(c_in), nn.ReLU(inplace=True),
                nn.Conv2d(c_in, c_out, 1, 1, 0, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True))

        blocks = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
                  (256, 512, 2)] + [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]
        self.features = nn.Sequential(conv_bn(3, 32, 2), *[conv_dw(*b) for b in blocks])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@functools.lru_cache(maxsize=None)
def _traced(name: str, size: int) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = MobileNetV1() if name == "mobilenet_v1" else getattr(torchvision.models, name)()
    return qpasses.trace(model.eval(), torch.randn(1, 3, size, size))


def traced(name: str, size: int = 224) -> torch.fx.GraphModule:
    """A fresh deep copy of a cached trace (tests mutate annotations)."""
    import copy
    return copy.deepcopy(_traced(name, size))


def annotate(gm: torch.fx.GraphModule, text: str = "annotate-bitwidths{weight-bits=4 act-bits=4}",
             ) -> torch.fx.GraphModule:
    PassManager.parse(f"graph({text})", assume=gm).run(gm)
    return gm


class SmallNet(nn.Module):
    """A few convs and a classifier: fast enough for data-driven sensitivities in tests."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1)
        self.c4 = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x)) + x
        x = torch.relu(self.c4(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def small_net(seed: int = 0) -> torch.fx.GraphModule:
    torch.manual_seed(seed)
    return qpasses.trace(SmallNet(), torch.randn(1, 3, 16, 16))
