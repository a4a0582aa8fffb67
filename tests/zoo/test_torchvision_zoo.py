"""Every torchvision image-classification model: trace, canonicalize, fold BN, DCE, same outputs.

Each model is built by ``tools.zoo_models.build``: ``weights=None``, then every parameter and
BatchNorm statistic overwritten with seeded random values, so BatchNorm folding is exercised on
non-trivial statistics (fresh BatchNorms are the identity: mean 0, var 1, gamma 1, beta 0).
The model runs once on a random input of its smallest valid size, is traced with
``qpasses.trace``, goes through ``graph(canonicalize,fold-batch-norm,dce)`` with verify-each on,
and must reproduce the original outputs.

Speed (the whole file must stay far below 5 minutes on 2 cores; about 5.5 G parameters in all):
- torchvision's initializers are replaced by no-ops while a model is constructed and the
  parameters are filled at memcpy speed (tools/zoo_models.py). The comparison is between the
  same weights before and after the passes, so it stays exact and honest.
- One intra-op thread (tests/zoo/conftest.py): on these tiny inputs threads only add OpenMP/oneDNN
  start-up and spin-wait costs (efficientnet_b2's first forward: 0.02 s on 1 thread, 0.5 s on 2 here).
- ViTs are built with ``image_size = 2 * patch_size`` (4 patches): same layers and parameter
  shapes except the position-embedding length; at 224x224 ViT-H alone costs ~0.5 TFLOP here.
"""
from __future__ import annotations

import gc

import pytest
import torch

import qpasses
from passes_registry import PassContext, PassManager, registry
from qpasses.errors import TraceError
from tools.zoo_models import INPUT_SIZE, MODELS, build

PIPELINE = "graph(canonicalize,fold-batch-norm,dce)"

# Models torch.fx cannot trace, with the reason. The test asserts they still fail with
# TraceError, so the entry has to go when one starts to trace.
TRACE_FAILURES: dict[str, str] = {}



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
