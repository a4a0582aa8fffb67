"""qpasses.ir.graph_runner.run_graph evaluates a GraphModule like torch.fx.Interpreter: same
values for every node, hooks that observe and replace values, values freed after their last use."""
from __future__ import annotations

import torch
from torch import nn

from qpasses.ir.graph_runner import run_graph


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("offset", torch.arange(4.0).reshape(1, 4, 1, 1))

    def forward(self, x: torch.Tensor, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(self.conv(x)) + self.offset
        z = y.flatten(1).sum(1, keepdim=True) * scale
        return y.permute(0, 2, 3, 1), z


def test_values_equal_the_interpreter_and_the_module():
    gm = torch.fx.symbolic_trace(_Net().eval())
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    seen: dict[str, object] = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node):
            v = super().run_node(n)
            seen[n.name] = v
            return v

    with torch.no_grad():
        want = Rec(gm).run(x)
        got_seen: dict[str, object] = {}
        got = run_graph(gm, (x,), lambda n, v: got_seen.setdefault(n.name, v))
        direct = gm(x)
    assert set(got_seen) == set(seen)                       # every node, the output included
    for name, v in seen.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(got_seen[name], v), name
    for a, b, c in zip(got, want, direct):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_a_hook_replaces_values_downstream_and_defaults_fill_missing_inputs():
    gm = torch.fx.symbolic_trace(_Net().eval())
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    conv = next(n.name for n in gm.graph.nodes if n.op == "call_module")

    def zero_conv(n: torch.fx.Node, v):
        return torch.zeros_like(v) if n.name == conv else v

    with torch.no_grad():
        y, z = run_graph(gm, (x,), zero_conv)                # scale: its default 2.0
    off = torch.arange(4.0).reshape(1, 4, 1, 1).expand(1, 4, 4, 4)
    assert torch.equal(y, off.permute(0, 2, 3, 1))
    assert torch.equal(z, off.flatten(1).sum(1, keepdim=True) * 2.0)


def test_values_are_dropped_after_their_last_use():
    gm = torch.fx.symbolic_trace(_Net().eval())
    x = torch.randn(1, 3, 4, 4)
    refs: list = []

    def hook(n: torch.fx.Node, v):
        if n.op == "call_module":
            import weakref
            refs.append(weakref.ref(v))
        return v

    with torch.no_grad():
        run_graph(gm, (x,), hook)
    assert refs and refs[0]() is None                       # the conv output was freed
