"""canonicalize: one tiny module per rewrite rule; outputs equal, canonical form, statistics."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qpasses
from passes_registry import PassContext, PassManager
from qpasses.ir.canonical_rules import RULES, check_canonical

from .pipeline_helpers import run_with_stats

X = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0)) * 4


def run(model: nn.Module, x: torch.Tensor = X, text: str = "graph(canonicalize)",
        leaf_modules=None):
    """Trace, run the pipeline with verify-each, compare outputs; returns (gm, stats)."""
    model.eval()
    gm = model if isinstance(model, torch.fx.GraphModule) else \
        qpasses.trace(model, x, leaf_modules=leaf_modules)
    with torch.no_grad():
        ref = model(x.clone())
    gm, stats = run_with_stats(gm, text)
    with torch.no_grad():
        out = gm(x.clone())
    for a, b in zip(out if isinstance(out, tuple) else (out,),
                    ref if isinstance(ref, tuple) else (ref,)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert check_canonical(gm) == []
    return gm, stats


def calls(gm) -> list[tuple[str, object]]:
    """(op, target) of every computing node; modules as their class."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out.append((n.op, type(gm.get_submodule(n.target))))
        elif n.op in ("call_function", "call_method"):
            out.append((n.op, n.target))
    return out


def hits(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if v and k != "num_rewrites"}


class Seq(nn.Module):
    """Apply a function (possibly using submodules registered on self) to the input."""

    def __init__(self, fn, **mods):
        super().__init__()
        self.fn = fn
        for k, v in mods.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.fn(self, x)


def fresh(x):  # a computed (non-input) tensor, so in-place rewrites are allowed
    return x * 1.0


# --------------------------------------------------------------------------------------------
# Activations

ACTIVATION_CASES = [
    # (id, fn, modules, canonical call, stat)
    ("relu-module", lambda s, x: s.act(x), {"act": nn.ReLU()}, torch.relu, "num_relu"),
    ("relu-module-inplace", lambda s, x: s.act(fresh(x)), {"act": nn.ReLU(inplace=True)},
     torch.relu, "num_relu"),
    ("relu-F", lambda s, x: F.relu(x), {}, torch.relu, "num_relu"),
    ("relu-F-inplace", lambda s, x: F.relu(fresh(x), inplace=True), {}, torch.relu, "num_relu"),
    ("relu-method", lambda s, x: x.relu(), {}, torch.relu, "num_relu"),
    ("relu-method-inplace", lambda s, x: fresh(x).relu_(), {}, torch.relu, "num_relu"),
    ("relu-torch-inplace", lambda s, x: torch.relu_(fresh(x)), {}, torch.relu, "num_relu"),
    ("relu-clamp", lambda s, x: x.clamp(min=0), {}, torch.relu, "num_relu"),
    ("relu-clamp-min", lambda s, x: torch.clamp_min(x, 0.0), {}, torch.relu, "num_relu"),
    ("relu6-module", lambda s, x: s.act(x), {"act": nn.ReLU6()}, F.relu6, "num_relu6"),
    ("relu6-hardtanh-module", lambda s, x: s.act(x), {"act": nn.Hardtanh(0.0, 6.0)}, F.relu6,
     "num_relu6"),
    ("relu6-hardtanh-F", lambda s, x: F.hardtanh(x, 0, 6), {}, F.relu6, "num_relu6"),
    ("relu6-F-inplace", lambda s, x: F.relu6(fresh(x), inplace=True), {}, F.relu6, "num_relu6"),
    ("relu6-clamp", lambda s, x: torch.clamp(x, 0, 6), {}, F.relu6, "num_relu6"),
    ("hardtanh-module", lambda s, x: s.act(x), {"act": nn.Hardtanh(-2.0, 3.0)}, F.hardtanh,
     "num_hardtanh"),
    ("hardtanh-F-kwargs", lambda s, x: F.hardtanh(x, min_val=-1, max_val=2), {}, F.hardtanh,
     "num_hardtanh"),
    ("sigmoid-module", lambda s, x: s.act(x), {"act": nn.Sigmoid()}, torch.sigmoid,
     "num_sigmoid"),
    ("sigmoid-F", lambda s, x: F.sigmoid(x), {}, torch.sigmoid, "num_sigmoid"),
    ("sigmoid-method-inplace", lambda s, x: fresh(x).sigmoid_(), {}, torch.sigmoid,
     "num_sigmoid"),
    ("tanh-module", lambda s, x: s.act(x), {"act": nn.Tanh()}, torch.tanh, "num_tanh"),
    ("tanh-method", lambda s, x: x.tanh(), {}, torch.tanh, "num_tanh"),
    ("hardsigmoid-module", lambda s, x: s.act(fresh(x)), {"act": nn.Hardsigmoid(inplace=True)},
     F.hardsigmoid, "num_hardsigmoid"),
    ("hardswish-module", lambda s, x: s.act(fresh(x)), {"act": nn.Hardswish(inplace=True)},
     F.hardswish, "num_hardswish"),
    ("hardswish-F-inplace", lambda s, x: F.hardswish(fresh(x), inplace=True), {}, F.hardswish,
     "num_hardswish"),
    ("silu-module", lambda s, x: s.act(x), {"act": nn.SiLU()}, F.silu, "num_silu"),
    ("silu-F-inplace", lambda s, x: F.silu(fresh(x), True), {}, F.silu, "num_silu"),
    ("gelu-module", lambda s, x: s.act(x), {"act": nn.GELU()}, F.gelu, "num_gelu"),
    ("gelu-module-tanh", lambda s, x: s.act(x), {"act": nn.GELU(approximate="tanh")}, F.gelu,
     "num_gelu"),
    ("leaky-relu-module", lambda s, x: s.act(x), {"act": nn.LeakyReLU(0.2)}, F.leaky_relu,
     "num_leaky_relu"),
    ("leaky-relu-F-inplace", lambda s, x: F.leaky_relu(fresh(x), 0.1, True), {}, F.leaky_relu,
     "num_leaky_relu"),
]


