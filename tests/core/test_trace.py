"""qpasses.trace: shapes on every node, the user's model untouched, typed errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qpasses
from passes_registry import get_record
from qpasses.errors import InputError, TraceError


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Identity(), Branchy())

    def forward(self, x):
        return self.inner(x)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: untraceable
            return x
        return -x


def test_trace_records_shapes_and_dtypes_on_every_node():
    gm = qpasses.trace(SmallNet(), torch.randn(2, 3, 8, 8))
    for n in gm.graph.nodes:
        if n.op != "output":
            assert "tensor_meta" in n.meta, n.name
    conv = next(n for n in gm.graph.nodes if n.target == "conv")
    assert tuple(conv.meta["tensor_meta"].shape) == (2, 4, 8, 8)
    assert get_record(gm, "qpasses.model") == "SmallNet"


def test_user_model_is_never_touched():
    model = SmallNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = qpasses.trace(model, (torch.randn(2, 3, 8, 8),))
    from passes_registry import PassManager
    with torch.no_grad():
        gm.conv.weight.mul_(0)
    assert model.training and model.bn.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not gm.training


def test_outputs_match_eval_model():
    model = SmallNet().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = qpasses.trace(model, x)
    assert torch.equal(gm(x), model(x))


def test_not_a_module_is_input_error():
    with pytest.raises(InputError, match="expects a torch.nn.Module, got function"):
        qpasses.trace(lambda x: x, torch.randn(1))


@pytest.mark.parametrize("bad", [None, "x", [1, 2], (torch.randn(1), 3)])
def test_bad_example_inputs_are_input_errors(bad):
    with pytest.raises(InputError, match="example_inputs must be a tensor or a tuple of tensors"):
        qpasses.trace(SmallNet(), bad)


def test_wrong_input_shape_names_the_failing_node():
    with pytest.raises(InputError) as info:
        qpasses.trace(SmallNet(), torch.randn(2, 5, 8, 8))
    msg = str(info.value)
    assert "example inputs of shape (2, 5, 8, 8) failed at node 'conv'" in msg
    assert "hint: check the example input shape" in msg


def test_too_many_inputs():
    with pytest.raises(InputError, match="2 example inputs given but the model takes 1"):
        qpasses.trace(SmallNet(), (torch.randn(1, 3, 4, 4), torch.randn(1)))


def test_untraceable_model_names_module_and_line():
    with pytest.raises(TraceError) as info:
        qpasses.trace(DataDependent(), torch.randn(1, 3))
    err = info.value
    assert err.module == "inner.1"
    assert "in module 'inner.1' (Branchy)" in str(err)
    assert "if x.sum() > 0:" in str(err) and "test_trace.py" in err.line
    assert "leaf_modules" in str(err)


def test_leaf_modules_keep_submodules_opaque():
    gm = qpasses.trace(SmallNet(), torch.randn(1, 3, 8, 8), leaf_modules=[nn.Linear])
    assert any(n.op == "call_module" and n.target == "fc" for n in gm.graph.nodes)
    with pytest.raises(InputError, match="leaf_modules must be"):
        qpasses.trace(SmallNet(), torch.randn(1, 3, 8, 8), leaf_modules=[3])
