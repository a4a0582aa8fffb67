"""Scheme names: the option text, the QMeta scheme and the integer grid of every inserted
quantizer agree with the one mapping in qpasses.modules.schemes."""
from __future__ import annotations

import pytest
import torch

import qpasses
from passes_registry import PassContext, PassManager
from qpasses import get_qmeta
from qpasses.errors import NumericsError
from qpasses.ir.layers import quantizable_layers
from qpasses.modules.fake_quant import ActFakeQuant, WeightFakeQuant
from qpasses.modules.schemes import ACT_SCHEME_OPTIONS, act_spec_scheme, grid_scheme
from qpasses.numerics.quantizers import SCHEMES
from tests.models import TinyCNN


def test_mapping_table():
    assert act_spec_scheme("affine", False) == act_spec_scheme("affine", True) == "asymmetric"
    assert grid_scheme("asymmetric", False) == "asymmetric"
    assert grid_scheme("asymmetric", True) == "asymmetric_signed"
    assert act_spec_scheme("symmetric", False) == "unsigned"
    for option in ACT_SCHEME_OPTIONS:
        for signed in (False, True):
            assert grid_scheme(act_spec_scheme(option, signed), signed) in SCHEMES
    with pytest.raises(NumericsError, match="act-scheme"):
        act_spec_scheme("asymmetric", True)
    with pytest.raises(NumericsError, match="dorefa"):
        grid_scheme("dorefa", True)


@pytest.mark.parametrize("wscheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("ascheme", sorted(ACT_SCHEME_OPTIONS))
def test_inserted_quantizers_follow_the_mapping(wscheme, ascheme):
    gm = qpasses.trace(TinyCNN(), torch.randn(1, 3, 8, 8))
    text = ("graph(canonicalize,fold-batch-norm,annotate-bitwidths{weight-bits=4 act-bits=4},"
            f"insert-fake-quant{{weight-scheme={wscheme} act-scheme={ascheme}}})")
    with PassContext():
        PassManager.parse(text, assume=gm).run(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    for info in quantizable_layers(gm):
        node = nodes[info.node]
        q = get_qmeta(node)
        wq = gm.get_submodule(info.name).weight_fake_quant
        assert isinstance(wq, WeightFakeQuant)
        assert q.weight.scheme == wscheme
        assert wq._ns_scheme == grid_scheme(q.weight.scheme, q.weight.signed)
        fq = node.args[0]
        if q.act is None or not (isinstance(fq, torch.fx.Node) and fq.op == "call_module"):
            continue
        aq = gm.get_submodule(fq.target)
        if not isinstance(aq, ActFakeQuant):
            continue
        assert q.act.scheme == act_spec_scheme(ascheme, q.act.signed)
        assert aq.range_scheme == grid_scheme(q.act.scheme, q.act.signed)