@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=[c[0] for c in ACTIVATION_CASES])
def test_activation_rules(case):
    _, fn, mods, canon, stat = case
    gm, stats = run(Seq(fn, **mods))
    assert stats[stat] == 1 and stats["num_rewrites"] == 1, hits(stats)
    ops = calls(gm)
    assert ("call_function", canon) in ops
    node = next(n for n in gm.graph.nodes if n.target is canon)
    assert "inplace" not in node.kwargs
    assert node.meta["tensor_meta"].shape == X.shape   # shape metadata kept
    assert not any(op == "call_module" for op, _ in ops)


def test_canonical_arguments():
    gm, _ = run(Seq(lambda s, x: s.a(x) + s.b(x) + F.hardtanh(x, min_val=-1, max_val=2),
                    a=nn.GELU(approximate="tanh"), b=nn.LeakyReLU(0.25)))
    by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_function"}
    assert by_target[F.gelu].kwargs == {"approximate": "tanh"}
    assert by_target[F.leaky_relu].args[1:] == (0.25,)
    assert by_target[F.hardtanh].args[1:] == (-1.0, 2.0) and not by_target[F.hardtanh].kwargs


def test_node_names_are_kept():
    gm, _ = run(Seq(lambda s, x: s.act(x), act=nn.ReLU()))
    assert [n.name for n in gm.graph.nodes] == ["x", "act", "output"]


def test_clamp_on_integers_is_left_alone():
    xi = torch.randint(-5, 5, (2, 3))
    gm, stats = run(Seq(lambda s, x: x.clamp(min=0)), x=xi)
    assert stats["num_rewrites"] == 0 and calls(gm) == [("call_method", "clamp")]


# --------------------------------------------------------------------------------------------
# In-place safety


def test_inplace_on_input_is_kept():
    # relu_ on the graph input mutates the caller's tensor: not rewritten
    gm, stats = run(Seq(lambda s, x: s.act(x), act=nn.ReLU(inplace=True)))
    assert stats["num_rewrites"] == 0
    assert calls(gm) == [("call_module", nn.ReLU)]


def test_inplace_on_view_is_kept():
    def fn(s, x):
        y = fresh(x)
        v = y[0]
        v.relu_()
        return y  # y sees the mutation through the view v
    gm, stats = run(Seq(fn))
    assert stats["num_relu"] == 0


def test_inplace_later_users_are_redirected():
    def fn(s, x):
        y = fresh(x)
        a = y * 2          # before: reads the un-mutated value
        F.relu(y, inplace=True)
        return a + y       # after: reads the mutated value
    gm, stats = run(Seq(fn))
    assert stats["num_relu"] == 1
    relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
    add = next(n for n in gm.graph.nodes if n.target is operator.add)
    assert relu in add.args


