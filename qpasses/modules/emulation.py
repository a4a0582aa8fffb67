"""Emulation of the integer graph inside a fake-quant graph (``emulate-int-sim``, docs/int-sim.md,
"Emulation: train what you deploy").

An emulating graph is the fake-quant graph plus

- one :class:`IntSimEmulation` node right after the inputs, which runs the integer graph that
  ``lower-to-int-sim`` makes of the *current* fake-quant graph (relowered whenever a weight or
  quantizer parameter changed, e.g. after an optimizer step) and returns the value of every
  quantization point and output;
- after every activation quantizer, an :func:`emulate_point` node (it takes the quantizer's node
  name; the quantizer node itself is renamed ``<name>_fq``) whose value is the integer graph's
  codes at that point, dequantized as the fake quantizer does (``s·(q − z)`` in float32), and whose
  gradient is the fake quantizer's own (straight-through, LSQ, PACT: whatever the quantizer
  computes in backward);
- an :func:`emulate_output` node before the output with the integer graph's (dequantized) outputs;
- an ``emulation=`` argument to each fake-quant conv/linear called once: the layer takes its value
  from the integer layer's accumulator (scaled to real units, plus its float bias) instead of a
  second GEMM, with its own gradients
  (:data:`~qpasses.modules.fake_quant_layers.EMULATED_ACCUMULATORS`).

So every quantization point and output computes exactly what the lowered graph computes under the
recorded contract (the :class:`~qpasses.ir.records.EmulationRecord`), by construction: the values
*are* the lowering's, with its own decisions (grids, bias fractional bits, fused requantization,
pool and add arithmetic, lookup tables). :func:`strip_emulation` gives back the plain fake-quant
graph (``lower-fake-quant-ops`` does this before it lowers an emulating graph).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from qpasses.numerics.fixed_point import channel_view
from qpasses.modules.fake_quant_layers import EMULATED_ACCUMULATORS, is_fake_quant_layer
from qpasses.modules.tensor_keys import tensor_versions
from qpasses.modules.int_sim_layers import IntLayer

__all__ = ["EMULATION_MODULE", "IntSimEmulation", "emulate_output", "emulate_point",
           "emulation_points", "install_emulation", "is_emulating", "strip_emulation"]

# the submodule of an emulating graph holding the IntSimEmulation engine
EMULATION_MODULE = "int_sim_emulation"

Lower = Callable[[torch.fx.GraphModule], tuple[torch.fx.GraphModule, dict[str, dict[str, Any]]]]


class _TakeValue(torch.autograd.Function):
    """Forward: the emulated value ``v`` (exactly); backward: the gradient goes to ``y`` (the
    fake-quant value) unchanged."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, v: Tensor) -> Tensor:  # noqa: D401
        return v.to(y.dtype).clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return g, None


def _take(y: Any, v: Any) -> Any:
    if not isinstance(y, Tensor) or not isinstance(v, Tensor) or y.shape != v.shape:
        return y
    if torch.is_grad_enabled() and y.requires_grad:
        return _TakeValue.apply(y, v)
    return v.to(y.dtype).clone()


def emulate_point(y: Any, values: dict[str, Any], name: str) -> Any:
    """The value of quantization point ``name``: the integer graph's (``values[name]``) in the
    forward pass, the fake quantizer's gradient in the backward pass; ``y`` where the integer
    graph has no value for it."""
    return _take(y, values.get(name))


def emulate_output(y: Any, values: dict[str, Any]) -> Any:
    """The graph outputs: the integer graph's (dequantized) outputs, gradients straight through
    to the fake-quant outputs."""
    leaves, spec = torch.utils._pytree.tree_flatten(y)
    ints = values.get("__outputs__") or []
    if len(ints) != len(leaves):
        return y
    return torch.utils._pytree.tree_unflatten([_take(a, b) for a, b in zip(leaves, ints)], spec)


