"""The builder: one walk over the fake-quant graph that emits the integer graph
(:class:`GraphLowering`), and :func:`build_int_sim_graph`, which runs it and installs the result."""
from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from qpasses.ir.annotations import QMETA_KEY, get_qmeta, update_qmeta
from qpasses.modules.fake_quant import ActFakeQuant, WeightFakeQuant
from qpasses.modules.fake_quant_layers import is_fake_quant_layer
from qpasses.modules.int_sim import Dequantize, Quantize, Requantize, set_backend
from qpasses.modules.int_sim_layers import IntLayer
from qpasses.modules.int_sim_ops import IntClamp
from qpasses.numerics.fixed_point import fbgemm_scale
from qpasses.algorithms.lowering.affine import AffineRules, is_shape_query
from qpasses.algorithms.lowering.constants import ConstRules
from qpasses.algorithms.lowering.affine_exact import (ExactAffineChains, ExactAffineConstants,
                                                     exact_affine_chains)
from qpasses.algorithms.lowering.config import (INT32_MAX, INT_SIM_CONTAINER, FloatIsland,
                                                LoweringOptions, QType, Rep)
from qpasses.algorithms.lowering.joins import JoinRules
from qpasses.algorithms.lowering.layers import LayerRules
from qpasses.algorithms.lowering.luts import LutRules
from qpasses.algorithms.lowering.nodes import f32, fake_quant_code
from qpasses.ir.fx import is_tensor_node, node_arg
from qpasses.ir.ops import target_name
from qpasses.ir import ops
from qpasses.algorithms.lowering.pools import ClampPoolRules
from qpasses.algorithms.lowering.pads import PAD_FUNCTIONS, PadRules, zero_pad_reason
from qpasses.algorithms.lowering.ranges import observe_ranges, range_candidates
from qpasses.algorithms.lowering.record import fake_quant_graph, new_record
from qpasses.algorithms.lowering.shapes import ShapeRules
from qpasses.algorithms.lowering.transformer import TransformerRules

__all__ = ["GraphLowering", "build_int_sim_graph"]

Node = torch.fx.Node


