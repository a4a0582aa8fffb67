"""Issue 14 part 3, zoo: DenseNet-121 (32x32) through ``graph(default)`` lowers with no float island
(its pre-activation BatchNorms after each concatenation become ``IntAffine``) and verify-int-sim
finds it bit-exact against the independent oracle."""
from __future__ import annotations

import warnings

import qpasses
from passes_registry import PassContext, PassManager, get_record
from qpasses.ir.records import INT_SIM_KEY
from qpasses.modules.int_sim_affine import IntAffine
from tools.zoo_models import build


def test_densenet121_lowers_without_float_islands() -> None:
    model, x = build("densenet121")
    gm = qpasses.trace(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with PassContext(example_inputs=(x,), calibration_data=[x]):
            PassManager.parse("graph(default)").run(gm)
    rec = get_record(gm, INT_SIM_KEY)
    assert list(rec.float_islands) == []
    assert sum(isinstance(m, IntAffine) for m in gm.modules()) == 62   # 58 norm1, 3 transitions, norm5
    assert rec.verify["oracle"] == "independent" and rec.verify["num_nodes_checked"] > 200