class IntSimEmulation(nn.Module):
    """Runs the integer graph of the current fake-quant graph and returns its values by
    quantization point (float32, as the fake quantizers dequantize) plus ``"__outputs__"``.

    ``plain`` is the fake-quant graph without the emulation nodes; it shares its layers and
    quantizers with the emulating graph (not registered as submodules here, so the state dict has
    no duplicates). ``lower`` lowers a copy of it under the recorded contract and returns
    ``(integer graph, fq_map)``; it is relowered when any parameter or buffer of ``plain`` changed
    (tensor version counters: optimizer steps, observer updates)."""

    def __init__(self, plain: torch.fx.GraphModule, lower: Lower) -> None:
        super().__init__()
        self.__dict__["plain"] = plain
        self.__dict__["lower"] = lower
        self.__dict__["_cache"] = None
        self.__dict__["_sinks"] = {}
        self.__dict__["_accs"] = {}
        self.num_lowerings = 0
        # module paths of the fake-quant layers that take the integer graph's accumulator
        self.accumulating: set[str] = set()

    def _key(self) -> tuple[tuple, list[Tensor]]:
        """Parameter versions (bumped by optimizer steps) and copies of the buffers (quantizer
        scales, zero points: small; their observers may rewrite them with equal values)."""
        return (tensor_versions(*self.plain.parameters()),
                [b.detach().clone() for b in self.plain.buffers()])

    def _fresh(self, key: tuple[tuple, list[Tensor]]) -> bool:
        cache = self.__dict__["_cache"]
        if cache is None or cache[0][0] != key[0] or len(cache[0][1]) != len(key[1]):
            return False
        return all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(cache[0][1], key[1]))

    def lowered(self) -> tuple[torch.fx.GraphModule, dict[str, tuple[float, int]]]:
        """The integer graph of the current weights (cached) and its points:
        fake-quant node -> (scale, zero point); its outputs are (graph outputs, point codes)."""
        key = self._key()
        if self._fresh(key):
            cache = self.__dict__["_cache"]
            return cache[1], cache[2]
        gm, fq_map = self.lower(self.plain)
        points = _expose_points(gm, fq_map)
        self._attach_sinks(gm)
        self.__dict__["_cache"] = (self._key(), gm, points)
        self.num_lowerings += 1
        return gm, points

    def _attach_sinks(self, gm: torch.fx.GraphModule) -> None:
        """Make each integer layer whose fake-quant layer takes the engine's values (an
        ``emulation=`` argument in the emulating graph) hand its accumulator over."""
        sinks: dict[int, tuple[nn.Module, Tensor]] = {}
        for path, mod in gm.named_modules():
            if not isinstance(mod, IntLayer) or path not in self.accumulating or \
                    getattr(mod, "acc_scale", None) is None:
                continue
            fq = self.plain.get_submodule(path)
            sinks[id(mod)] = (fq, mod.acc_scale.detach().to(torch.float32).reshape(-1))
            mod.acc_sink = self._collect
        self.__dict__["_sinks"] = sinks

    def _collect(self, layer: IntLayer, acc: Tensor) -> None:
        fq, scale = self.__dict__["_sinks"][id(layer)]
        accs = self.__dict__["_accs"]
        # a layer run twice in one forward: ambiguous, its fake-quant layer convolves itself
        accs[fq] = None if fq in accs else acc.mul_(
            channel_view(scale, acc, layer.channel_axis, "acc_scale"))

    def forward(self, *inputs: Any) -> dict[str, Any]:
        gm, points = self.lowered()
        self.__dict__["_accs"] = {}
        with torch.no_grad():
            outs, codes = gm(*[x.detach() if isinstance(x, Tensor) else x for x in inputs])
        accs, self.__dict__["_accs"] = self.__dict__["_accs"], {}
        values: dict[str, Any] = {}
        for (name, (scale, zp)), q in zip(points.items(), codes):
            # s·(q − z) as the fake quantizer: q − z is exact in float32 (|q − z| < 2^24), then
            # one float32 product
            values[name] = q.to(torch.float32).sub_(zp).mul_(
                torch.tensor(scale, dtype=torch.float32, device=q.device))
        values["__outputs__"] = torch.utils._pytree.tree_flatten(outs)[0]
        values[EMULATED_ACCUMULATORS] = {m: a for m, a in accs.items() if a is not None}
        return values

    def __deepcopy__(self, memo: dict[int, Any]) -> "IntSimEmulation":
        import copy
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_sinks", "_accs")}
        new.__dict__.update(copy.deepcopy(state, memo))
        new.__dict__.update(_cache=None, _sinks={}, _accs={})
        return new

    def extra_repr(self) -> str:
        return f"lowerings={self.num_lowerings}"


def _expose_points(gm: torch.fx.GraphModule, fq_map: dict[str, dict[str, Any]]
                   ) -> dict[str, tuple[float, int]]:
    """Make the lowered graph return ``(outputs, [codes of each point])``; the codes are cloned
    where they are produced (the fast backend may reuse or update buffers in place later)."""
    g = gm.graph
    by_name = {n.name: n for n in g.nodes}
    out = next(n for n in g.nodes if n.op == "output")
    points: dict[str, tuple[float, int]] = {}
    clones = []
    for fq_name, m in fq_map.items():
        node = by_name.get(m["node"])
        if node is None:
            continue
        with g.inserting_after(node):
            c = g.call_method("clone", (node,))
        clones.append(c)
        points[fq_name] = (float(m["scale"]), int(m["zero_point"]))
    orig = out.args[0]
    with g.inserting_before(out):
        new_out = g.output((orig, clones))
    g.erase_node(out)
    del new_out
    gm.recompile()
    return points


