"""dce: dead nodes, unused submodules and attributes go; impure and interface nodes stay."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

import qpasses

from .pipeline_helpers import run_with_stats

X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def run(gm, text="graph(dce)"):
    return run_with_stats(gm, text)


def compare(gm, model, x=X):
    with torch.no_grad():
        a, b = gm(x.clone()), model(x.clone())
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(u, v)


class Dead(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Conv2d(3, 3, 1)
        self.dead_call = nn.Linear(4, 4)                  # called, result unused
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.dead_param = nn.Parameter(torch.ones(3))     # read, result unused

    def forward(self, x, unused_input):
        _ = self.dead_call(x)
        _ = x * self.dead_param.view(1, 3, 1, 1) + 1
        return self.used(x) * self.scale


def test_dead_nodes_modules_and_attributes_are_removed():
    m = Dead().eval()
    gm = qpasses.trace(m, (X, X))
    gm.add_submodule("unused", nn.Conv2d(3, 3, 1))      # no node refers to it
    gm, stats = run(gm)
    assert stats["num_nodes_removed"] == 5   # dead_call, get_attr, view, mul, add
    assert stats["num_submodules_removed"] == 2  # unused, dead_call
    assert [n.op for n in gm.graph.nodes].count("placeholder") == 2  # interface kept
    assert not hasattr(gm, "unused") and not hasattr(gm, "dead_call")
    assert not hasattr(gm, "dead_param") and hasattr(gm, "scale")
    with torch.no_grad():
        torch.testing.assert_close(gm(X, X), m(X, X))


def test_unused_root_attribute_is_removed():
    gm = qpasses.trace(nn.Sequential(nn.Conv2d(3, 3, 1)).eval(), X)
    gm.register_buffer("orphan", torch.zeros(3))
    gm.register_parameter("orphan_p", nn.Parameter(torch.zeros(3)))
    gm, stats = run(gm)
    assert stats["num_tensors_removed"] == 2
    assert not hasattr(gm, "orphan") and not hasattr(gm, "orphan_p")


def test_layer_parameters_are_never_removed_one_by_one():
    # a called layer keeps all its parameters, even those no get_attr node reads
    gm = qpasses.trace(nn.Sequential(nn.Conv2d(3, 3, 1)).eval(), X)
    gm, stats = run(gm)
    assert stats == {"num_nodes_removed": 0, "num_submodules_removed": 0,
                     "num_tensors_removed": 0}
    assert gm.get_submodule("0").bias is not None


class Impure(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = x * 2
        y.add_(1)                      # in-place method, result unused
        z = y * 1
        torch.relu_(z)                 # in-place function, result unused
        w = z * 1
        F.relu(w, inplace=True)        # inplace=True, result unused
        u = w * 1
        F.hardtanh(u, -0.5, 0.5, True)  # inplace=True, result unused
        v = u * 1
        self.act(v)                    # in-place module, result unused
        return v


def test_impure_nodes_are_kept():
    m = Impure().eval()
    gm = qpasses.trace(m, X)
    n_before = len(gm.graph.nodes)
    gm, stats = run(gm)
    assert stats["num_nodes_removed"] == 0 and len(gm.graph.nodes) == n_before
    compare(gm, m)


def test_hand_built_mutations_are_kept():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(operator.mul, (x, 2.0))
    g.call_function(operator.iadd, (y, 1.0))             # mutates y, result unused
    g.call_function(operator.setitem, (y, 0, 0.0))       # mutates y
    g.call_function(F.relu, (y, True))                   # inplace=True by position
    g.call_function(operator.add, (y, 5.0))              # pure and dead
    g.output(y)
    gm = torch.fx.GraphModule(nn.Module(), g)
    gm, stats = run(gm)
    assert stats["num_nodes_removed"] == 1
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [
        operator.mul, operator.iadd, operator.setitem, F.relu]


def test_training_mode_bn_is_kept():
    class Wrapper(nn.Module):
        pass
    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.call_module("bn", (x,))                            # updates running stats in training
    g.output(x)
    root = Wrapper()
    root.bn = nn.BatchNorm2d(3).train()
    gm = torch.fx.GraphModule(root, g)
    gm, stats = run(gm)
    assert stats["num_nodes_removed"] == 0 and hasattr(gm, "bn")
    gm.bn.eval()
    gm, stats = run(gm)
    assert stats["num_nodes_removed"] == 1 and stats["num_submodules_removed"] == 1
    assert not hasattr(gm, "bn")


def test_nothing_to_do_is_unmodified():
    m = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()).eval()
    gm, stats = run(qpasses.trace(m, X))
    assert stats == {"num_nodes_removed": 0, "num_submodules_removed": 0,
                     "num_tensors_removed": 0}


def test_after_fold_and_canonicalize():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(),
                      nn.Flatten(), nn.Identity()).eval()
    gm = qpasses.trace(m, X)
    gm, stats = run(gm, "graph(canonicalize,fold-batch-norm,dce)")
    assert stats["num_submodules_removed"] == 4      # ReLU, Dropout, Flatten, Identity
    assert [name for name, _ in gm.named_children()] == ["0"]
    compare(gm, m)