def test_inplace_binary_ops():
    def fn(s, x):
        y = fresh(x)
        y.add_(x)
        y.mul_(2)
        y.sub_(1.5)
        y.div_(3)
        return y
    gm, stats = run(Seq(fn))
    assert hits(stats) == {"num_add": 1, "num_mul": 1, "num_sub": 1, "num_div": 1}
    assert [t for _, t in calls(gm)][1:] == [operator.add, operator.mul, operator.sub,
                                             operator.truediv]


def test_inplace_binary_with_promotion_is_kept():
    def fn(s, x):
        y = fresh(x).half()
        y2 = y * 1
        y2.add_(x)  # stays float16 in place; y2 + x would be float32
        return y2.float()
    gm, stats = run(Seq(fn), x=X[:, :, :2, :2])
    assert stats["num_add"] == 0


# --------------------------------------------------------------------------------------------
# Arithmetic, cat


@pytest.mark.parametrize("fn,canon,stat", [
    (lambda s, x: torch.add(x, x), operator.add, "num_add"),
    (lambda s, x: x.add(1.0), operator.add, "num_add"),
    (lambda s, x: torch.add(x, x, alpha=1), operator.add, "num_add"),
    (lambda s, x: torch.sub(x, 1), operator.sub, "num_sub"),
    (lambda s, x: x.subtract(x * 2), operator.sub, "num_sub"),
    (lambda s, x: torch.mul(x, 3), operator.mul, "num_mul"),
    (lambda s, x: x.multiply(x), operator.mul, "num_mul"),
    (lambda s, x: torch.div(x, 3), operator.truediv, "num_div"),
    (lambda s, x: x.div(2.0, rounding_mode=None), operator.truediv, "num_div"),
], ids=["add", "add-method", "add-alpha1", "sub", "subtract", "mul", "multiply", "div",
        "div-none"])
def test_binary_rules(fn, canon, stat):
    gm, stats = run(Seq(fn))
    assert stats[stat] == 1 and stats["num_rewrites"] == 1
    assert ("call_function", canon) in calls(gm)


@pytest.mark.parametrize("fn", [
    lambda s, x: torch.add(x, x, alpha=2),
    lambda s, x: torch.div(x, 3, rounding_mode="floor"),
], ids=["alpha2", "floor-div"])
def test_binary_non_canonicalizable(fn):
    _, stats = run(Seq(fn))
    assert stats["num_rewrites"] == 0


@pytest.mark.parametrize("fn", [
    lambda s, x: torch.concat((x, x), 1),
    lambda s, x: torch.concatenate([x, x], axis=1),
    lambda s, x: torch.cat([x, x], dim=-3),
    lambda s, x: torch.cat((x, x), 1),
], ids=["concat", "concatenate", "cat-negative-dim", "cat-tuple"])
def test_cat_rule(fn):
    gm, stats = run(Seq(fn))
    assert stats["num_cat"] == 1
    cat = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert cat.target is torch.cat and isinstance(cat.args[0], list) and cat.args[1] == 1
    assert not cat.kwargs


def test_canonical_cat_is_unchanged():
    _, stats = run(Seq(lambda s, x: torch.cat([x, x], 1)))
    assert stats["num_rewrites"] == 0


# --------------------------------------------------------------------------------------------
# Flatten


@pytest.mark.parametrize("fn,args", [
    (lambda s, x: s.fl(x), (1,)),
    (lambda s, x: x.flatten(1), (1,)),
    (lambda s, x: torch.flatten(x, start_dim=1, end_dim=-1), (1,)),
    (lambda s, x: x.flatten(-2), (2,)),
    (lambda s, x: x.flatten(1, -2), (1, 2)),
    (lambda s, x: x.view(x.size(0), -1), (1,)),
    (lambda s, x: x.reshape(x.shape[0], -1), (1,)),
    (lambda s, x: x.view(x.size()[0], 100), (1,)),
    (lambda s, x: x.view(-1, 4 * 5 * 5), (1,)),
    (lambda s, x: torch.reshape(x, (x.size(0), -1)), (1,)),
], ids=["module", "method", "kwargs", "negative-start", "partial", "view-size0",
        "reshape-shape0", "view-size-getitem", "view-minus-one", "torch-reshape"])
