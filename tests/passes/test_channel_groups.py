"""channel-groups: one small model per coupling rule (residual add, concat, split, depthwise,
grouped, flatten->linear, SE, shuffle, pooling, per-channel params, shared modules), the
unprunable cases (graph input/output, unsupported ops, unmappable reshapes, sizes used as data),
printing, caching, and the fake-quant graph."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qpasses
from passes_registry import AnalysisManager, PassContext, PassManager, lookup_analysis
from qpasses.algorithms.channels import reshape_mapping
from qpasses.analyses.channel_groups import (ChannelGroups, ChannelGroupsAnalysis,
                                             compute_channel_groups)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    from .prune_util import single_thread
    with single_thread():
        yield


def groups_of(model: nn.Module, shape=(1, 3, 8, 8)) -> tuple[torch.fx.GraphModule, ChannelGroups]:
    gm = qpasses.trace(model, (torch.randn(*shape),))
    return gm, compute_channel_groups(gm)


def classes(cg: ChannelGroups, node: str, item: int = -1) -> list[int]:
    return list(cg.tensor_of[(node, item)].classes)


def member(cg: ChannelGroups, node: str, role: str):
    for g in cg.groups:
        for m in g.members:
            if m.node == node and m.role == role:
                return g, m
    raise AssertionError(f"no {role} member at {node}")


# ---------------------------------------------------------------------------------------------
# coupling rules


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 1)
        self.c = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.c(self.b(y) + y).mean((2, 3))


def test_residual_add_couples_all_addends():
    gm, cg = groups_of(Residual())
    assert classes(cg, "a") == classes(cg, "b") == classes(cg, "add")
    g = cg.group_of_layer("a")
    assert g.producers == ("a", "b") and g.num_channels == 6 and g.num_prunable == 6
    roles = {(m.node, m.role) for m in g.members}
    assert {("a", "producer"), ("b", "producer"), ("b", "consumer"), ("c", "consumer"),
            ("add", "tensor")} <= roles
    # the head reaches the graph output: unprunable, with the reason naming it
    gc = cg.group_of_layer("c")
    assert all(r is not None and "graph output" in r for r in gc.reasons)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), torch.relu(self.b(x))], dim=1)).sum((2, 3))


def test_concat_offset_ranges():
    gm, cg = groups_of(Concat())
    assert classes(cg, "cat") == classes(cg, "a") + classes(cg, "relu")
    _, ma = next((g, m) for g in [cg.group_of_layer("a")] for m in g.members
                 if m.node == "c" and m.role == "consumer")
    assert ma.mapping_text() == "[0:4]"
    _, mb = next((g, m) for g in [cg.group_of_layer("b")] for m in g.members
                 if m.node == "c" and m.role == "consumer")
    assert mb.mapping_text() == "[4:10]"
    assert cg.group_of_layer("a").index != cg.group_of_layer("b").index


class Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 5, 1)
        self.c = nn.Conv2d(5, 2, 1)
        self.d = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        p, q = self.a(x).chunk(2, dim=1)
        r, s = torch.split(self.b(x), [3, 2], dim=1)
        return (self.c(torch.cat([p[:, :1], q], 1)) + self.d(s.sum(1, keepdim=True)
                                                              .expand(-1, 3, -1, -1))
                + r.mean(1, keepdim=True)).mean((2, 3))


def test_split_and_chunk_offsets_and_unsupported_slicing():
    gm, cg = groups_of(Split())
    a = classes(cg, "a")
    assert classes(cg, "chunk", 0) == a[:4] and classes(cg, "chunk", 1) == a[4:]
    b = classes(cg, "b")
    assert classes(cg, "split", 0) == b[:3] and classes(cg, "split", 1) == b[3:]
    # p[:, :1] slices channels: unsupported -> the first chunk's channels are unprunable
    reasons = cg.reason_of
    assert all("getitem" in reasons[c] for c in a[:4])
    assert all(c not in reasons for c in a[4:])
    # sum over the channel dim: opaque, the node is named
    assert all("sum" in reasons[c] for c in b[3:])


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.g = nn.Conv2d(8, 6, 1, groups=2)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(self.g(F.relu6(self.dw(F.relu6(self.a(x)))))).mean((2, 3))


def test_depthwise_and_grouped_coupling():
    gm, cg = groups_of(Depthwise())
    a, dw, g = classes(cg, "a"), classes(cg, "dw"), classes(cg, "g")
    assert a == dw                            # depthwise: in j <-> out j
    assert len(set(a)) == 2                   # grouped (2 groups): 4 input channels per unit
    assert set(a[:4]) == {a[0]} and set(a[4:]) == {a[4]} and a[0] != a[4]
    assert g[:3] == [a[0]] * 3 and g[3:] == [a[4]] * 3
    grp = cg.group_of_layer("a")
    assert set(grp.producers) == {"a", "dw", "g"}
    _, m = member(cg, "g", "grouped-in")
    assert m.index_map == ((0, 1, 2, 3), (4, 5, 6, 7))


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        y = F.adaptive_max_pool2d(torch.relu(self.a(x)), 2)
        return self.fc(torch.flatten(y, 1))


def test_flatten_to_linear_block_mapping():
    gm, cg = groups_of(FlattenLinear())
    a = classes(cg, "a")
    assert classes(cg, "flatten") == [c for c in a for _ in range(4)]
    _, m = member(cg, "fc", "consumer")
    assert m.index_map == ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15))
    assert m.mapping_text() == "blocks[4x4]"


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        s = F.hardsigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.out(y * s).mean((2, 3))


def test_squeeze_excitation_multiply_couples_branch_and_main_path():
    gm, cg = groups_of(SE())
    assert classes(cg, "a") == classes(cg, "fc2") == classes(cg, "mul")
    g = cg.group_of_layer("a")
    assert set(g.producers) == {"a", "fc2"}
    assert {"fc1", "out"} <= {m.node for m in g.members if m.role == "consumer"}


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.c(y).mean((2, 3))


def test_channel_shuffle_is_a_permutation_pruned_in_rectangles():
    gm, cg = groups_of(Shuffle())
    a, b = classes(cg, "a"), classes(cg, "b")
    assert a == b                               # coupled across the two shuffle groups
    assert classes(cg, "view_1") == [a[i // 2] for i in range(8)]   # interleaved
    t = cg.tensor_of[("transpose", -1)]
    assert t.block == (4, 2) and t.dim == 1
    assert cg.tensor_of[("view_1", -1)].gather is not None


class Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = nn.functional.max_pool2d(self.a(x), 2)
        y = nn.functional.avg_pool2d(y, 2, padding=1) + F.adaptive_avg_pool2d(y, 3)[:, :, :1, :1]
        return self.c(y).amax((2, 3))


def test_pooling_passes_channels_through():
    gm, cg = groups_of(Pools())
    a = classes(cg, "a")
    assert classes(cg, "max_pool2d") == classes(cg, "avg_pool2d") == a
    # spatial slicing of a pooled tensor is unsupported: conservative, node named
    assert all("getitem" in cg.reason_of[c] for c in a)


class PerChannelParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.gamma = nn.Parameter(torch.rand(4, 1, 1))
        self.act = nn.PReLU(4)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c(self.act(self.a(x) * self.gamma + 1.0)).mean((2, 3))


def test_per_channel_parameters_are_members():
    gm, cg = groups_of(PerChannelParam())
    g = cg.group_of_layer("a")
    params = {(m.node, m.target, m.dim) for m in g.members if m.role == "param"}
    assert ("mul", "gamma", 0) in params and ("act", "act.weight", 0) in params
    assert g.num_prunable == 4


class SharedModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.shared = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([self.shared(self.a(x)), self.shared(self.b(x))], 1)).mean((2, 3))


def test_shared_module_calls_are_coupled():
    gm, cg = groups_of(SharedModule())
    assert classes(cg, "shared") == classes(cg, "shared_1")
    assert classes(cg, "a") == classes(cg, "b")


class Unmappable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.a(x)
        z = y.reshape(-1, y.shape[2], y.shape[3])          # batch and channels merged
        k = self.b(x)
        scale = k.shape[1] * 1.0                           # a size used as data
        return z.sum() + (k * scale).softmax(1).sum()


def test_unmappable_reshape_and_sizes_used_as_data_are_reported():
    gm, cg = groups_of(Unmappable(), shape=(2, 3, 8, 8))
    ra = {cg.reason_of[c] for c in classes(cg, "a")}
    assert len(ra) == 1 and "reshape" in ra.pop()
    rb = {cg.reason_of[c] for c in classes(cg, "b")}
    assert rb and all("uses the size" in r or "softmax" in r for r in rb)


def test_graph_input_channels_are_unprunable():
    gm, cg = groups_of(Residual())
    assert all(cg.reason_of[c] == "graph input 'x'" for c in classes(cg, "x"))


def test_reshape_mapping_cases():
    # flatten: channel c -> block [c*HW, (c+1)*HW)
    d, block, g = reshape_mapping((1, 4, 2, 3), 1, (4,), (1, 24))
    assert (d, block) == (1, (24,)) and list(g[:7]) == [0] * 6 + [1]
    # view splitting the channel dim
    d, block, g = reshape_mapping((1, 8, 2, 2), 1, (8,), (1, 2, 4, 2, 2))
    assert (d, block) == (1, (2, 4)) and list(g) == list(range(8))
    # merged with the batch dim (batch 2): not a block of channels
    assert reshape_mapping((2, 4, 3, 3), 1, (4,), (8, 9)) is None
    # trailing dims reshaped, channel kept
    d, block, g = reshape_mapping((1, 4, 2, 3), 1, (4,), (1, 4, 6))
    assert (d, block) == (1, (4,)) and list(g) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------
# infrastructure


def test_registered_printable_cached_and_deterministic():
    cls = lookup_analysis("channel-groups")
    assert cls is ChannelGroupsAnalysis and cls.depends_on == frozenset({"structure"})
    gm = qpasses.trace(Concat(), (torch.randn(1, 3, 8, 8),))
    am = AnalysisManager()
    r1 = am.get("channel-groups", gm)
    assert am.get("channel-groups", gm) is r1
    assert compute_channel_groups(gm) == r1
    text = str(r1)
    assert text.startswith("2 channel groups") or "channel groups" in text.splitlines()[0]
    assert "producer   a (a.weight) dim 0 [0:4]" in text
    assert "consumer   c (c.weight) dim 1 [4:10]" in text
    buf = io.StringIO()
    PassManager.parse("graph(print<channel-groups>)").run(gm, PassContext(print_stream=buf))
    assert "group 0:" in buf.getvalue()


def test_torchvision_models_mostly_prunable():
    import torchvision
    for fn in (torchvision.models.resnet18, torchvision.models.mobilenet_v3_small):
        gm, cg = groups_of(fn().eval(), shape=(1, 3, 32, 32))
        reasons = {r.split("'")[0] for _, r in cg.class_reasons}
        assert reasons <= {"graph input ", "reaches the graph output ("}, reasons
        # everything but the classifier's 1000 outputs (they reach the graph output)
        assert cg.num_prunable_classes == sum(g.num_channels for g in cg.groups) - 1000


def test_fake_quant_graph_is_understood():
    from passes_registry import pass_names
    if "insert-fake-quant" not in pass_names():
        pytest.skip("insert-fake-quant is not registered")
    x = torch.randn(2, 3, 8, 8)
    gm = qpasses.trace(SE(), (x,))
    gm = PassManager.parse("graph(annotate-bitwidths{weight-bits=4 act-bits=8 granularity=kernel "
                           "first-last-bits=none},insert-fake-quant,calibrate)").run(
        gm, PassContext(example_inputs=(x,), calibration_data=[x]))
    cg = compute_channel_groups(gm)
    g = cg.group_of_layer("a")
    assert g is not None and set(g.producers) == {"a", "fc2"} and g.num_prunable == 8
