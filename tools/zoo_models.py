"""Seeded random torchvision classifiers at their smallest valid input, for the zoo tests and tools.

``build(name)`` constructs ``torchvision.models.get_model(name, weights=None)`` with torchvision's
random initializers disabled (slow at these sizes: ~10-90 s per G parameters), then fills every
parameter and BatchNorm statistic by tiling one seeded random block scaled to 1/sqrt(fan-in)
(memcpy speed), so BatchNorm folding and quantization see non-trivial statistics (fresh BatchNorms
are the identity). ViTs are built with ``image_size = 2 * patch_size`` (4 patches): the same layers
and parameter shapes except the position-embedding length (at 224x224 ViT-H alone costs ~0.5
TFLOP here). No download: nothing here reads pretrained weights.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torchvision
from torch import nn

__all__ = ["BUILD_KWARGS", "DEFAULT_SIZE", "INPUT_SIZE", "MODELS", "build"]

MODELS = torchvision.models.list_models(module=torchvision.models)

DEFAULT_SIZE = 32
# Smallest input side each model accepts where it is not 32 (the rest work at 32).
INPUT_SIZE = {
    "alexnet": 63,          # conv s4 + three 3x3/2 max-pools must leave >= 1 pixel
    "inception_v3": 75,     # documented minimum
    "maxvit_t": 224,        # every stage's grid must divide by the 7x7 partition size
}
# Constructor overrides (see the module docstring).
BUILD_KWARGS = {
    "vit_b_16": {"image_size": 32}, "vit_b_32": {"image_size": 64},
    "vit_l_16": {"image_size": 32}, "vit_l_32": {"image_size": 64},
    "vit_h_14": {"image_size": 28},
}
for _name, _kw in BUILD_KWARGS.items():
    INPUT_SIZE[_name] = _kw["image_size"]

_RANDOM_INITS = ("normal_", "uniform_", "trunc_normal_", "kaiming_normal_", "kaiming_uniform_",
                 "xavier_normal_", "xavier_uniform_", "orthogonal_")


@contextlib.contextmanager
def _no_random_init():
    """Make torch.nn.init's random fills no-ops while a model is constructed."""
    saved = {n: getattr(nn.init, n) for n in _RANDOM_INITS}
    try:
        for n in _RANDOM_INITS:
            setattr(nn.init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


_BLOCK = 1_000_003  # prime: the tiling period never lines up with channel boundaries


def _tile_(t: torch.Tensor, block: torch.Tensor, scale: float, shift: float, offset: int) -> None:
    flat = t.detach().view(-1)
    pos, n = 0, flat.numel()
    while pos < n:
        k = min(block.numel() - offset, n - pos)
        torch.mul(block[offset:offset + k], scale, out=flat[pos:pos + k])
        pos, offset = pos + k, 0
    if shift:
        flat.add_(shift)


@torch.no_grad()
def _randomize(model: nn.Module, seed: int) -> None:
    """Seeded random values in every parameter and BatchNorm statistic (see module docstring)."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(_BLOCK, generator=g)
    uniform = torch.rand(_BLOCK, generator=g) * 2 - 1
    offsets = iter(torch.randint(0, _BLOCK, (1 << 16,), generator=g).tolist())
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            fan_in = max(1, p.numel() // p.shape[0])
            _tile_(p, normal, fan_in ** -0.5, 0.0, next(offsets))
        elif name.endswith("weight"):       # norm-layer scales: around 1
            _tile_(p, uniform, 0.5, 1.0, next(offsets))
        else:                               # biases and other vectors: small
            _tile_(p, normal, 0.1, 0.0, next(offsets))
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
            _tile_(mod.running_mean, normal, 0.1, 0.0, next(offsets))
            _tile_(mod.running_var, uniform, 0.5, 1.0, next(offsets))


def build(name: str, seed: int = 0, size: int | None = None,
          batch: int = 2) -> tuple[nn.Module, torch.Tensor]:
    """The model in eval mode, randomized, and a random input of ``batch`` images of its smallest
    valid size (or of ``size``: ViTs are then built for that image size)."""
    torch.manual_seed(seed)
    kwargs = dict(BUILD_KWARGS.get(name, {}))
    if size is not None and "image_size" in kwargs:
        kwargs["image_size"] = size
    with _no_random_init(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet/inception init_weights FutureWarning
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    _randomize(model, seed)
    model.eval()
    size = size if size is not None else INPUT_SIZE.get(name, DEFAULT_SIZE)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return model, x