def test_flatten_rule(fn, args):
    gm, stats = run(Seq(fn, fl=nn.Flatten()))
    assert stats["num_flatten"] == 1 and stats["num_rewrites"] == 1
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert len(nodes) == 1, "shape helpers (size/getattr/getitem) are cleaned up"
    assert nodes[0].target is torch.flatten and nodes[0].args[1:] == args


@pytest.mark.parametrize("fn", [
    lambda s, x: x.view(2, -1),            # batch size baked in: not a flatten for other batches
    lambda s, x: x.view(x.size(1), -1),    # not the batch dimension
    lambda s, x: x.view(-1, 5),            # not a flatten from dim 1
    lambda s, x: x.view(x.size(0), 4, -1),
], ids=["constant-batch", "size1", "wrong-width", "three-dims"])
def test_view_not_provably_flatten(fn):
    _, stats = run(Seq(fn))
    assert stats["num_flatten"] == 0


# --------------------------------------------------------------------------------------------
# No-ops


@pytest.mark.parametrize("fn,mods,stat", [
    (lambda s, x: s.m(x) + 1, {"m": nn.Identity()}, "num_identity"),
    (lambda s, x: s.m(x) + 1, {"m": nn.Dropout(0.3)}, "num_dropout"),
    (lambda s, x: s.m(x) + 1, {"m": nn.Dropout2d(0.3)}, "num_dropout"),
    (lambda s, x: s.m(x) + 1, {"m": nn.AlphaDropout(0.3)}, "num_dropout"),
    (lambda s, x: F.dropout(x, 0.2, training=s.training) + 1, {}, "num_dropout"),
    (lambda s, x: torch.dropout(x, 0.2, False) + 1, {}, "num_dropout"),
], ids=["identity", "dropout", "dropout2d", "alpha-dropout", "F-dropout", "torch-dropout"])
def test_noop_rules(fn, mods, stat):
    gm, stats = run(Seq(fn, **mods))
    assert stats[stat] == 1
    assert [t for _, t in calls(gm)] == [operator.add]


def test_dropout_in_training_is_kept():
    def fn(s, x):
        return F.dropout(x, 0.5) * 0  # F.dropout defaults to training=True
    gm, stats = run(Seq(fn))
    assert stats["num_dropout"] == 0


def test_identity_as_output():
    gm, stats = run(Seq(lambda s, x: s.m(x), m=nn.Identity()))
    assert stats["num_identity"] == 1
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "output"]


# --------------------------------------------------------------------------------------------
# Whole-pass behaviour


def test_stats_cover_every_rule_and_idempotence():
    m = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(inplace=True), nn.Dropout(), nn.Flatten(),
                      nn.Linear(100, 3), nn.Hardswish())
    gm, stats = run(m)
    assert set(stats) == {"num_" + r.name.replace("-", "_") for r in RULES} | {"num_rewrites"}
    assert hits(stats) == {"num_relu": 1, "num_dropout": 1, "num_flatten": 1,
                           "num_hardswish": 1}
    assert stats["num_rewrites"] == 4
    # a second run changes nothing (and says so: verify-each checks the claim)
    with PassContext(verify_each=True):
        PassManager.parse("graph(canonicalize)").run(gm)


def test_checker_lists_non_canonical_nodes():
    gm = qpasses.trace(nn.Sequential(nn.ReLU(), nn.Identity()).eval(), X)
    problems = check_canonical(gm)
    assert len(problems) == 2 and "rule 'relu'" in problems[0] and "rule 'identity'" in problems[1]


def test_subclass_modules_are_left_alone():
    class MyReLU(nn.ReLU):
        def forward(self, x):
            return super().forward(x) * 2
    gm, stats = run(Seq(lambda s, x: s.act(x), act=MyReLU()), leaf_modules=[MyReLU])
    assert stats["num_rewrites"] == 0


def test_iadd_node():
    # x += y traces to operator.add (fx proxies have no __iadd__); build the iadd node by hand
    g = torch.fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(operator.mul, (x, 2.0))
    z = g.call_function(operator.iadd, (y, x))
    g.output(z)
    gm = torch.fx.GraphModule(nn.Module(), g)
    from qpasses.ir.trace import propagate_shapes
    propagate_shapes(gm, (X,))
    gm, stats = run(gm)
    assert stats["num_add"] == 1 and ("call_function", operator.add) in calls(gm)
