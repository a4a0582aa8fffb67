"""Every torchvision image-classification model: trace, canonicalize, fold BN, DCE, same outputs.

Each model is built with ``weights=None``, then every parameter and BatchNorm statistic is
overwritten with seeded random values (see ``_randomize``), so BatchNorm folding is exercised on
non-trivial statistics (fresh BatchNorms are the identity: mean 0, var 1, gamma 1, beta 0).
The model runs once on a random input of its smallest valid size, is traced with
``qpasses.trace``, goes through ``graph(canonicalize,fold-batch-norm,dce)`` with verify-each on,
and must reproduce the original outputs.

Speed (the whole file must stay far below 5 minutes on 2 cores; about 5.5 G parameters in all):
- torchvision's initializers (trunc_normal_, kaiming_normal_... ~10-90 s per G parameters here)
  are replaced by no-ops while a model is constructed; ``_randomize`` then fills every parameter
  by tiling one seeded random block scaled to 1/sqrt(fan-in) (memcpy speed). The comparison is
  between the same weights before and after the passes, so it stays exact and honest.
- One intra-op thread: on these tiny inputs threads only add OpenMP/oneDNN start-up and
  spin-wait costs (efficientnet_b2's first forward: 0.02 s on 1 thread, 0.5 s on 2 here).
- ViTs are built with ``image_size = 2 * patch_size`` (4 patches): same layers and parameter
  shapes except the position-embedding length; at 224x224 ViT-H alone costs ~0.5 TFLOP here.
"""
from __future__ import annotations

import contextlib
import gc
import warnings

import pytest
import torch
import torchvision
from torch import nn

import qpasses
from passes_registry import PassContext, PassManager, registry
from qpasses.errors import TraceError

PIPELINE = "graph(canonicalize,fold-batch-norm,dce)"
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

# Models torch.fx cannot trace, with the reason. The test asserts they still fail with
# TraceError, so the entry has to go when one starts to trace.
TRACE_FAILURES: dict[str, str] = {}

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


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The model in eval mode, randomized, and a random input of its smallest valid size."""
    torch.manual_seed(seed)
    with _no_random_init(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet/inception init_weights FutureWarning
        model = torchvision.models.get_model(name, weights=None, **BUILD_KWARGS.get(name, {}))
    _randomize(model, seed)
    model.eval()
    size = INPUT_SIZE.get(name, DEFAULT_SIZE)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _outputs(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    if hasattr(out, "_asdict"):  # GoogLeNetOutputs / InceptionOutputs in train mode
        return _outputs(tuple(out))
    raise TypeError(f"unexpected model output {type(out).__name__}")


def test_zoo_covers_every_classification_model():
    assert len(MODELS) >= 80
    assert set(TRACE_FAILURES) <= set(MODELS)
    assert set(INPUT_SIZE) <= set(MODELS)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_pipeline_preserves_outputs(name: str):
    model, x = build(name)
    try:
        with torch.no_grad():
            refs = _outputs(model(x))
        if name in TRACE_FAILURES:
            with pytest.raises(TraceError):
                qpasses.trace(model, x)
            return
        gm = qpasses.trace(model, x)
        del model
        gc.collect()
        with PassContext(verify_each=True):
            gm = PassManager.parse(PIPELINE).run(gm)
        with torch.no_grad():
            outs = _outputs(gm(x))
        assert len(outs) == len(refs)
        for out, ref in zip(outs, refs):
            assert out.shape == ref.shape and torch.isfinite(ref).all()
            scale = ref.abs().max().item()
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * max(scale, 1e-3))
        # the passes did their job: no foldable BN and no non-canonical node is left
        assert registry.lookup_property("bn-folded").checker(gm) == []
        assert registry.lookup_property("canonical").checker(gm) == []
    finally:
        gc.collect()