class GraphLowering(LayerRules, ClampPoolRules, PadRules, ShapeRules, JoinRules, LutRules,
                    TransformerRules, AffineRules, ConstRules, ExactAffineConstants,
                    ExactAffineChains):
    """Builds the integer graph of a calibrated fake-quant graph in one topological walk.

    Every fake-quant value gets a :class:`Rep` in ``env`` (an integer tensor on a :class:`QType`
    grid, or a float tensor); :meth:`run` emits the new nodes into ``new`` and collects the
    integer-simulation modules in ``int_modules`` (installed under ``INT_SIM_CONTAINER``) and the
    integer layers in ``layer_swaps`` (installed at the float layers' paths). The op rules live in
    the mixins by family (layers, clamps and pools, shape ops, joins, lookup tables); a rule that
    cannot lower its node raises :class:`FloatIsland` and the node runs in float. ``stats``,
    ``kernels``, ``islands`` and ``fq_map`` go into the graph's int-sim record.
    """

    def __init__(self, gm: torch.fx.GraphModule, options: LoweringOptions,
                 ranges: dict[str, tuple[float, float]] | None = None,
                 origin: str = "lower-fake-quant-ops") -> None:
        self.gm, self.options, self.origin = gm, options, origin
        self.old = gm.graph
        self.new = torch.fx.Graph()
        self.env: dict[str, Rep] = {}
        self.modules = dict(gm.named_modules())
        self.int_modules: dict[str, nn.Module] = {}
        self.layer_swaps: dict[str, IntLayer] = {}
        self.dequant_cache: dict[str, Node] = {}
        self.islands: list[dict[str, str]] = []
        self.ranges = ranges or {}
        self.stats: dict[str, int] = {"num_int_layers": 0, "num_requantize": 0,
                                      "num_quantize": 0, "num_dequantize": 0, "num_luts": 0,
                                      "num_float_islands": 0, "num_int_adds": 0, "num_int_cats": 0,
                                      "num_int_muls": 0, "num_pools": 0, "num_clamps": 0}
        self.kernels: dict[str, int] = {}
        # fake-quant activation node -> (integer node, scale, zero point): the quantization
        # points where verify-int-sim compares codes with the fake-quant graph
        self.fq_map: dict[str, dict[str, Any]] = {}

    # -- helpers -------------------------------------------------------------------------------

    def module_of(self, n: Node) -> Any:
        """The module ``n`` calls in the fake-quant graph (None unless ``call_module``)."""
        return self.modules.get(str(n.target)) if n.op == "call_module" else None

    def add_int_module(self, key: str, mod: nn.Module) -> str:
        """Add ``mod`` to the container under a unique key derived from ``key``; its target."""
        key = key.replace(".", "_") or "m"
        base, i = key, 0
        while key in self.int_modules:
            i += 1
            key = f"{base}_{i}"
        self.int_modules[key] = mod
        return f"{INT_SIM_CONTAINER}.{key}"

    def emit(self, op: str, target: Any, args: tuple, kwargs: dict | None = None,
             name: str | None = None, like: Node | None = None, is_int: bool = True) -> Node:
        """A new node; with ``like``, a copy of its meta (no QMeta), dtype int64 or float32."""
        node = self.new.create_node(op, target, tuple(args), dict(kwargs or {}), name=name)
        if like is not None:
            for k, v in like.meta.items():
                if k == QMETA_KEY:
                    continue
                node.meta[k] = v
            tm = node.meta.get("tensor_meta")
            if tm is not None and hasattr(tm, "_replace") and hasattr(tm, "dtype"):
                node.meta["tensor_meta"] = tm._replace(
                    dtype=torch.int64 if is_int else torch.float32)
            node.meta.pop("val", None)
        return node

    def call_int(self, key: str, mod: nn.Module, args: tuple, like: Node | None,
                 name: str | None = None) -> Node:
        """Emit a ``call_module`` of the new integer-simulation module ``mod``."""
        target = self.add_int_module(key, mod)
        return self.emit("call_module", target, args, name=name or key.replace(".", "_"),
                         like=like, is_int=not getattr(mod, "produces_float", False))

    def fq_qtype(self, mod: ActFakeQuant) -> QType:
        """The grid of an activation fake quantizer."""
        scale, zp = mod.qparams()
        return QType((float(scale.reshape(-1)[0]),), int(zp.reshape(-1)[0]), int(mod.qmin),
                     int(mod.qmax))

    def clamp_codes(self, qt: QType, lo: float | None, hi: float | None) -> tuple[int, int]:
        """Per-tensor code bounds of a real clamp on grid ``qt`` (fake-quant arithmetic)."""
        s, z = qt.scale[0], qt.zero_point
        a = qt.qmin if lo is None else min(max(qt.qmin, fake_quant_code(lo, s, z)), qt.qmax)
        b = qt.qmax if hi is None else min(max(qt.qmin, fake_quant_code(hi, s, z)), qt.qmax)
        return a, max(a, b)

    def materialize(self, rep: Rep, like: Node | None) -> Rep:
        """Apply a pending clamp as an IntClamp node."""
        if not rep.is_int or not rep.pending:
            return rep
        qt = rep.qt
        assert qt is not None
        if not qt.per_channel:
            a, b = self.clamp_codes(qt, rep.lo, rep.hi)
            lo_t, hi_t = torch.tensor([a]), torch.tensor([b])
            new_qt = replace(qt, qmin=a, qmax=b)
        else:
            s = torch.tensor(qt.scale, dtype=torch.float64)
            lo_t = (torch.full_like(s, qt.qmin, dtype=torch.float64) if rep.lo is None
                    else torch.round(rep.lo / s)).to(torch.int64).clamp(qt.qmin, qt.qmax)
            hi_t = (torch.full_like(s, qt.qmax, dtype=torch.float64) if rep.hi is None
                    else torch.round(rep.hi / s)).to(torch.int64).clamp(qt.qmin, qt.qmax)
            hi_t = torch.maximum(hi_t, lo_t)
            new_qt = replace(qt, qmin=int(lo_t.min()), qmax=int(hi_t.max()))
        name = f"{rep.node.name}_clamp"
        node = self.call_int(name, IntClamp(lo_t, hi_t, qt.axis), (rep.node,), like, name)
        self.stats["num_clamps"] += 1
        return Rep(node, new_qt)

    def as_float(self, rep: Rep, like: Node | None) -> Node:
        """A float node for a value (dequantizing integers, cached)."""
        if rep.value or not rep.is_int:
            return rep.node
        rep = self.materialize(rep, like)
        key = rep.node.name
        if key not in self.dequant_cache:
            qt = rep.qt
            assert qt is not None
            mod = Dequantize(qt.scale, qt.zero_point, qt.axis)
            name = f"{rep.node.name}_dequant"
            self.dequant_cache[key] = self.call_int(name, mod, (rep.node,), like, name)
            self.stats["num_dequantize"] += 1
        return self.dequant_cache[key]

    def map_args(self, n: Node, how: Callable[[Rep, Node], Any]) -> tuple[tuple, dict]:
        def f(a: Node) -> Any:
            return how(self.env[a.name], a)
        return (torch.fx.node.map_arg(n.args, f), torch.fx.node.map_arg(n.kwargs, f))

    def tensor_inputs(self, n: Node) -> list[Node]:
        """The inputs of ``n`` that are tensors."""
        return [a for a in n.all_input_nodes if is_tensor_node(a)]

    # -- float islands ---------------------------------------------------------------------------

    def float_op(self, n: Node, reason: str | None) -> Rep:
        """Copy ``n`` as a float op: integer inputs are dequantized first."""
        ins = [self.env[a.name] for a in n.all_input_nodes]
        in_region = any(r.is_int or r.island is not None for r in ins)
        args, kwargs = self.map_args(n, lambda r, a: self.as_float(r, a))
        node = self.emit(n.op, n.target, args, kwargs, name=n.name, like=n, is_int=False)
        if QMETA_KEY in n.meta:
            node.meta[QMETA_KEY] = n.meta[QMETA_KEY]
        value = not is_tensor_node(n)
        # the reason annotate-bitwidths gave (e.g. why an attention was not decomposed) says more
        # than the lowering's generic one
        reason = get_qmeta(n).float_island or reason
        if reason is None and not in_region:
            return Rep(node, value=value)   # prologue: float before the input quantize
        root = reason
        if reason is None:
            root = next((r.island for r in ins if r.island), None) or \
                "dequantized integer input"
            reason = f"input computed in float ({root})"
        update_qmeta(node, origin=self.origin, float_island=reason)
        self.islands.append({"node": n.name, "op": target_name(n), "reason": reason})
        self.stats["num_float_islands"] += 1
        return Rep(node, island=root, value=value)

    # -- main loop -------------------------------------------------------------------------------

    def run(self) -> None:
        """Walk the fake-quant graph in order and emit the integer graph into ``new``."""
        for n in self.old.nodes:
            if n.op == "placeholder":
                node = self.emit("placeholder", n.target, n.args, n.kwargs, name=n.name, like=n,
                                 is_int=False)
                self.env[n.name] = Rep(node)
            elif n.op == "output":
                args, kwargs = self.map_args(n, self._output_value)
                self.new.create_node("output", "output", args, kwargs)
            elif n.op == "get_attr":
                node = self.emit("get_attr", n.target, (), name=n.name, like=n, is_int=False)
                self.env[n.name] = Rep(node, value=not is_tensor_node(n))
            else:
                try:
                    self.env[n.name] = self.lower_node(n)
                except FloatIsland as e:
                    self.env[n.name] = self.float_op(n, str(e))

    def _output_value(self, rep: Rep, a: Node) -> Any:
        if rep.value or not rep.is_int:
            return rep.node
        return self.as_float(rep, a)

    def lower_node(self, n: Node) -> Rep:
        """The representation of one computing node: quantizers and layers, then values, then ops
        on integer inputs (:meth:`lower_int_op`); float inputs stay float."""
        mod = self.module_of(n)
        ins = [self.env[a.name] for a in n.all_input_nodes]
        if isinstance(mod, WeightFakeQuant):
            return self.float_op(n, None)
        if isinstance(mod, ActFakeQuant):
            return self.lower_fake_quant(n, mod)
        if mod is not None and is_fake_quant_layer(mod):
            return self.lower_layer(n, mod)
        # non-tensor results: shape queries read integer tensors as they are; anything that
        # could depend on the values reads the dequantized tensor
        if not is_tensor_node(n):
            if ((n.op == "call_function" and n.target in ops.SPLIT_FUNCTIONS) or
                    (n.op == "call_method" and n.target in ops.SPLIT_METHODS)) and n.args and \
                    isinstance(n.args[0], Node) and self.env[n.args[0].name].is_int:
                return self.lower_split(n)
            shape_query = (n.op == "call_method" and n.target in ops.SHAPE_QUERY_METHODS) or \
                (n.op == "call_function" and n.target is getattr and len(n.args) > 1
                 and n.args[1] in ("shape", "ndim"))
            if shape_query or not any(r.is_int for r in ins):
                args, kwargs = self.map_args(n, lambda r, a: r.node)
                node = self.emit(n.op, n.target, args, kwargs, name=n.name, like=n,
                                 is_int=False)
                return Rep(node, value=True)
            return self.float_op(n, None)
        if n.op == "call_function" and n.target is operator.getitem and n.args and \
                isinstance(n.args[0], Node) and self.env[n.args[0].name].is_int:
            return self.lower_passthrough(n, None)       # a slice of a split integer tensor
        tensor_ins = [self.env[a.name] for a in self.tensor_inputs(n)]
        if not any(r.is_int for r in tensor_ins):
            return self.float_op(n, None)   # float data: before the input quantize, or an island
        return self.lower_int_op(n, mod)

    # -- activation fake quantizers ----------------------------------------------------------------

    def lower_fake_quant(self, n: Node, mod: ActFakeQuant) -> Rep:
        """An activation fake quantizer: quantize, requantize or nothing; records the point in
        ``fq_map``."""
        rep = self._lower_fake_quant(n, mod)
        assert rep.qt is not None
        self.fq_map[n.name] = {"node": rep.node.name, "scale": rep.qt.scale[0],
                               "zero_point": rep.qt.zero_point}
        return rep

    def _lower_fake_quant(self, n: Node, mod: ActFakeQuant) -> Rep:
        target = self.fq_qtype(mod)
        src = self.env[n.args[0].name]
        if not src.is_int:
            const = self.lower_const_fake_quant(n, mod, target)   # codes computed now
            if const is not None:
                return const
            node = self.call_int(n.name, Quantize(target.scale[0], target.zero_point,
                                                  target.qmin, target.qmax,
                                                  getattr(mod, "rounding", "rne"), n.name),
                                  (src.node,), n, n.name)
            node.meta[QMETA_KEY] = n.meta.get(QMETA_KEY)
            if node.meta[QMETA_KEY] is None:
                node.meta.pop(QMETA_KEY)
            self.stats["num_quantize"] += 1
            return Rep(node, target)
        return self.requantize_to(src, target, n, n.name)

    def requantize_to(self, src: Rep, target: QType, like: Node, name: str) -> Rep:
        """Put an integer value onto ``target``'s grid, folding a pending clamp."""
        qt = src.qt
        assert qt is not None
        a, b = self.clamp_codes(target, src.lo, src.hi)
        eff = replace(target, qmin=a, qmax=b)
        if not qt.per_channel and qt.same_grid(target):
            if qt.qmin >= a and qt.qmax <= b:
                return Rep(src.node, replace(qt))
            lo_t, hi_t = torch.tensor([a]), torch.tensor([b])
            node = self.call_int(name, IntClamp(lo_t, hi_t), (src.node,), like, name)
            self.stats["num_clamps"] += 1
            return Rep(node, eff)
        s_in = torch.tensor(qt.scale, dtype=torch.float64)
        real = s_in / target.scale[0]
        if self.options.rounding == "float-rne":
            if qt.fbgemm is not None:
                sf = fbgemm_scale(qt.fbgemm[0], torch.tensor(qt.fbgemm[1], dtype=torch.float64),
                                  target.scale[0])
            else:
                sf = s_in.to(torch.float32) / f32(target.scale[0])
        else:
            sf = None
        mod = Requantize(real, in_zero_point=qt.zero_point, out_zero_point=target.zero_point,
                         qmin=a, qmax=b, rounding=self.options.rounding,
                         multiplier_bits=self.options.multiplier_bits,
                         axis=qt.axis if qt.per_channel else None, scale_f32=sf)
        self._check_requant_input(qt, name)
        mod.prove(qt.max_abs_centered)
        node = self.call_int(name, mod, (src.node,), like, name)
        self.stats["num_requantize"] += 1
        return Rep(node, eff)

    def _check_requant_input(self, qt: QType, name: str) -> None:
        if qt.max_abs_centered > INT32_MAX:
            raise FloatIsland(f"value on grid {qt.kind} spans ±{qt.max_abs_centered}, beyond "
                              "the int32 input of requantization")

    # -- everything else on integer inputs --------------------------------------------------------

    def lower_int_op(self, n: Node, mod: Any) -> Rep:
        """Dispatch an op on integer inputs to the rule of its family (FloatIsland if none)."""
        t = n.target
        # identities
        if isinstance(mod, ops.EVAL_IDENTITY_MODULES) and not (mod.training and
                                                      not isinstance(mod, nn.Identity)):
            return self.env[n.args[0].name]
        if n.op == "call_function" and t in ops.DROPOUT_FUNCTIONS and \
                node_arg(n, 2, "training", True) is False:
            return self.env[n.args[0].name]
        if n.op == "call_function" and ops.is_stochastic_depth(t) and node_arg(n, 3, "training", True) is False:
            return self.env[n.args[0].name]
        # clamps
        clamp = self.clamp_bounds(n, mod)
        if clamp is not None:
            return self.lower_clamp(n, *clamp)
        # pools
        if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            return self.lower_maxpool(n, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                                      mod.ceil_mode, bool(getattr(mod, "return_indices", False)))
        if n.op == "call_function" and t in ops.MAX_POOL_FUNCTIONS:
            k = node_arg(n, 1, "kernel_size")
            return self.lower_maxpool(n, k, node_arg(n, 2, "stride", None) or k,
                                      node_arg(n, 3, "padding", 0), node_arg(n, 4, "dilation", 1),
                                      node_arg(n, 5, "ceil_mode", False),
                                      bool(node_arg(n, 6, "return_indices", False)))
        if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            return self.lower_avgpool(n, "avg", kernel_size=mod.kernel_size, stride=mod.stride,
                                      padding=mod.padding, ceil_mode=mod.ceil_mode,
                                      count_include_pad=mod.count_include_pad,
                                      divisor_override=getattr(mod, "divisor_override", None))
        if n.op == "call_function" and t in ops.AVG_POOL_FUNCTIONS:
            k = node_arg(n, 1, "kernel_size")
            return self.lower_avgpool(n, "avg", kernel_size=k,
                                      stride=node_arg(n, 2, "stride", None) or k,
                                      padding=node_arg(n, 3, "padding", 0),
                                      ceil_mode=node_arg(n, 4, "ceil_mode", False),
                                      count_include_pad=node_arg(n, 5, "count_include_pad", True),
                                      divisor_override=node_arg(n, 6, "divisor_override", None))
        if isinstance(mod, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
            return self.lower_avgpool(n, "adaptive", output_size=mod.output_size)
        if n.op == "call_function" and t in ops.ADAPTIVE_AVG_POOL_FUNCTIONS:
            return self.lower_avgpool(n, "adaptive", output_size=node_arg(n, 1, "output_size"))
        if (n.op == "call_function" and t is torch.mean) or (n.op == "call_method" and t == "mean"):
            return self.lower_mean(n)
        if n.op == "call_function" and t in PAD_FUNCTIONS:
            return self.lower_pad(n)
        # shape-only ops
        if isinstance(mod, nn.Flatten) or (n.op == "call_function" and t in ops.PASSTHROUGH_FUNCTIONS) \
                or (n.op == "call_method" and t in ops.PASSTHROUGH_METHODS):
            return self.lower_passthrough(n, mod)
        # per-channel affine ops with constant operands (BatchNorm, x * param, x + param, ...)
        affine = self.affine_spec(n, mod)
        if affine is not None:
            return self.lower_affine(n, *affine)
        # joins (a constant operand goes onto the join's grid first)
        self.const_join_operands(n)
        if n.op == "call_function" and t in ops.CAT_FUNCTIONS:
            return self.lower_cat(n)
        tensors = self.tensor_inputs(n)
        if ((n.op == "call_function" and t in ops.ADD_FUNCTIONS) or
                (n.op == "call_method" and t in ops.ADD_METHODS)) and len(tensors) == 2:
            return self.lower_add(n, tensors)
        if ((n.op == "call_function" and t in ops.MUL_FUNCTIONS) or
                (n.op == "call_method" and t in ops.MUL_METHODS)) and len(tensors) == 2:
            return self.lower_mul(n, tensors)
        # matmul of activations, softmax, LayerNorm (lowering/transformer.py)
        rule = self.transformer_rule(n, mod)
        if rule is not None:
            return rule()
        # elementwise
        fn = self.elementwise_fn(n, mod)
        if fn is not None:
            return self.lower_lut(n, *fn)
        raise FloatIsland(f"unsupported op {target_name(n)}"
                          + (f" ({type(mod).__name__})" if mod is not None else "")
                          + ": no integer lowering")


    def output_target(self, n: Node) -> QType | None:
        """The grid of the quantizer right after ``n`` (join outputs), if any."""
        for u in n.users:
            m = self.module_of(u)
            if isinstance(m, ActFakeQuant) and u.args and u.args[0] is n:
                return self.fq_qtype(m)
        return None

    def lookahead_target(self, n: Node) -> QType | None:
        """The quantizer grid a value reaches through shape-only ops, dropout and max pools
        (ops that commute with quantization), following a single-user chain."""
        cur = n
        for _ in range(32):
            users = [u for u in cur.users if not is_shape_query(u)]
            if len(users) != 1:
                return None
            u = users[0]
            m = self.module_of(u)
            if isinstance(m, ActFakeQuant):
                return self.fq_qtype(m)
            if u.args and u.args[0] is not cur:
                return None
            if isinstance(m, (nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) or \
                    isinstance(m, ops.EVAL_IDENTITY_MODULES) or \
                    (u.op == "call_function" and (u.target in ops.PASSTHROUGH_FUNCTIONS
                                                  or u.target in ops.MAX_POOL_FUNCTIONS
                                                  or u.target in ops.DROPOUT_FUNCTIONS)) or \
                    (u.op == "call_method" and u.target in ops.PASSTHROUGH_METHODS) or \
                    zero_pad_reason(u) is None:          # pads with the zero-point code
                cur = u
                continue
            return None
        return None


def build_int_sim_graph(gm: torch.fx.GraphModule, options: LoweringOptions,
                        batches: Sequence[tuple[Tensor, ...]] = (),
                        origin: str = "lower-fake-quant-ops",
                        ranges: dict[str, tuple[float, float]] | None = None) -> dict[str, int]:
    """Rewrite ``gm`` (calibrated fake-quant) in place into the integer graph, on
    ``options.backend``, and write its int-sim record (``INT_SIM_KEY``). The input
    values of nonlinearities without a quantizer are ranged on up to two of ``batches`` (or
    taken from ``ranges``: an emulating graph's recorded ones). Returns
    the builder's stats (node counts, ``num_kernel_<k>`` per fast kernel)."""
    if ranges is None:
        ranges = observe_ranges(gm, list(batches)[:2], range_candidates(gm))
    b = GraphLowering(gm, options, ranges, origin)
    b.run()
    # the walk leaves the fake-quant graph and its modules as they were: keep them (no copy)
    source = fake_quant_graph(gm) if options.keep_fake_quant else None
    for path, mod in b.layer_swaps.items():
        gm.set_submodule(path, mod)
    if b.int_modules:
        box = nn.ModuleDict()
        for k, m in b.int_modules.items():
            box[k] = m
        if hasattr(gm, INT_SIM_CONTAINER):
            delattr(gm, INT_SIM_CONTAINER)
        gm.add_module(INT_SIM_CONTAINER, box)
    gm.graph = b.new                       # (the setter recompiles)
    gm.delete_all_unused_submodules()      # the fake quantizers and float layers replaced
    set_backend(gm, options.backend)
    stats = dict(b.stats)
    chains = exact_affine_chains(gm)       # constant channels of affine ops through pools
    if chains:
        stats["num_exact_affine_constants"] = stats.get("num_exact_affine_constants", 0) + chains
    for k, v in sorted(b.kernels.items()):
        stats[f"num_kernel_{k.replace('-', '_')}"] = v
    new_record(gm, options, b.islands, stats, source, ranges, b.fq_map)
    return stats
