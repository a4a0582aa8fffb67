"""canonicalize's ``einsum`` rule: two-operand einsum matrix products -> permute/flatten, matmul,
unflatten/permute (qpasses.ir.einsum_rules). Numeric equivalence over random equations and shapes
(hypothesis), shapes on the new nodes, MaxViT's two equations, what stays an einsum, and
annotate-bitwidths reporting the einsums left as float islands."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qpasses
from passes_registry import PassContext, PassManager
from qpasses.ir.annotations import get_qmeta
from qpasses.ir.canonical_rules import check_canonical
from qpasses.ir.einsum_rules import einsum_reason
from qpasses.ir.fx import node_shape
from qpasses.report import report

from .pipeline_helpers import run_with_stats

torch.set_num_threads(1)
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Einsum(nn.Module):
    def __init__(self, equation: str, as_list: bool = False):
        super().__init__()
        self.equation, self.as_list = equation, as_list

    def forward(self, a, b):
        if self.as_list:
            return torch.einsum(self.equation, [a, b]) + 0
        return torch.einsum(self.equation, a, b) + 0


def _einsum_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.einsum]


def _canonicalize(model, a, b):
    gm = qpasses.trace(model, (a, b))
    gm, stats = run_with_stats(gm, "graph(canonicalize)")
    return gm, stats


def _check_meta(gm, a, b):
    """Every node's traced shape equals the shape it computes (ShapeProp-like replay)."""
    env = {}
    it = iter((a, b))
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = next(it)
        elif n.op == "output":
            continue
        else:
            args = torch.fx.node.map_arg(n.args, lambda x: env[x])
            if n.op == "call_function":
                env[n] = n.target(*args, **n.kwargs)
            elif n.op == "call_method":
                env[n] = getattr(args[0], n.target)(*args[1:], **n.kwargs)
            else:
                raise AssertionError(n.op)
            if isinstance(env[n], torch.Tensor):
                assert node_shape(n) == tuple(env[n].shape), n.name


@st.composite
def products(draw):
    """(equation, shape of a, shape of b, as_list) of a random einsum matrix product."""
    nb, m, k, n = (draw(st.integers(0, 2)), draw(st.integers(0, 2)), draw(st.integers(1, 2)),
                   draw(st.integers(0, 2)))
    letters = draw(st.permutations(LETTERS))[:nb + m + k + n]
    batch, fa = letters[:nb], letters[nb:nb + m]
    con, fb = letters[nb + m:nb + m + k], letters[nb + m + k:]
    size = {x: draw(st.integers(1, 4)) for x in letters}
    ellipsis = nb > 0 and draw(st.booleans())
    ta = draw(st.permutations(fa + con))
    tb = draw(st.permutations(con + fb))
    if ellipsis:  # batch dims lead each operand (and the output) as "..."
        sa = [size[x] for x in batch + ta]
        sb = [size[x] for x in batch + tb]
        out = draw(st.permutations(fa + fb))
        terms = ["..." + "".join(ta), "..." + "".join(tb), "..." + "".join(out)]
    else:
        ta = draw(st.permutations(batch + ta))
        tb = draw(st.permutations(batch + tb))
        sa, sb = [size[x] for x in ta], [size[x] for x in tb]
        out = draw(st.permutations(batch + fa + fb))
        terms = ["".join(ta), "".join(tb), "".join(out)]
    sep = " " if draw(st.booleans()) else ""
    terms = [sep.join(t) if "..." not in t else t for t in terms]
    implicit = not ellipsis and nb == 0 and draw(st.booleans())
    eq = f"{terms[0]},{terms[1]}" + ("" if implicit else f"->{terms[2]}")
    return eq, tuple(sa), tuple(sb), draw(st.booleans())


@settings(deadline=None, max_examples=60, derandomize=True)
@given(products())
def test_einsum_products_become_matmul_and_agree(case):
    eq, sa, sb, as_list = case
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(sa, generator=g), torch.randn(sb, generator=g)
    model = Einsum(eq, as_list)
    ref = model(a, b)
    gm, stats = _canonicalize(model, a, b)
    assert not _einsum_nodes(gm), (eq, gm.graph)
    assert stats["num_einsum"] == 1
    assert check_canonical(gm) == []
    assert sum(n.target is torch.matmul for n in gm.graph.nodes) == 1
    torch.testing.assert_close(gm(a, b), ref, atol=1e-5, rtol=1e-5)
    _check_meta(gm, a, b)


@pytest.mark.parametrize("eq", ["B G H I D, B G H J D -> B G H I J",
                                "B G H I J, B G H J D -> B G H I D"])
