"""QMeta / QuantSpec: validation, accessors, serialization, verify-each schema checks."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpasses
from passes_registry import PassManager, print_graph
from qpasses.errors import AnnotationError
from qpasses.ir.annotations import QMeta, QuantSpec, get_qmeta, update_qmeta


@pytest.mark.parametrize("kwargs,message", [
    (dict(bits=33), "bits must be an int in 0..32"),
    (dict(bits=-1), "bits must be an int in 0..32"),
    (dict(bits=True), "bits must be an int"),
    (dict(bits=4, scheme="weird"), "scheme must be one of"),
    (dict(bits=4, bits_per_kernel=(4, 2, 40)), "every per-kernel bit-width"),
    (dict(bits=3, bits_per_kernel=(4, 2)), "bits (3) must equal max(bits_per_kernel) (4)"),
    (dict(bits=4, bits_per_kernel=(4, 4), scale=(0.1, 0.1, 0.1)), "scale has 3 values for 2"),
    (dict(bits=4, scale=(0.0,)), "scale values must be finite and > 0"),
    (dict(bits=4, scale=(1.0,), zero_point=(9,)), "zero_point values must be ints in [-8, 7]"),
    (dict(bits=4, axis=-1), "axis must be a non-negative int"),
])
def test_quantspec_validation(kwargs, message):
    with pytest.raises(AnnotationError) as info:
        QuantSpec(**kwargs)
    assert message in str(info.value)


def test_qrange_and_kernel_bits():
    assert QuantSpec(bits=4).qrange() == (-8, 7)
    assert QuantSpec(bits=4, narrow_range=True).qrange() == (-7, 7)
    assert QuantSpec(bits=4, signed=False, scheme="unsigned").qrange() == (0, 15)
    assert QuantSpec(bits=0).qrange() == (0, 0) and QuantSpec(bits=0).pruned
    s = QuantSpec(bits=4, bits_per_kernel=[4, 0, 2])
    assert s.axis == 0 and s.kernel_bits(3) == (4, 0, 2)
    assert QuantSpec(bits=3).kernel_bits(2) == (3, 3)
    with pytest.raises(AnnotationError, match="3 entries for 5 kernels"):
        s.kernel_bits(5)
    assert s.short() == "i{4,0,2}" and QuantSpec(bits=8, signed=False, scheme="unsigned").short() == "u8"


specs = st.builds(
    lambda bits, per_kernel, signed: QuantSpec(
        bits=max(per_kernel) if per_kernel else bits, bits_per_kernel=tuple(per_kernel) or None,
        signed=signed, scheme="symmetric" if signed else "unsigned"),
    st.integers(0, 32), st.lists(st.integers(0, 32), max_size=5), st.booleans())
qmetas = st.builds(QMeta, weight=st.one_of(st.none(), specs), act=st.one_of(st.none(), specs),
                   pruned_channels=st.lists(st.integers(0, 100), unique=True, max_size=4).map(tuple),
                   origin=st.lists(st.sampled_from(["a", "b"]), max_size=2).map(tuple))


@settings(max_examples=100, deadline=None)
@given(qmetas)
def test_qmeta_dict_round_trip(q):
    assert QMeta.from_dict(q.to_dict()) == q


def test_qmeta_is_frozen_and_update_records_origin():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert get_qmeta(node) == QMeta()
    q = update_qmeta(node, origin="annotate-bitwidths", weight=QuantSpec(bits=4))
    with pytest.raises(Exception):
        q.weight = None  # type: ignore[misc]
    q2 = update_qmeta(node, origin="insert-fake-quant", act=QuantSpec(bits=8))
    assert q2.origin == ("annotate-bitwidths", "insert-fake-quant") and q2.w_bits == 4
    with pytest.raises(AnnotationError, match="unexpected keyword"):
        update_qmeta(node, bitz=3)
    with pytest.raises(AnnotationError, match="unknown keys"):
        QMeta.from_dict({"weight": None, "extra": 1})


def test_verify_each_rejects_malformed_annotations():
    from passes_registry import Pass, PassResult, VerificationError, register_pass

    @register_pass
    class WritesGarbage(Pass):
        name = "test-core-writes-garbage"

        def run(self, gm, ctx, am):
            next(iter(gm.graph.nodes)).meta["qpasses"] = {"bits": 4}
            return PassResult(modified=True)

    gm = qpasses.trace(torch.nn.Linear(2, 2), torch.randn(1, 2))
    with pytest.raises(VerificationError, match="must be a QMeta, got dict"):
        PassManager.parse("graph(test-core-writes-garbage)").run(gm)


def test_annotations_appear_in_fxir_dump():
    gm = qpasses.trace(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.randn(1, 2))
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    update_qmeta(node, weight=QuantSpec(bits=4, bits_per_kernel=(4, 0)),
                 act=QuantSpec(bits=8, signed=False, scheme="unsigned"))
    text = print_graph(gm)
    assert "%_0 = call_module[0](%input_1) : f32[1,2] {w=i{4,0} act=u8}" in text, text
