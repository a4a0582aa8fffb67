"""Shape propagation on meta tensors (qpasses.ir.meta_prop) records exactly what the real run does.

``propagate_shapes(gm, x)`` (and so ``qpasses.trace``) runs the graph on meta tensors and falls
back to the real forward where the meta run is refused. Every test compares the records
(``tensor_meta`` with shapes, dtypes, strides, memory formats, and ``type``) of both ways on the
same graph, and checks which way was taken, so a silent difference or a lost speed-up both fail.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qpasses
from qpasses.errors import InputError
from qpasses.ir.meta_prop import MetaPropUnsupported, meta_propagate
from qpasses.ir.trace import propagate_shapes
from tools.zoo_models import build

_KEYS = ("tensor_meta", "type")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _records(gm: torch.fx.GraphModule) -> dict[str, tuple]:
    return {n.name: tuple(n.meta.get(k) for k in _KEYS) for n in gm.graph.nodes}


def _clear(gm: torch.fx.GraphModule) -> None:
    for n in gm.graph.nodes:
        for k in _KEYS:
            n.meta.pop(k, None)


def _real_and_meta(gm: torch.fx.GraphModule, inputs: tuple) -> tuple[dict, dict | None]:
    """The records of the real run, and those of the meta run (None when it was refused)."""
    _clear(gm)
    propagate_shapes(gm, inputs, fast=False)
    real = _records(gm)
    _clear(gm)
    try:
        meta_propagate(gm, inputs)
    except MetaPropUnsupported:
        assert all(v == (None, None) for v in _records(gm).values()), "records not restored"
        return real, None
    return real, _records(gm)


# CNNs the meta run covers (no permutes before a conv, no fused attention): same records
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small",
                                  "efficientnet_b0", "regnet_x_400mf", "squeezenet1_1",
                                  "googlenet", "mnasnet0_5"])
def test_meta_records_equal_real_records_on_zoo_cnns(name):
    model, x = build(name)
    gm = qpasses.trace(model, x)
    real, meta = _real_and_meta(gm, (x,))
    assert meta is not None, "the meta run was refused"
    assert meta == real
    assert sum(r[0] is not None for r in real.values()) >= len(real) // 2   # records exist


# Models where the meta kernels would choose another layout (a conv on a permuted tensor in
# ConvNeXt; the fused attention path of nn.MultiheadAttention in ViT): refused, and the real
# records are kept
@pytest.mark.parametrize("name", ["convnext_tiny", "vit_b_16"])
def test_layout_sensitive_models_fall_back_to_the_real_run(name):
    model, x = build(name)
    gm = qpasses.trace(model, x)
    real, meta = _real_and_meta(gm, (x,))
    assert meta is None
    _clear(gm)
    propagate_shapes(gm, (x,))          # fast=True: refused, then the real run
    assert _records(gm) == real


class ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).relu()


def test_channels_last_input_is_refused():
    model = ChannelsLast().eval()
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    gm = qpasses.trace(model, x)
    real, meta = _real_and_meta(gm, (x,))
    assert meta is None
    assert real["conv"][0].memory_format == torch.channels_last


class DataDependentShape(nn.Module):
    def forward(self, x):
        return torch.nonzero(x > 0)      # the output's shape depends on the values


class Counter(nn.Module):
    """Writes attributes during forward: the meta run must leave them as they were."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        self.calls += 1
        self.last = x
        return x * 2


class WithCounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.counter = Counter()
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("offset", torch.ones(4))
        self.weight = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return self.bn(self.counter(x)) + self.offset * self.weight


def test_data_dependent_op_is_refused_and_the_real_run_records_it():
    x = torch.tensor([[1.0, -1.0], [2.0, 3.0]])
    gm = qpasses.trace(DataDependentShape(), x)     # fast path refused inside trace
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.nonzero]
    assert tuple(node.meta["tensor_meta"].shape) == (3, 2)
    real, meta = _real_and_meta(gm, (x,))
    assert meta is None


def test_module_state_untouched_and_parameters_recorded_as_parameters():
    model = WithCounter().eval()
    gm = qpasses.trace(model, torch.randn(3, 4), leaf_modules=[Counter])
    counter = gm.get_submodule("counter")
    assert counter.calls == 0 and "last" not in vars(counter)   # trace's meta run wrote nothing
    x = torch.randn(3, 4)
    propagate_shapes(gm, (x,), fast=False)
    real = _records(gm)
    assert counter.calls == 1 and counter.last is x              # the real run did
    attrs = dict(vars(counter))
    running = gm.get_submodule("bn").running_mean.clone()
    _clear(gm)
    meta_propagate(gm, (x,))
    assert _records(gm) == real
    assert vars(counter) == attrs and counter.last is x
    assert torch.equal(gm.get_submodule("bn").running_mean, running)
    assert real["weight"][1] is nn.Parameter and real["weight"][0].requires_grad
    assert real["offset"][1] is torch.Tensor


def test_input_that_does_not_fit_gives_the_real_runs_typed_error():
    model = ChannelsLast().eval()
    gm = qpasses.trace(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(InputError, match="failed at node 'conv'"):
        propagate_shapes(gm, (torch.randn(1, 5, 8, 8),))


def test_requires_grad_input_and_dtypes_recorded_as_the_real_run():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(inplace=True), nn.Hardtanh()).eval()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    gm = qpasses.trace(model.double(), x)
    real, meta = _real_and_meta(gm, (x,))
    assert meta == real
    assert real["input_1" if "input_1" in real else next(iter(real))][0].requires_grad


def test_training_mode_is_refused_so_dropout_draws_as_in_the_real_run():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()
    gm = qpasses.trace(model, torch.randn(2, 4))
    gm.train()
    with pytest.raises(MetaPropUnsupported, match="training mode"):
        meta_propagate(gm, (torch.randn(2, 4),))
    torch.manual_seed(0)
    propagate_shapes(gm, (torch.randn(2, 4),))
    after_fast = torch.rand(1)
    torch.manual_seed(0)
    propagate_shapes(gm, (torch.randn(2, 4),), fast=False)
    assert torch.equal(torch.rand(1), after_fast)     # the same random numbers were drawn


def test_module_with_forward_hook_is_refused_so_the_hook_sees_real_values():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o))
    gm = qpasses.trace(model, torch.randn(2, 4))
    assert seen and all(t.device.type == "cpu" for t in seen)
    with pytest.raises(MetaPropUnsupported, match="hooks"):
        meta_propagate(gm, (torch.randn(2, 4),))