def test_maxvit_equations_are_one_matmul(eq):
    a, b = torch.randn(2, 3, 2, 5, 4), torch.randn(2, 3, 2, 6, 4)
    if eq.startswith("B G H I J"):
        a = torch.randn(2, 3, 2, 5, 6)
    model = Einsum(eq)
    gm, _ = _canonicalize(model, a, b)
    mm = [n for n in gm.graph.nodes if n.target is torch.matmul]
    assert len(mm) == 1 and mm[0].name == "einsum"  # the einsum node itself, meta kept
    extra = [n for n in gm.graph.nodes if n.op == "call_method"]
    if eq.startswith("B G H I D"):  # only k is transposed
        assert [(n.target, n.args[1:]) for n in extra] == [("transpose", (3, 4))]
    else:
        assert extra == []
    torch.testing.assert_close(gm(a, b), model(a, b), atol=1e-5, rtol=1e-5)


def test_batch_size_not_baked_in():
    model = Einsum("bij,bjkl->bikl")
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 2, 5)
    gm, _ = _canonicalize(model, a, b)
    a5, b5 = torch.randn(5, 3, 4), torch.randn(5, 4, 2, 5)
    torch.testing.assert_close(gm(a5, b5), model(a5, b5), atol=1e-5, rtol=1e-5)


NOT_PRODUCTS = [  # (equation, shape a, shape b, words of the reason)
    ("ii,ij->ij", (3, 3), (3, 4), "repeats index 'i'"),
    ("ij,jk->ijk", (3, 4), (4, 5), "contracts no index"),   # j is a batch index: no contraction
    ("ij,kl->ijkl", (3, 4), (2, 5), "contracts no index"),   # outer product
    ("ij,jk->k", (3, 4), (4, 5), "one operand only"),        # sums i over a alone
    ("bij,bjk->bik", (1, 3, 4), (2, 4, 5), "broadcasting"),
    ("...ij,...jk->...ik", (2, 3, 4), (2, 2, 4, 5), "different numbers of dims"),
]


@pytest.mark.parametrize("eq,sa,sb,why", NOT_PRODUCTS)
def test_non_products_stay_and_are_float_islands(eq, sa, sb, why):
    a, b = torch.randn(sa), torch.randn(sb)
    gm, stats = _canonicalize(Einsum(eq), a, b)
    (node,) = _einsum_nodes(gm)
    assert why in einsum_reason(node)
    with PassContext(example_inputs=(a, b)):
        PassManager.parse("graph(annotate-bitwidths)").run(gm)
    island = get_qmeta(node).float_island
    assert island is not None and why in island and eq in island


def test_three_operands_stay():
    class Three(nn.Module):
        def forward(self, a, b):
            return torch.einsum("ij,jk,kl->il", a, b, b)
    a, b = torch.randn(3, 3), torch.randn(3, 3)
    gm, _ = _canonicalize(Three(), a, b)
    (node,) = _einsum_nodes(gm)
    assert "3 operand(s)" in einsum_reason(node)


def test_uncanonicalized_product_is_reported():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    gm = qpasses.trace(Einsum("bij,bjk->bik"), (a, b))
    with PassContext(example_inputs=(a, b)):
        PassManager.parse("graph(annotate-bitwidths)").run(gm)
    (node,) = _einsum_nodes(gm)
    assert "run canonicalize first" in get_qmeta(node).float_island


class Projected(nn.Module):
    """Linear projections of two inputs, an einsum of them, a linear on the result."""

    def __init__(self, equation: str, ca: int, cb: int):
        super().__init__()
        self.equation = equation
        self.la, self.lb, self.out = nn.Linear(ca, ca), nn.Linear(cb, cb), nn.Linear(4, 4)

    def forward(self, a, b):
        y = torch.einsum(self.equation, self.la(a), self.lb(b))
        return self.out(y.flatten(1).reshape(y.shape[0], -1, 4))


@pytest.mark.parametrize("eq,sa,sb", [("nchw,ncgk->nwgkh", (2, 3, 4, 4), (2, 3, 2, 4)),
                                      ("nchw,nhk->nwck", (2, 3, 4, 4), (2, 4, 4))])
def test_grouped_products_lower_to_integer(eq, sa, sb):
    """The rewritten chain (flatten, matmul, reshape with size reads, permute) lowers with no
    float island and verify-int-sim finds it bit-exact."""
    torch.manual_seed(0)
    a, b = torch.randn(sa), torch.randn(sb)
    gm = qpasses.trace(Projected(eq, sa[-1], sb[-1]).eval(), (a, b))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with PassContext(example_inputs=(a, b), calibration_data=[(a, b)]):
            PassManager.parse("graph(default)").run(gm)
    rep = report(gm)
    assert rep["float_islands"] == []
    assert rep["totals"]["int_macs"] == rep["totals"]["macs"]