def is_emulating(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` holds emulation nodes."""
    return any(n.op == "call_function" and n.target in (emulate_point, emulate_output)
               for n in gm.graph.nodes)


def emulation_points(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the emulated quantization points of an emulating graph."""
    return [n.name for n in gm.graph.nodes
            if n.op == "call_function" and n.target is emulate_point]


def install_emulation(gm: torch.fx.GraphModule, points: list[str], lower: Lower) -> IntSimEmulation:
    """Rewrite the fake-quant graph ``gm`` in place into an emulating graph (module docstring):
    an engine node after the inputs, an :func:`emulate_point` after each node in ``points`` (which
    takes over its name) and an :func:`emulate_output` before the output. Returns the engine."""
    plain = torch.fx.GraphModule(gm, _copy_graph(gm.graph))
    plain.meta.update(gm.meta)
    engine = IntSimEmulation(plain, lower)
    old, new = gm.graph, torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    wanted = set(points)
    phs = [n for n in old.nodes if n.op == "placeholder"]
    emu: torch.fx.Node | None = None
    layer_calls = Counter(str(n.target) for n in old.nodes if n.op == "call_module")

    def arg(a: torch.fx.Node) -> torch.fx.Node:
        return env[a.name]

    for n in old.nodes:
        if n.op != "placeholder" and emu is None:
            emu = new.create_node("call_module", EMULATION_MODULE,
                                  tuple(env[p.name] for p in phs), name="int_sim_values")
        if n.op == "output":
            assert emu is not None
            o = new.create_node("call_function", emulate_output,
                                (torch.fx.node.map_arg(n.args[0], arg), emu), name="emulated_output")
            new.output(o, type_expr=n.type)
        elif n.name in wanted:
            assert emu is not None
            fq = new.create_node(n.op, n.target, torch.fx.node.map_arg(n.args, arg),
                                 torch.fx.node.map_arg(n.kwargs, arg), name=f"{n.name}_fq")
            fq.meta = dict(n.meta)
            name = n.name
            p = new.create_node("call_function", emulate_point, (fq, emu, name), name=name)
            if "tensor_meta" in n.meta:
                p.meta["tensor_meta"] = n.meta["tensor_meta"]
            env[n.name] = p
        elif _takes_accumulator(gm, n, layer_calls):
            assert emu is not None
            c = new.node_copy(n, arg)
            c.kwargs = {"emulation": emu}
            engine.accumulating.add(str(n.target))
            env[n.name] = c
        else:
            env[n.name] = new.node_copy(n, arg)
    if hasattr(gm, EMULATION_MODULE):
        delattr(gm, EMULATION_MODULE)
    gm.add_module(EMULATION_MODULE, engine)
    gm.graph = new
    gm.recompile()
    return engine


def _takes_accumulator(gm: torch.fx.GraphModule, n: torch.fx.Node,
                       layer_calls: dict[str, int]) -> bool:
    """A fake-quant conv/linear called once, with one argument: its value can come from the
    integer graph's accumulator of the same layer (its gradient stays its own)."""
    if n.op != "call_module" or len(n.args) != 1 or n.kwargs or layer_calls[str(n.target)] != 1:
        return False
    mod = gm.get_submodule(str(n.target))
    return is_fake_quant_layer(mod) and getattr(mod, "padding_mode", "zeros") == "zeros" and \
        not isinstance(getattr(mod, "padding", ()), str)


def strip_emulation(gm: torch.fx.GraphModule) -> bool:
    """Remove the emulation nodes and the engine in place (each quantizer node gets its name
    back): the plain fake-quant graph. Returns whether there was anything to remove."""
    if not is_emulating(gm):
        return False
    old, new = gm.graph, torch.fx.Graph()
    env: dict[str, Any] = {}
    renames = {n.args[0].name: n.name for n in old.nodes
               if n.op == "call_function" and n.target is emulate_point}

    def arg(a: torch.fx.Node) -> Any:
        return env[a.name]

    for n in old.nodes:
        if n.op == "call_module" and n.target == EMULATION_MODULE:
            env[n.name] = None
        elif n.op == "call_function" and n.target is emulate_point:
            env[n.name] = env[n.args[0].name]
        elif n.op == "call_function" and n.target is emulate_output:
            env[n.name] = torch.fx.node.map_arg(n.args[0], arg)
        elif n.op == "call_module" and "emulation" in n.kwargs:
            c = new.node_copy(n, arg)
            c.kwargs = {k: v for k, v in c.kwargs.items() if k != "emulation"}
            env[n.name] = c
        elif n.name in renames:
            c = new.create_node(n.op, n.target, torch.fx.node.map_arg(n.args, arg),
                                torch.fx.node.map_arg(n.kwargs, arg), name=renames[n.name])
            c.meta = dict(n.meta)
            env[n.name] = c
        else:
            env[n.name] = new.node_copy(n, arg)
    if hasattr(gm, EMULATION_MODULE):
        delattr(gm, EMULATION_MODULE)
    gm.graph = new
    gm.recompile()
    return True


def _copy_graph(g: torch.fx.Graph) -> torch.fx.Graph:
    new = torch.fx.Graph()
    out = new.graph_copy(g, {})
    old_out = next(n for n in g.nodes if n.op == "output")
    new.output(out, type_expr=old_out.type)
    return new
