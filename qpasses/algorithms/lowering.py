"""The graph rewrite behind ``lower-to-int-sim``: calibrated fake-quant graph → integer graph.

The builder walks the fake-quant graph once, in topological order, and gives every value a
*representation* (:class:`Rep`): an integer tensor on a known grid (:class:`QType`: scale per tensor
or per channel, zero point, declared range) or a float tensor. Requantization is lazy — a value
keeps the finest exact grid it has (a conv accumulator at scale ``s_x·s_w[c]``, a pooled window sum
at ``s/L``, a pending ReLU/ReLU6/clamp in real units) until a consumer needs another grid, which is
where the fake-quant graph has a quantizer. So every requantization of the integer graph sits where
the fake-quant graph rounds, with one rounding, and fused activations are exact clamps of the
output range.

Rules (fake-quant node → integer nodes):

- activation fake quantizer on a float value: :class:`Quantize` (the input quantize, or the exit of
  a float island); on an integer value: nothing when the value already lies on the quantizer's grid,
  an :class:`IntClamp` when only the range differs, else a :class:`Requantize` with the pending
  clamp folded into its output range (fused into the producing conv/linear when it is its only
  consumer).
- conv (1-3d, stride, padding, dilation, groups, depthwise) / linear with fake-quant weights and a
  quantized input: :class:`IntLayer` with integer weights taken from the weight quantizer's own
  output (and checked to lie exactly on the grid; DoReFa's float32 ``2·(k/L) − 1`` within
  ``_DOREFA_TOL`` of it), per-kernel bits and per-channel scales, int32 bias
  ``rne(b/(s_x·s_w))`` (fbgemm's float bias under ``float-rne``), and the fast kernel its exactness
  bound allows.
- relu/relu6/hardtanh/clamp: a pending clamp (free); max pool: :class:`IntMaxPool` (keeps the pending
  clamp: max commutes with it); average / adaptive-average pool and ``mean`` over trailing dims:
  :class:`IntAvgPoolSum` (window sums times ``L·2^k/count``: ``k`` fractional bits of the mean
  where gemmlowp's double rounding would cost more than 1/64 LSB, see ``_pool_frac_bits``);
  flatten/view/reshape/permute/transpose/squeeze/unsqueeze/contiguous/getitem/dropout/identity/
  stochastic depth (eval): pass-through.
- add / cat joins: :class:`IntAdd` / :class:`IntCat` onto the join's output quantizer grid (exact
  integer add when all scales agree, which ``join-scales=shared`` guarantees); a tensor product
  feeding a quantizer: :class:`IntMul`.
- elementwise nonlinearities (hardswish, hardsigmoid, sigmoid, SiLU, GELU, tanh, ELU, leaky ReLU,
  softplus, mish, and arithmetic with a constant) on ≤ 16-bit codes whose value reaches a quantizer:
  :class:`IntLUT` producing that quantizer's codes directly (bit-identical to the fake-quant float32
  computation). When the input is an accumulator (conv → hardswish), it is first requantized onto a
  ``lut-bits`` intermediate grid whose range comes from calibration data (or the proven accumulator
  bound); when the output reaches no quantizer (e.g. a squeeze-excitation gate feeding a product),
  bounded functions (sigmoid, hardsigmoid, tanh) get a ``gate-bits`` output grid on their exact range.
- anything else: a float island — the integer inputs are dequantized, the op runs in float, and the
  next quantizer quantizes again; the node carries ``QMeta.float_island`` with the reason.
- graph outputs: :class:`Dequantize` (per channel for a raw accumulator, e.g. logits).
"""
from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from qpasses.modules.fake_quant import ActFakeQuant, WeightFakeQuant, is_fake_quant_layer
from qpasses.ir.layers import bias_parts, layer_info
from qpasses.ir.annotations import QMETA_KEY, get_qmeta, update_qmeta
from qpasses.numerics.fixed_point import fbgemm_scale
from qpasses.numerics.int_ops import choose_kernel, exactness_bound, int_avg_pool_sum
from qpasses.numerics.int_sim_math import adaptive_avg_pool_sum, build_lut_f32, uniform_count_factor
from qpasses.modules.int_sim import (INT_SIM_META_KEY, Dequantize, IntAdd, IntAvgPoolSum, IntCat, IntClamp,
                      IntLayer, IntLUT, IntMaxPool, IntMul, Quantize, Requantize, make_int_layer,
                      set_backend)

__all__ = ["LoweringConfig", "QType", "lower_graph", "INT_SIM_CONTAINER", "PASSTHROUGH_FUNCTIONS",
           "PASSTHROUGH_METHODS", "SHAPE_QUERY_METHODS", "SPLIT_FUNCTIONS", "SPLIT_METHODS"]

INT_SIM_CONTAINER = "int_sim"
Node = torch.fx.Node
_INT32_MAX = 2 ** 31 - 1
# DoReFa weights: largest |fake-quant value − code·scale/2| accepted (float32 evaluation
# error of 2·(k/L) − 1, measured <= 2^-24 for 1..16 bits)
_DOREFA_TOL = 2.0 ** -22


@dataclass(frozen=True)
class LoweringConfig:
    rounding: str = "gemmlowp"
    backend: str = "fast"
    multiplier_bits: int = 31
    lut_bits: int = 16
    gate_bits: int = 12
    bias_frac_bits: int | None = None
    keep_fake_quant: bool = True
    pass_name: str = "lower-to-int-sim"


@dataclass(frozen=True)
class QType:
    """An integer grid: real value = ``scale·(q − zero_point)``; ``scale`` has one value, or one
    per channel along ``axis``; ``[qmin, qmax]`` is the declared range of the codes.
    ``fbgemm`` = (s_x, s_w per channel) for accumulators (fbgemm's float32 multiplier order)."""
    scale: tuple[float, ...]
    zero_point: int
    qmin: int
    qmax: int
    axis: int | None = None
    fbgemm: tuple[float, tuple[float, ...]] | None = None
    kind: str = "codes"          # codes | acc | sum

    @property
    def per_channel(self) -> bool:
        return len(self.scale) > 1

    @property
    def max_abs_centered(self) -> int:
        return max(self.qmax - self.zero_point, self.zero_point - self.qmin)

    @property
    def span(self) -> int:
        return self.qmax - self.qmin

    def same_grid(self, other: "QType") -> bool:
        return self.scale == other.scale and self.zero_point == other.zero_point

    def within(self, other: "QType") -> bool:
        return self.same_grid(other) and other.qmin <= self.qmin and self.qmax <= other.qmax


@dataclass
class Rep:
    """How a fake-quant value is represented in the integer graph."""
    node: Any                      # new-graph node (or a constant for non-tensor values)
    qt: QType | None = None        # None: float (or a non-tensor value)
    lo: float | None = None        # pending clamp in real units (relu/relu6/hardtanh/clamp)
    hi: float | None = None
    island: str | None = None      # float value inside the integer region: why
    value: bool = False            # a non-tensor value (size(), shapes...)
    pieces: list | None = None     # a split per-channel value: the grid of each piece

    @property
    def is_int(self) -> bool:
        return self.qt is not None

    @property
    def pending(self) -> bool:
        return self.lo is not None or self.hi is not None


class _Island(Exception):
    """Raised by a lowering rule: the node must run in float (message = reason)."""


# ------------------------------------------------------------------------------------------------
# op tables

_RELU_FUNCS = {torch.relu, torch.relu_, F.relu, F.relu_}
_CLAMP_FUNCS = {torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max}
_CLAMP_METHODS = {"clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_", "clamp_max",
                  "clamp_max_", "relu", "relu_"}
PASSTHROUGH_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                         torch.permute, torch.transpose, torch.t, torch.clone, torch.detach,
                         operator.getitem, torch.movedim, torch.swapaxes}
PASSTHROUGH_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "t", "contiguous",
                       "squeeze", "unsqueeze", "clone", "detach", "view_as", "reshape_as",
                       "__getitem__", "movedim", "swapaxes"}
# ops whose per-channel axis (dim 1 / last dim) survives when leading/trailing sizes say so
_SHAPE_ONLY = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.clone,
               torch.detach, "view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze",
               "clone", "detach", "view_as", "reshape_as"}
SHAPE_QUERY_METHODS = {"size", "dim", "numel", "__len__"}
# ops returning tuples of slices of one tensor (values unchanged; getitem picks a slice)
SPLIT_FUNCTIONS = {torch.split, torch.chunk, torch.unbind, torch.tensor_split}
SPLIT_METHODS = {"split", "chunk", "unbind", "tensor_split"}
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                     nn.AlphaDropout, nn.FeatureAlphaDropout)
_DROPOUT_FUNCS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                  F.feature_alpha_dropout}

try:  # torchvision's stochastic depth: identity in eval mode
    from torchvision.ops import stochastic_depth as _tv_stochastic_depth
except Exception:  # pragma: no cover - torchvision missing
    _tv_stochastic_depth = None

_MAXPOOL_FUNCS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, torch.max_pool1d: 1,
                  torch.max_pool2d: 2, torch.max_pool3d: 3}
_AVGPOOL_FUNCS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3, torch.avg_pool1d: 1}
_ADAPTIVE_AVG_FUNCS = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2,
                       F.adaptive_avg_pool3d: 3, torch.adaptive_avg_pool1d: 1}

# elementwise unary functions (call_function target -> name); bounded ones carry their range
_LUT_FUNCS: dict[Any, str] = {
    F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", F.silu: "silu", F.gelu: "gelu", torch.tanh: "tanh", F.tanh: "tanh",
    F.elu: "elu", F.leaky_relu: "leaky_relu", F.softplus: "softplus", F.mish: "mish",
    F.selu: "selu", F.celu: "celu", F.hardshrink: "hardshrink", F.softsign: "softsign",
    F.tanhshrink: "tanhshrink", F.logsigmoid: "logsigmoid", torch.exp: "exp", torch.abs: "abs",
    torch.neg: "neg", torch.square: "square",
}
_LUT_METHODS = {"sigmoid": "sigmoid", "tanh": "tanh", "exp": "exp", "abs": "abs", "neg": "neg",
                "square": "square"}
_LUT_MODULES: dict[type, str] = {
    nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.Sigmoid: "sigmoid",
    nn.SiLU: "silu", nn.GELU: "gelu", nn.Tanh: "tanh", nn.ELU: "elu", nn.LeakyReLU: "leaky_relu",
    nn.Softplus: "softplus", nn.Mish: "mish", nn.SELU: "selu", nn.CELU: "celu",
    nn.Hardshrink: "hardshrink", nn.Softsign: "softsign", nn.Tanhshrink: "tanhshrink",
    nn.LogSigmoid: "logsigmoid",
}
_BOUNDED = {"sigmoid": (0.0, 1.0), "hardsigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0),
            "softsign": (-1.0, 1.0)}
_ARITH_CONST = {operator.add: "add", operator.sub: "sub", operator.mul: "mul",
                operator.truediv: "div", torch.add: "add", torch.sub: "sub", torch.mul: "mul",
                torch.div: "div"}
_ARITH_CONST_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div"}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}
_MUL_FUNCS = {operator.mul, operator.imul, torch.mul}


def _target_name(n: Node) -> str:
    if n.op == "call_module":
        return str(n.target)
    t = n.target
    mod = getattr(t, "__module__", "") or ""
    name = getattr(t, "__name__", str(t))
    if n.op == "call_method":
        return f"Tensor.{name}"
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    if mod.startswith("torch"):
        return f"torch.{name}"
    if mod == "_operator":
        return f"operator.{name}"
    return f"{mod}.{name}" if mod else name


def _shape(n: Any) -> tuple[int, ...] | None:
    if not isinstance(n, Node):
        return None
    tm = n.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(int(s) for s in tm.shape)
    v = n.meta.get("val")
    if isinstance(v, Tensor):
        return tuple(int(s) for s in v.shape)
    return None


def _is_tensor(n: Any) -> bool:
    return _shape(n) is not None


def _arg(n: Node, i: int, name: str, default: Any = None) -> Any:
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _f32(v: float) -> Tensor:
    return torch.tensor(float(v), dtype=torch.float32)


def _code(v: float, s: float, z: int) -> int:
    """rne(v·float32(1/s)) + z in float32, the fake quantizer's arithmetic for one value."""
    return int(torch.round(_f32(v) * (1.0 / _f32(s)))) + z


# ------------------------------------------------------------------------------------------------
# the builder


class _Lowering:
    def __init__(self, gm: torch.fx.GraphModule, cfg: LoweringConfig,
                 ranges: dict[str, tuple[float, float]] | None = None) -> None:
        self.gm, self.cfg = gm, cfg
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

    def _module(self, n: Node) -> Any:
        return self.modules.get(str(n.target)) if n.op == "call_module" else None

    def _add_module(self, key: str, mod: nn.Module) -> str:
        key = key.replace(".", "_") or "m"
        base, i = key, 0
        while key in self.int_modules:
            i += 1
            key = f"{base}_{i}"
        self.int_modules[key] = mod
        return f"{INT_SIM_CONTAINER}.{key}"

    def _emit(self, op: str, target: Any, args: tuple, kwargs: dict | None = None,
              name: str | None = None, like: Node | None = None, is_int: bool = True) -> Node:
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

    def _call_int(self, key: str, mod: nn.Module, args: tuple, like: Node | None,
                  name: str | None = None) -> Node:
        target = self._add_module(key, mod)
        return self._emit("call_module", target, args, name=name or key.replace(".", "_"),
                          like=like, is_int=not getattr(mod, "produces_float", False))

    def _fq_qtype(self, mod: ActFakeQuant) -> QType:
        scale, zp = mod.qparams()
        return QType((float(scale.reshape(-1)[0]),), int(zp.reshape(-1)[0]), int(mod._qmin),
                     int(mod._qmax))

    def _clamp_codes(self, qt: QType, lo: float | None, hi: float | None) -> tuple[int, int]:
        """Per-tensor code bounds of a real clamp on grid ``qt`` (fake-quant arithmetic)."""
        s, z = qt.scale[0], qt.zero_point
        a = qt.qmin if lo is None else min(max(qt.qmin, _code(lo, s, z)), qt.qmax)
        b = qt.qmax if hi is None else min(max(qt.qmin, _code(hi, s, z)), qt.qmax)
        return a, max(a, b)

    def materialize(self, rep: Rep, like: Node | None) -> Rep:
        """Apply a pending clamp as an IntClamp node."""
        if not rep.is_int or not rep.pending:
            return rep
        qt = rep.qt
        assert qt is not None
        if not qt.per_channel:
            a, b = self._clamp_codes(qt, rep.lo, rep.hi)
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
        node = self._call_int(name, IntClamp(lo_t, hi_t, qt.axis), (rep.node,), like, name)
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
            self.dequant_cache[key] = self._call_int(name, mod, (rep.node,), like, name)
            self.stats["num_dequantize"] += 1
        return self.dequant_cache[key]

    def map_args(self, n: Node, how: Callable[[Rep, Node], Any]) -> tuple[tuple, dict]:
        def f(a: Node) -> Any:
            return how(self.env[a.name], a)
        return (torch.fx.node.map_arg(n.args, f), torch.fx.node.map_arg(n.kwargs, f))

    def tensor_inputs(self, n: Node) -> list[Node]:
        return [a for a in n.all_input_nodes if _is_tensor(a)]

    # -- float islands ---------------------------------------------------------------------------

    def float_op(self, n: Node, reason: str | None) -> Rep:
        """Copy ``n`` as a float op: integer inputs are dequantized first."""
        ins = [self.env[a.name] for a in n.all_input_nodes]
        in_region = any(r.is_int or r.island is not None for r in ins)
        args, kwargs = self.map_args(n, lambda r, a: self.as_float(r, a))
        node = self._emit(n.op, n.target, args, kwargs, name=n.name, like=n, is_int=False)
        if QMETA_KEY in n.meta:
            node.meta[QMETA_KEY] = n.meta[QMETA_KEY]
        value = not _is_tensor(n)
        if reason is None and not in_region:
            return Rep(node, value=value)   # prologue: float before the input quantize
        root = reason
        if reason is None:
            root = next((r.island for r in ins if r.island), None) or \
                "dequantized integer input"
            reason = f"input computed in float ({root})"
        update_qmeta(node, origin=self.cfg.pass_name, float_island=reason)
        self.islands.append({"node": n.name, "op": _target_name(n), "reason": reason})
        self.stats["num_float_islands"] += 1
        return Rep(node, island=root, value=value)

    # -- main loop -------------------------------------------------------------------------------

    def run(self) -> None:
        for n in self.old.nodes:
            if n.op == "placeholder":
                node = self._emit("placeholder", n.target, n.args, n.kwargs, name=n.name, like=n,
                                  is_int=False)
                self.env[n.name] = Rep(node)
            elif n.op == "output":
                args, kwargs = self.map_args(n, self._output_value)
                self.new.create_node("output", "output", args, kwargs)
            elif n.op == "get_attr":
                node = self._emit("get_attr", n.target, (), name=n.name, like=n, is_int=False)
                self.env[n.name] = Rep(node, value=not _is_tensor(n))
            else:
                try:
                    self.env[n.name] = self.lower_node(n)
                except _Island as e:
                    self.env[n.name] = self.float_op(n, str(e))

    def _output_value(self, rep: Rep, a: Node) -> Any:
        if rep.value or not rep.is_int:
            return rep.node
        return self.as_float(rep, a)

    def lower_node(self, n: Node) -> Rep:
        mod = self._module(n)
        ins = [self.env[a.name] for a in n.all_input_nodes]
        if isinstance(mod, WeightFakeQuant):
            return self.float_op(n, None)
        if isinstance(mod, ActFakeQuant):
            return self.lower_fake_quant(n, mod)
        if mod is not None and is_fake_quant_layer(mod):
            return self.lower_layer(n, mod)
        # non-tensor results: shape queries read integer tensors as they are; anything that
        # could depend on the values reads the dequantized tensor
        if not _is_tensor(n):
            if ((n.op == "call_function" and n.target in SPLIT_FUNCTIONS) or
                    (n.op == "call_method" and n.target in SPLIT_METHODS)) and n.args and \
                    isinstance(n.args[0], Node) and self.env[n.args[0].name].is_int:
                return self.lower_split(n)
            shape_query = (n.op == "call_method" and n.target in SHAPE_QUERY_METHODS) or \
                (n.op == "call_function" and n.target is getattr and len(n.args) > 1
                 and n.args[1] in ("shape", "ndim"))
            if shape_query or not any(r.is_int for r in ins):
                args, kwargs = self.map_args(n, lambda r, a: r.node)
                node = self._emit(n.op, n.target, args, kwargs, name=n.name, like=n,
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
        rep = self._lower_fake_quant(n, mod)
        assert rep.qt is not None
        self.fq_map[n.name] = {"node": rep.node.name, "scale": rep.qt.scale[0],
                               "zero_point": rep.qt.zero_point}
        return rep

    def _lower_fake_quant(self, n: Node, mod: ActFakeQuant) -> Rep:
        target = self._fq_qtype(mod)
        src = self.env[n.args[0].name]
        if not src.is_int:
            node = self._call_int(n.name, Quantize(target.scale[0], target.zero_point,
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
        a, b = self._clamp_codes(target, src.lo, src.hi)
        eff = replace(target, qmin=a, qmax=b)
        if not qt.per_channel and qt.same_grid(target):
            if qt.qmin >= a and qt.qmax <= b:
                return Rep(src.node, replace(qt))
            lo_t, hi_t = torch.tensor([a]), torch.tensor([b])
            node = self._call_int(name, IntClamp(lo_t, hi_t), (src.node,), like, name)
            self.stats["num_clamps"] += 1
            return Rep(node, eff)
        s_in = torch.tensor(qt.scale, dtype=torch.float64)
        real = s_in / target.scale[0]
        if self.cfg.rounding == "float-rne":
            if qt.fbgemm is not None:
                sf = fbgemm_scale(qt.fbgemm[0], torch.tensor(qt.fbgemm[1], dtype=torch.float64),
                                  target.scale[0])
            else:
                sf = s_in.to(torch.float32) / _f32(target.scale[0])
        else:
            sf = None
        mod = Requantize(real, in_zero_point=qt.zero_point, out_zero_point=target.zero_point,
                         qmin=a, qmax=b, rounding=self.cfg.rounding,
                         multiplier_bits=self.cfg.multiplier_bits,
                         axis=qt.axis if qt.per_channel else None, scale_f32=sf)
        self._check_requant_input(qt, name)
        mod.prove(qt.max_abs_centered)
        node = self._call_int(name, mod, (src.node,), like, name)
        self.stats["num_requantize"] += 1
        return Rep(node, eff)

    def _check_requant_input(self, qt: QType, name: str) -> None:
        if qt.max_abs_centered > _INT32_MAX:
            raise _Island(f"value on grid {qt.kind} spans ±{qt.max_abs_centered}, beyond the "
                          "int32 input of requantization")

    # -- conv / linear ---------------------------------------------------------------------------

    def lower_layer(self, n: Node, mod: nn.Module) -> Rep:
        q = get_qmeta(n)
        if q.float_island is not None:
            return self.float_op(n, q.float_island)
        info = layer_info(self.gm, n)
        if info is None:
            return self.float_op(n, "layer without traced shapes")
        x = self.env[n.args[0].name] if n.args and isinstance(n.args[0], Node) else None
        if x is None or not x.is_int:
            return self.float_op(n, "layer input is not quantized (no activation fake quantizer)")
        x = self.materialize(x, n)
        xq = x.qt
        assert xq is not None
        if xq.per_channel:
            return self.float_op(n, "layer input is an unrequantized accumulator")
        if len(n.args) != 1 or n.kwargs:
            return self.float_op(n, "layer called with extra arguments")
        if getattr(mod, "padding_mode", "zeros") != "zeros":
            return self.float_op(n, f"padding_mode={mod.padding_mode!r} (only zeros is lowered)")
        try:
            params = self._layer_params(n, mod, info, xq)
        except _Island as e:
            return self.float_op(n, str(e))
        int_layer = make_int_layer(mod, **params["init"])
        int_layer.register_buffer("acc_scale", torch.tensor(params["qtype"].scale,
                                                            dtype=torch.float64))
        parts = bias_parts(mod)
        int_layer.register_buffer("bias_base", None if parts is None else parts[0])
        int_layer.register_buffer("bias_fold", None if parts is None else parts[1])
        self.layer_swaps[str(n.target)] = int_layer
        self.modules[str(n.target)] = int_layer
        node = self._emit("call_module", str(n.target), (x.node,), name=n.name, like=n)
        if QMETA_KEY in n.meta:
            node.meta[QMETA_KEY] = n.meta[QMETA_KEY]
        self.stats["num_int_layers"] += 1
        k = params["init"]["kernel"]
        self.kernels[k] = self.kernels.get(k, 0) + 1
        return Rep(node, params["qtype"])

    def _layer_params(self, n: Node, mod: nn.Module, info: Any, xq: QType) -> dict[str, Any]:
        wfq: WeightFakeQuant = mod.weight_fake_quant
        weight = mod.weight
        with torch.no_grad():
            w_hat = wfq(weight).detach()
        scale = wfq.scale.detach().to(torch.float64).reshape(-1)
        zp = wfq.zero_point.detach().to(torch.int64).reshape(-1)
        c_out = weight.shape[0]
        if scale.numel() == 1:
            scale, zp = scale.expand(c_out).clone(), zp.expand(c_out).clone()
        s_eff = scale / 2 if wfq.scheme == "dorefa" else scale
        zp_eff = torch.zeros_like(zp) if wfq.scheme == "dorefa" else zp
        shape = (-1,) + (1,) * (weight.dim() - 1)
        codes = torch.round(w_hat.double() / s_eff.reshape(shape)).to(torch.int64) \
            + zp_eff.reshape(shape)
        back = ((codes - zp_eff.reshape(shape)).to(torch.float64)
                * s_eff.reshape(shape)).to(torch.float32)
        w32 = w_hat.to(torch.float32)
        if wfq.scheme == "dorefa":
            # DoReFa's quantizer evaluates 2·(k/L) − 1 in float32, up to one float32 ulp
            # (<= 2^-24) off the grid point (2k − L)/L = code·scale/2 that the integer layer uses;
            # the codes are unambiguous (a step is >= 2/(2^16 − 1)) and the difference can only
            # move an exact rounding tie downstream (at most 1 LSB). Without the tolerance no
            # DoReFa layer of >= 2 bits lowers (they all became float islands).
            off = (back - w32).abs() > _DOREFA_TOL
        else:
            off = back != w32
        if bool(off.any()):
            bad = int(off.sum())
            raise _Island(f"{bad} fake-quantized weights are not exactly scale·(code − zero "
                          "point): cannot take integer weights")
        centered = codes - zp_eff.reshape(shape)
        w_lo, w_hi = (int(centered.min()), int(centered.max())) if centered.numel() else (0, 0)
        s_x, z_x = xq.scale[0], xq.zero_point
        x_absmax = xq.max_abs_centered
        bound = exactness_bound(codes, x_absmax, 0, zp_eff)
        # bias
        bias = mod.bias
        bias_q = bias_f = None
        if bias is not None:
            sxw = s_x * s_eff                           # float64 of float32 scales
            bq = _round_bias(bias_parts(mod), sxw)
            if bool((bq.abs() + bound > _INT32_MAX).any()):
                raise _Island("bias / (s_x·s_w) does not fit the int32 accumulator (a kernel "
                              "with a tiny weight scale?)")
            bias_q = bq.to(torch.int64)
            if self.cfg.rounding == "float-rne":
                act_w = _f32(s_x) * s_eff.to(torch.float32)
                bias_f = bias.detach().to(torch.float32) / act_w
        if bound > _INT32_MAX:
            raise _Island(f"accumulator bound {bound} exceeds int32")
        x_bits = max(xq.span, 1).bit_length()
        w_bits = 8 if (-128 <= w_lo and w_hi <= 127) else 16
        # torch._int_mm runs once per group: grouped/depthwise convs take the float GEMM path
        fast = choose_kernel(bound, x_bits, w_bits, allow_int8=info.groups <= 4)
        reason = (f"bound {bound} (2^{math.log2(bound + 1):.1f}); x span {x_bits} bits, w "
                  f"{w_bits if w_bits > 8 else 8}-bit" + (" -> int8 GEMM (int32 partial sums)"
                                                           if fast == "int8-mm" else
                                                           " -> float32 GEMM (< 2^24)"
                                                           if fast == "float32" else
                                                           " -> float64 GEMM (< 2^53)"
                                                           if fast == "float64" else
                                                           " -> int64 reference"))
        kernel = "reference" if self.cfg.backend == "reference" else fast
        init: dict[str, Any] = dict(
            w_q=codes, w_zp=zp_eff if bool((zp_eff != 0).any()) else torch.zeros((), dtype=torch.int64),
            x_zero_point=z_x, bias_q=bias_q, bias_f=bias_f, acc_bound=bound, x_bits=x_bits,
            w_bits=w_bits, fast_kernel=fast, kernel=kernel, kernel_reason=reason,
            x_qmin=xq.qmin, x_qmax=xq.qmax)
        if info.is_conv:
            pad = info.padding
            nd = weight.dim() - 2
            if isinstance(pad, str):
                if pad == "valid":
                    pad = (0,) * nd
                else:  # "same"
                    total = [info.dilation[i] * (info.kernel_size[i] - 1) for i in range(nd)]
                    if any(t % 2 for t in total):
                        raise _Island("padding='same' with an asymmetric split")
                    pad = tuple(t // 2 for t in total)
            init["int_padding"] = tuple(int(p) for p in pad)
        bias_max = int(bias_q.abs().max()) if bias_q is not None else 0
        qt = QType(tuple(float(s_x * float(s)) for s in s_eff.tolist()), 0,
                   -(bound + bias_max), bound + bias_max, axis=1 if info.is_conv else -1,
                   fbgemm=(s_x, tuple(float(s) for s in s_eff.tolist())), kind="acc")
        return {"init": init, "qtype": qt}

    # -- everything else on integer inputs -----------------------------------------------------------

    def lower_int_op(self, n: Node, mod: Any) -> Rep:
        t = n.target
        # identities
        if isinstance(mod, _IDENTITY_MODULES) and not (mod.training and
                                                       not isinstance(mod, nn.Identity)):
            return self.env[n.args[0].name]
        if n.op == "call_function" and t in _DROPOUT_FUNCS and _arg(n, 2, "training", True) is False:
            return self.env[n.args[0].name]
        if n.op == "call_function" and _tv_stochastic_depth is not None and \
                t is _tv_stochastic_depth and _arg(n, 3, "training", True) is False:
            return self.env[n.args[0].name]
        # clamps
        clamp = self._clamp_bounds(n, mod)
        if clamp is not None:
            return self.lower_clamp(n, *clamp)
        # pools
        if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            return self.lower_maxpool(n, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                                      mod.ceil_mode, bool(getattr(mod, "return_indices", False)))
        if n.op == "call_function" and t in _MAXPOOL_FUNCS:
            k = _arg(n, 1, "kernel_size")
            return self.lower_maxpool(n, k, _arg(n, 2, "stride", None) or k,
                                      _arg(n, 3, "padding", 0), _arg(n, 4, "dilation", 1),
                                      _arg(n, 5, "ceil_mode", False),
                                      bool(_arg(n, 6, "return_indices", False)))
        if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            return self.lower_avgpool(n, "avg", kernel_size=mod.kernel_size, stride=mod.stride,
                                      padding=mod.padding, ceil_mode=mod.ceil_mode,
                                      count_include_pad=mod.count_include_pad,
                                      divisor_override=getattr(mod, "divisor_override", None))
        if n.op == "call_function" and t in _AVGPOOL_FUNCS:
            k = _arg(n, 1, "kernel_size")
            return self.lower_avgpool(n, "avg", kernel_size=k,
                                      stride=_arg(n, 2, "stride", None) or k,
                                      padding=_arg(n, 3, "padding", 0),
                                      ceil_mode=_arg(n, 4, "ceil_mode", False),
                                      count_include_pad=_arg(n, 5, "count_include_pad", True),
                                      divisor_override=_arg(n, 6, "divisor_override", None))
        if isinstance(mod, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
            return self.lower_avgpool(n, "adaptive", output_size=mod.output_size)
        if n.op == "call_function" and t in _ADAPTIVE_AVG_FUNCS:
            return self.lower_avgpool(n, "adaptive", output_size=_arg(n, 1, "output_size"))
        if (n.op == "call_function" and t is torch.mean) or (n.op == "call_method" and t == "mean"):
            return self.lower_mean(n)
        # shape-only ops
        if isinstance(mod, nn.Flatten) or (n.op == "call_function" and t in PASSTHROUGH_FUNCTIONS) \
                or (n.op == "call_method" and t in PASSTHROUGH_METHODS):
            return self.lower_passthrough(n, mod)
        # joins
        if n.op == "call_function" and t in _CAT_FUNCS:
            return self.lower_cat(n)
        tensors = self.tensor_inputs(n)
        if ((n.op == "call_function" and t in _ADD_FUNCS) or
                (n.op == "call_method" and t in ("add", "add_"))) and len(tensors) == 2:
            return self.lower_add(n, tensors)
        if ((n.op == "call_function" and t in _MUL_FUNCS) or
                (n.op == "call_method" and t in ("mul", "mul_"))) and len(tensors) == 2:
            return self.lower_mul(n, tensors)
        # elementwise
        fn = self._elementwise(n, mod)
        if fn is not None:
            return self.lower_lut(n, *fn)
        raise _Island(f"unsupported op {_target_name(n)}"
                      + (f" ({type(mod).__name__})" if mod is not None else "")
                      + ": no integer lowering")

    # -- clamps -----------------------------------------------------------------------------------

    def _clamp_bounds(self, n: Node, mod: Any) -> tuple[float | None, float | None] | None:
        t = n.target
        if isinstance(mod, nn.ReLU):
            return 0.0, None
        if isinstance(mod, nn.Hardtanh):   # includes ReLU6
            return float(mod.min_val), float(mod.max_val)
        if n.op == "call_function":
            if t in _RELU_FUNCS:
                return 0.0, None
            if t is F.relu6:
                return 0.0, 6.0
            if t in (F.hardtanh, F.hardtanh_):
                return float(_arg(n, 1, "min_val", -1.0)), float(_arg(n, 2, "max_val", 1.0))
            if t in _CLAMP_FUNCS:
                lo, hi = _arg(n, 1, "min", None), _arg(n, 2, "max", None)
                if t is torch.clamp_max:
                    lo, hi = None, _arg(n, 1, "max", None)
                if all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
                    return (None if lo is None else float(lo)), (None if hi is None else float(hi))
        if n.op == "call_method" and t in _CLAMP_METHODS:
            if t in ("relu", "relu_"):
                return 0.0, None
            lo, hi = _arg(n, 1, "min", None), _arg(n, 2, "max", None)
            if t.startswith("clamp_max"):
                lo, hi = None, _arg(n, 1, "max", None)
            if all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
                return (None if lo is None else float(lo)), (None if hi is None else float(hi))
        return None

    def lower_clamp(self, n: Node, lo: float | None, hi: float | None) -> Rep:
        src = self.env[n.args[0].name]
        if not src.is_int:
            raise _Island("clamp of a float value")
        new_lo = lo if src.lo is None else (src.lo if lo is None else max(lo, src.lo))
        new_hi = hi if src.hi is None else (src.hi if hi is None else min(hi, src.hi))
        return Rep(src.node, src.qt, new_lo, new_hi)

    # -- pools --------------------------------------------------------------------------------------

    def lower_maxpool(self, n: Node, k: Any, s: Any, p: Any, d: Any, ceil: bool,
                      indices: bool) -> Rep:
        if indices:
            raise _Island("max pool returning indices")
        src = self.env[n.args[0].name]
        qt = src.qt
        assert qt is not None
        target = self._lookahead_target(n) if qt.per_channel else None
        if target is not None:
            # requantization is monotone, so it commutes with max: requantize the accumulator
            # first (the requant then fuses into its layer, and the pool runs on narrow codes)
            src = self.requantize_to(src, target, n, f"{n.name}_requant")
            qt = src.qt
            assert qt is not None
        if qt.per_channel and qt.axis not in (1,):
            raise _Island("max pool over a per-channel value whose channels are not dim 1")
        mod = IntMaxPool(k, s, p, d, ceil, qt.qmin, qt.qmax)
        node = self._call_int(n.name, mod, (src.node,), n, n.name)
        if QMETA_KEY in n.meta:
            node.meta[QMETA_KEY] = n.meta[QMETA_KEY]
        self.stats["num_pools"] += 1
        return Rep(node, qt, src.lo, src.hi)

    def lower_avgpool(self, n: Node, mode: str, **kw: Any) -> Rep:
        src = self.env[n.args[0].name]
        in_shape = _shape(n.args[0])
        if in_shape is None:
            raise _Island("average pool input without a traced shape")
        if mode == "avg" and kw.get("ceil_mode"):
            raise _Island("average pool with ceil_mode=True")
        src = self.materialize(src, n)
        qt = src.qt
        assert qt is not None
        if qt.per_channel and qt.axis != 1:
            raise _Island("average pool over a per-channel value whose channels are not dim 1")
        nd = (len(kw["output_size"]) if mode == "adaptive" and isinstance(kw["output_size"],
                                                                            (tuple, list))
              else (len(in_shape) - 2))
        probe = torch.ones((1, 1, *in_shape[-nd:]), dtype=torch.int64)
        if mode == "adaptive":
            out = kw["output_size"]
            out = tuple(out) if isinstance(out, (tuple, list)) else (out,) * nd
            _, counts = adaptive_avg_pool_sum(probe, out)
            params = dict(output_size=out)
        else:
            k, st, p = kw["kernel_size"], kw["stride"], kw["padding"]
            _, counts = int_avg_pool_sum(probe, k, st, p)
            if kw.get("divisor_override"):
                counts = torch.full_like(counts, int(kw["divisor_override"]))
            elif kw.get("count_include_pad", True):
                kk = k if isinstance(k, (tuple, list)) else (k,) * nd
                counts = torch.full_like(counts, math.prod(kk))
            params = dict(kernel_size=k, stride=st, padding=p,
                          count_include_pad=kw.get("count_include_pad", True),
                          divisor_override=kw.get("divisor_override"))
        uf = uniform_count_factor(counts)
        if uf is None:
            raise _Island("average pool window counts have no small common multiple")
        lcm, factor = uf
        frac = self._pool_frac_bits(n, qt, lcm)
        if frac:
            lcm, factor = lcm << frac, factor * 2 ** frac
        lo, hi = qt.qmin * lcm, qt.qmax * lcm
        if max(abs(lo - qt.zero_point * lcm), abs(hi - qt.zero_point * lcm)) > _INT32_MAX:
            raise _Island("average-pool sum would leave int32 (requantize the input first)")
        mod = IntAvgPoolSum(mode, lcm=lcm, factor=factor, qmin=lo, qmax=hi,
                            zero_point=qt.zero_point, **params)
        node = self._call_int(n.name, mod, (src.node,), n, n.name)
        self.stats["num_pools"] += 1
        new_qt = QType(tuple(s / lcm for s in qt.scale), qt.zero_point * lcm, lo, hi, qt.axis,
                       None, "sum")
        return Rep(node, new_qt)

    def _pool_frac_bits(self, n: Node, qt: QType, lcm: int) -> int:
        """Fractional bits ``k`` of an average pool's window sum (the pool multiplies by
        ``L·2^k / count``: the mean at scale ``s/(L·2^k)``, the next requantization divides by
        ``2^k``), the analogue of a layer's bias fractional bits. gemmlowp's SRDHM rounds
        ``Σ·M·2^r`` to an integer before the rounding shift ``r``, up to ``2^-(r+1)`` output LSB
        off the exact mean; a global pool onto a coarse grid has ``M`` around ``2^-2`` (up to
        1/8 LSB: at 3 bits ~10% of the pooled codes were 1 LSB off the fake-quant mean). ``k``:
        ``bias-frac-bits`` when set, else ``ceil(log2 M) + 5`` where positive (so ``M·2^-k <=
        2^-5``, as for layers), within int32. 0 for an accumulator (its layer's bias bits
        handle it), a value reaching no quantizer, ``M >= 1/2`` (a single rounding already) and
        the single-rounding contracts."""
        want = self.cfg.bias_frac_bits
        if self.cfg.rounding != "gemmlowp" or want == 0 or qt.kind == "acc":
            return 0
        target = self._lookahead_target(n)
        if target is None:
            return 0
        m = max(qt.scale) / lcm / target.scale[0]
        if not 0 < m < 0.5:
            return 0
        k = want if want is not None else max(0, math.ceil(math.log2(m)) + 5)
        while k > 0 and (qt.max_abs_centered * lcm) << k > _INT32_MAX:
            k -= 1
        return k

    def lower_mean(self, n: Node) -> Rep:
        shape = _shape(n.args[0])
        dims = _arg(n, 1, "dim", None)
        keep = bool(_arg(n, 2, "keepdim", False))
        if shape is None or dims is None or _arg(n, 3, "dtype", None) is not None:
            raise _Island("mean without explicit trailing dims")
        dims = tuple(sorted(d % len(shape) for d in (dims if isinstance(dims, (tuple, list))
                                                     else (dims,))))
        if dims != tuple(range(len(shape) - len(dims), len(shape))) or dims[0] < 1:
            raise _Island(f"mean over dims {dims}: only trailing spatial dims are lowered")
        rep = self.lower_avgpool(n, "adaptive", output_size=(1,) * len(dims))
        if keep:
            return rep
        node = self._emit("call_method", "squeeze", (rep.node, dims), name=f"{n.name}_squeeze",
                          like=n)
        return Rep(node, rep.qt)

    # -- pass-through -------------------------------------------------------------------------------

    def lower_split(self, n: Node) -> Rep:
        """split/chunk/unbind/tensor_split of an integer value: a tuple of slices on the same
        grid; a per-channel grid split along its channel dim gives each piece its channels."""
        src = self.materialize(self.env[n.args[0].name], n)
        qt = src.qt
        assert qt is not None
        pieces = None
        if qt.per_channel:
            tms = n.meta.get("tensor_meta")
            in_shape = _shape(n.args[0])
            dim = _arg(n, 2, "dim", 0) if n.target not in (torch.unbind, "unbind") else \
                _arg(n, 1, "dim", 0)
            if not isinstance(tms, (tuple, list)) or in_shape is None or \
                    not all(hasattr(t, "shape") for t in tms):
                raise _Island("split of a per-channel accumulator without traced shapes")
            ax = (qt.axis or 1) % len(in_shape)
            if int(dim) % len(in_shape) == ax:
                if n.target in (torch.unbind, "unbind"):
                    raise _Island("unbind along the channels of a per-channel accumulator")
                pieces, off = [], 0
                for t in tms:
                    c = int(t.shape[ax])
                    sl = slice(off, off + c)
                    pieces.append(replace(qt, scale=qt.scale[sl], fbgemm=None if qt.fbgemm is None
                                          else (qt.fbgemm[0], qt.fbgemm[1][sl])))
                    off += c
            else:
                pieces = [qt] * len(tms)
        args, kwargs = self.map_args(n, lambda r, a: src.node if a is n.args[0] else r.node)
        node = self._emit(n.op, n.target, args, kwargs, name=n.name, like=n, is_int=False)
        return Rep(node, qt, value=True, pieces=pieces)      # a tuple of integer tensors

    def lower_passthrough(self, n: Node, mod: Any) -> Rep:
        src_node = n.args[0] if n.args else None
        if not isinstance(src_node, Node):
            raise _Island("shape op without a tensor input")
        src = self.env[src_node.name]
        if not src.is_int:
            raise _Island("shape op on a float value")
        if src.pieces is not None and n.target is operator.getitem:
            idx = n.args[1]
            if not isinstance(idx, int):
                raise _Island("indexing a split per-channel value by a non-constant")
            node = self._emit(n.op, n.target, (src.node, idx), name=n.name, like=n)
            return Rep(node, src.pieces[idx])
        qt = src.qt
        assert qt is not None
        if qt.per_channel:
            key = n.target if n.op != "call_module" else "flatten"
            ins, outs = _shape(src_node), _shape(n)
            ok = key in _SHAPE_ONLY and ins is not None and outs is not None
            if ok and qt.axis == 1:
                ok = len(outs) >= 2 and ins[:2] == outs[:2] and \
                    math.prod(ins[2:]) == math.prod(outs[2:])
            elif ok:
                ok = ins[-1] == outs[-1] and math.prod(ins[:-1]) == math.prod(outs[:-1])
            if not ok:
                # quantization is elementwise: put the value on the grid of the quantizer it
                # reaches first, then move it around
                target = self._lookahead_target(n)
                if target is None:
                    raise _Island("shape op moves the channels of a per-channel accumulator "
                                  "and its value reaches no quantizer")
                src = self.requantize_to(src, target, n, f"{n.name}_requant")
                qt = src.qt
                assert qt is not None
        args, kwargs = self.map_args(n, lambda r, a: src.node if a is src_node else r.node)
        node = self._emit(n.op, n.target, args, kwargs, name=n.name, like=n)
        return Rep(node, qt, src.lo, src.hi)

    # -- joins --------------------------------------------------------------------------------------

    def _output_target(self, n: Node) -> QType | None:
        """The grid of the quantizer right after ``n`` (join outputs), if any."""
        for u in n.users:
            m = self._module(u)
            if isinstance(m, ActFakeQuant) and u.args and u.args[0] is n:
                return self._fq_qtype(m)
        return None

    def _lookahead_target(self, n: Node) -> QType | None:
        """The quantizer grid a value reaches through shape-only ops, dropout and max pools
        (ops that commute with quantization), following a single-user chain."""
        cur = n
        for _ in range(32):
            users = list(cur.users)
            if len(users) != 1:
                return None
            u = users[0]
            m = self._module(u)
            if isinstance(m, ActFakeQuant):
                return self._fq_qtype(m)
            if u.args and u.args[0] is not cur:
                return None
            if isinstance(m, (nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) or \
                    isinstance(m, _IDENTITY_MODULES) or \
                    (u.op == "call_function" and (u.target in PASSTHROUGH_FUNCTIONS
                                                  or u.target in _MAXPOOL_FUNCS
                                                  or u.target in _DROPOUT_FUNCS)) or \
                    (u.op == "call_method" and u.target in PASSTHROUGH_METHODS):
                cur = u
                continue
            return None
        return None

    def _int_inputs(self, n: Node, tensors: Sequence[Node]) -> list[Rep]:
        reps = []
        for a in tensors:
            r = self.env[a.name]
            if not r.is_int:
                raise _Island(f"{_target_name(n)} of a float and an integer value")
            reps.append(self.materialize(r, n))
        return reps

    def lower_add(self, n: Node, tensors: list[Node]) -> Rep:
        if n.kwargs.get("alpha", 1) != 1 or (len(n.args) > 2):
            raise _Island("add with alpha")
        reps = self._int_inputs(n, tensors)
        target = self._output_target(n)
        qts = [r.qt for r in reps]
        if any(q.per_channel for q in qts):  # type: ignore[union-attr]
            raise _Island("add of a per-channel accumulator (no quantizer on the add's inputs)")
        if target is None:
            first = qts[0]
            if not all(q.same_grid(first) for q in qts):  # type: ignore[union-attr]
                raise _Island("add of values on different grids with no quantizer after it")
            k = len(qts)
            target = QType(first.scale, first.zero_point * k, sum(q.qmin for q in qts),
                           sum(q.qmax for q in qts), kind="sum")
        mod = IntAdd([q.scale[0] for q in qts], [q.zero_point for q in qts],
                     [q.max_abs_centered for q in qts], target.scale[0], target.zero_point,
                     target.qmin, target.qmax, self.cfg.rounding, self.cfg.multiplier_bits)
        node = self._call_int(n.name, mod, tuple(r.node for r in reps), n, n.name)
        if QMETA_KEY in n.meta:
            node.meta[QMETA_KEY] = n.meta[QMETA_KEY]
        self.stats["num_int_adds"] += 1
        return Rep(node, target)

    def lower_mul(self, n: Node, tensors: list[Node]) -> Rep:
        reps = []
        for a in tensors:
            r = self.env[a.name]
            if not r.is_int:
                raise _Island(f"{_target_name(n)} of a float and an integer value")
            if r.qt.per_channel or r.qt.span >= 2 ** 16:  # type: ignore[union-attr]
                r = self._intermediate_grid(n, a, r, f"{n.name}_{a.name}_grid")
            reps.append(self.materialize(r, n))
        target = self._lookahead_target(n)
        if target is None:
            raise _Island("tensor product whose value reaches no quantizer (no output grid)")
        a, b = (r.qt for r in reps)
        assert a is not None and b is not None
        if a.max_abs_centered * b.max_abs_centered > _INT32_MAX:
            raise _Island("tensor product of wide operands would leave int32")
        mod = IntMul((a.scale[0], a.zero_point), (b.scale[0], b.zero_point),
                     target.scale[0], target.zero_point, target.qmin, target.qmax,
                     self.cfg.rounding, self.cfg.multiplier_bits)
        mod.rq.prove(a.max_abs_centered * b.max_abs_centered)
        node = self._call_int(n.name, mod, tuple(r.node for r in reps), n, n.name)
        if QMETA_KEY in n.meta:
            node.meta[QMETA_KEY] = n.meta[QMETA_KEY]
        self.stats["num_int_muls"] += 1
        return Rep(node, target)

    def lower_cat(self, n: Node) -> Rep:
        seq = _arg(n, 0, "tensors", ())
        dim = _arg(n, 1, "dim", 0)
        if not isinstance(seq, (list, tuple)) or not all(isinstance(a, Node) for a in seq):
            raise _Island("cat of a non-list argument")
        reps = self._int_inputs(n, list(seq))
        qts = [r.qt for r in reps]
        if any(q.per_channel for q in qts):  # type: ignore[union-attr]
            raise _Island("cat of a per-channel accumulator")
        target = self._output_target(n)
        if target is None:
            first = qts[0]
            if not all(q.same_grid(first) for q in qts):  # type: ignore[union-attr]
                raise _Island("cat of values on different grids with no quantizer after it")
            target = replace(first, qmin=min(q.qmin for q in qts),  # type: ignore[union-attr]
                             qmax=max(q.qmax for q in qts))  # type: ignore[union-attr]
        rqs: list[Requantize | None] = []
        for q in qts:
            assert q is not None
            if q.within(target):
                rqs.append(None)
                continue
            rq = Requantize(q.scale[0] / target.scale[0], in_zero_point=q.zero_point,
                            out_zero_point=target.zero_point, qmin=target.qmin,
                            qmax=target.qmax, rounding=self.cfg.rounding,
                            multiplier_bits=self.cfg.multiplier_bits,
                            scale_f32=_f32(q.scale[0]) / _f32(target.scale[0]))
            rq.prove(q.max_abs_centered)
            rqs.append(rq)
        mod = IntCat(int(dim), rqs, target.qmin, target.qmax)
        node = self._call_int(n.name, mod, tuple(r.node for r in reps), n, n.name)
        if QMETA_KEY in n.meta:
            node.meta[QMETA_KEY] = n.meta[QMETA_KEY]
        self.stats["num_int_cats"] += 1
        return Rep(node, target)

    # -- elementwise lookup tables ------------------------------------------------------------------

    def _elementwise(self, n: Node, mod: Any) -> tuple[Callable[[Tensor], Tensor], str] | None:
        t = n.target
        if mod is not None:
            for cls, name in _LUT_MODULES.items():
                if type(mod) is cls:
                    return mod, name
            return None
        tensors = self.tensor_inputs(n)
        if len(tensors) != 1 or not n.args or n.args[0] is not tensors[0]:
            return None
        rest_args = n.args[1:]
        if any(a is not tensors[0] for a in n.all_input_nodes):
            return None
        kwargs = dict(n.kwargs)
        if kwargs.get("inplace"):
            kwargs["inplace"] = False
        if n.op == "call_function" and t in _LUT_FUNCS:
            return (lambda x, t=t, a=rest_args, k=kwargs: t(x, *a, **k)), _LUT_FUNCS[t]
        if n.op == "call_method" and t in _LUT_METHODS:
            return (lambda x, t=t, a=rest_args, k=kwargs: getattr(x, t)(*a, **k)), _LUT_METHODS[t]
        if n.op == "call_function" and t in _ARITH_CONST and len(rest_args) == 1 and \
                isinstance(rest_args[0], (int, float)) and not kwargs:
            c = rest_args[0]
            return (lambda x, t=t, c=c: t(x, c)), f"{_ARITH_CONST[t]}({c})"
        if n.op == "call_method" and t in _ARITH_CONST_METHODS and len(rest_args) == 1 and \
                isinstance(rest_args[0], (int, float)) and not kwargs:
            c = rest_args[0]
            return (lambda x, t=t, c=c: getattr(x, t)(c)), f"{_ARITH_CONST_METHODS[t]}({c})"
        # scalar on the left: 1.0 - x, 2 * x ...
        if n.op == "call_function" and t in _ARITH_CONST and len(n.args) == 2 and \
                isinstance(n.args[0], (int, float)) and n.args[1] is tensors[0]:
            c = n.args[0]
            return (lambda x, t=t, c=c: t(c, x)), f"r{_ARITH_CONST[t]}({c})"
        return None

    def lower_lut(self, n: Node, fn: Callable[[Tensor], Tensor], name: str) -> Rep:
        x_node = self.tensor_inputs(n)[0]
        src = self.env[x_node.name]
        if not src.is_int:
            raise _Island("elementwise op on a float value")
        lo, hi = src.lo, src.hi
        if src.qt.per_channel or src.qt.span >= 2 ** 16:  # type: ignore[union-attr]
            src = self._intermediate_grid(n, x_node, src, f"{n.name}_lut_in")
            lo = hi = None                       # folded into the grid's range
        qt = src.qt
        assert qt is not None
        if lo is not None or hi is not None:
            inner = fn

            def fn(x: Tensor, inner: Callable = inner, lo: Any = lo, hi: Any = hi) -> Tensor:
                return inner(torch.clamp(x, lo, hi))
        target = self._lookahead_target(n)
        if target is None:
            target = self._lut_output_grid(fn, qt, name)
        table = build_lut_f32(fn, qt.scale[0], qt.zero_point, qt.qmin, qt.qmax, target.scale[0],
                              target.zero_point, target.qmin, target.qmax)
        mod = IntLUT(table, qt.qmin, name, in_scale=qt.scale[0], in_zero_point=qt.zero_point,
                     out_scale=target.scale[0], out_zero_point=target.zero_point,
                     qmin=int(table.min()), qmax=int(table.max()), out_qmin=target.qmin,
                     out_qmax=target.qmax)
        mod.fn = fn                # the float function, for verify-int-sim's reference rebuild
        node = self._call_int(n.name, mod, (src.node,), n, n.name)
        if QMETA_KEY in n.meta:
            node.meta[QMETA_KEY] = n.meta[QMETA_KEY]
        self.stats["num_luts"] += 1
        return Rep(node, replace(target, qmin=int(table.min()), qmax=int(table.max())))

    def _lut_output_grid(self, fn: Callable[[Tensor], Tensor], qt: QType, name: str) -> QType:
        """The grid of a table whose value reaches no quantizer: exactly the range of ``fn`` over
        the input codes, ``gate-bits`` wide for bounded functions (gates), else ``lut-bits``."""
        codes = torch.arange(qt.qmin, qt.qmax + 1, dtype=torch.int64)
        with torch.no_grad():
            v = fn((codes - qt.zero_point).to(torch.float32) * _f32(qt.scale[0]))
        if not bool(torch.isfinite(v).all()):
            raise _Island(f"{name} is not finite on its input grid")
        mn, mx = float(v.min()), float(v.max())
        bits = self.cfg.gate_bits if name in _BOUNDED else self.cfg.lut_bits
        if mn >= 0:
            levels = 2 ** bits - 1
            return QType((float(_f32(max(mx, 1e-12) / levels)),), 0, 0, levels, kind="codes")
        half = 2 ** (bits - 1) - 1
        return QType((float(_f32(max(abs(mn), abs(mx)) / half)),), 0, -half, half, kind="codes")

    def _intermediate_grid(self, n: Node, x_node: Node, src: Rep, name: str) -> Rep:
        """Requantize a wide value (accumulator, window sum) onto a ``lut-bits`` signed grid whose
        range is the value's observed range (calibration data) or else its proven bound; a
        pending clamp is folded into the requantization."""
        qt = src.qt
        assert qt is not None
        bound = max(abs(s) for s in qt.scale) * qt.max_abs_centered
        if x_node.name in self.ranges:
            mn, mx = self.ranges[x_node.name]
            how = "observed"
        else:
            mn, mx, how = -bound, bound, "proven bound"
        if src.lo is not None:
            mn, mx = max(mn, src.lo), max(mx, src.lo)
        if src.hi is not None:
            mn, mx = min(mn, src.hi), min(mx, src.hi)
        amax = min(max(abs(mn), abs(mx)), bound) if bound > 0 else max(abs(mn), abs(mx))
        # a power-of-two range (at most one bit of the grid) keeps the grid when a channel that
        # did not set the range's leading bit goes away (prune-zero-bit-channels stays bit-exact)
        amax = 2.0 ** math.ceil(math.log2(amax)) if amax > 0 else 1.0
        half = 2 ** (self.cfg.lut_bits - 1) - 1
        grid = QType((float(_f32(amax / half)),), 0, -half, half, kind="codes")
        rep = self.requantize_to(src, grid, n, name)
        rep.node.meta["qpasses.int_sim.note"] = f"intermediate grid: {how} range ±{amax:.4g}"
        return rep


# ------------------------------------------------------------------------------------------------
# post-processing


def _bias_frac_bits(layer: IntLayer, real: Tensor, rounding: str, want: int | None,
                    headroom: int = 1) -> int:
    """Fractional bits for the bias of a layer whose accumulator reaches its requantization with
    real multiplier ``real`` per accumulator unit: ``want``, or (None) just enough that rounding
    the bias costs at most 1/64 output LSB (``M·2^-(k+1) <= 2^-6``), capped so that
    ``((bound << k) + |b_q|) · headroom`` (pool sums) stays in int32. 0 where there is no bias or
    the contract is float-rne (fbgemm's float bias)."""
    if layer.bias_q is None or rounding == "float-rne" or getattr(layer, "bias", None) is None:
        return 0
    if not bool(layer.bias_base.any()):
        return 0       # only pruning folds (whole accumulator units), or a zero bias: nothing to keep
    # all-zero (0-bit) kernels only output their bias, set exactly by
    # _exact_zero_kernel_constants; leaving them out also keeps k the same when
    # prune-zero-bit-channels removes them
    real = real.reshape(-1).expand(layer.w_q.shape[0])[~_zero_kernels(layer)]
    m_max = float(real.max()) if real.numel() else 0.0
    k = want if want is not None else (max(0, math.ceil(math.log2(m_max)) + 5) if m_max > 0
                                       else 0)
    while k > 0:
        b = _scaled_bias(layer, k)
        if ((layer.acc_bound << k) + int(b.abs().max())) * headroom <= _INT32_MAX:
            break
        k -= 1
    return k


def _round_bias(parts: tuple[Tensor, Tensor], acc_scale: Tensor) -> Tensor:
    """``b / acc_scale`` rounded, with a pruning fold (an integer number of accumulator units up
    to float error, see :func:`qpasses.ir.layers.bias_parts`) rounded on its own."""
    base, fold = parts
    return torch.round(base / acc_scale) + torch.round(fold / acc_scale)


def _scaled_bias(layer: IntLayer, k: int) -> Tensor:
    return _round_bias((layer.bias_base, layer.bias_fold), layer.acc_scale / 2.0 ** k).to(
        torch.int64)


def _zero_kernels(layer: IntLayer) -> Tensor:
    """Output channels whose integer kernel is all zero (``w_q == w_zp``): 0-bit kernels."""
    wz = layer.w_zp.reshape(-1, *[1] * (layer.w_q.dim() - 1)) if layer.w_zp.numel() > 1 \
        else layer.w_zp
    return ((layer.w_q - wz) == 0).flatten(1).all(1)


def _constant_chain(gm: torch.fx.GraphModule, node: Node, layer: IntLayer
                    ) -> tuple[list[Node], Requantize] | None:
    """The ops from a layer's output to the requantization that puts it on a grid, when every op
    maps a per-channel constant to a constant (clamp, pools, shape ops): (ops, requantization).
    A layer with a fused requantization is its own chain."""
    if layer.requant is not None:
        return [], layer.requant
    chain, cur = [], node
    while len(cur.users) == 1:
        cur = next(iter(cur.users))
        mod = gm.get_submodule(str(cur.target)) if cur.op == "call_module" else None
        if isinstance(mod, Requantize):
            return chain, mod
        if not (isinstance(mod, (IntClamp, IntMaxPool, IntAvgPoolSum))
                or (cur.op == "call_function" and cur.target in PASSTHROUGH_FUNCTIONS)
                or (cur.op == "call_method" and cur.target in PASSTHROUGH_METHODS)):
            return None
        chain.append(cur)
    return None


def _pool_lcm(gm: torch.fx.GraphModule, chain: list[Node]) -> int:
    """Product of the average pools' ``L`` along ``chain`` (a pool sum is at scale ``s/L``)."""
    mods = [gm.get_submodule(str(n.target)) for n in chain if n.op == "call_module"]
    return math.prod(m.lcm for m in mods if isinstance(m, IntAvgPoolSum))


def _shift_unfused_biases(gm: torch.fx.GraphModule, bias_frac_bits: int | None) -> None:
    """Fractional bias bits (as :func:`_fuse_requant` gives fused layers) for a layer whose
    accumulator reaches its requantization through clamps, pools and shape ops: the accumulator,
    the clamp bounds and the declared ranges along the way scale by ``2^k`` and the requantization
    divides by it. Without this a coarse accumulator grid (multiplier > 1) rounds the bias by up
    to half an output LSB."""
    for node in list(gm.graph.nodes):
        layer = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not isinstance(layer, IntLayer) or layer.requant is not None or layer.acc_shift:
            continue
        found = _constant_chain(gm, node, layer)
        if found is None:
            continue
        chain, rq = found
        lcm = _pool_lcm(gm, chain)
        if rq.in_zero_point or rq.real.numel() not in (1, layer.w_q.shape[0]):
            continue
        k = _bias_frac_bits(layer, rq.real * lcm, rq.rounding, bias_frac_bits, headroom=lcm)
        if not k:
            continue
        layer.set_acc_shift(k, _scaled_bias(layer, k))
        # declared ranges along the chain, re-derived from the shifted accumulator: the bias
        # re-rounded on the finer grid can exceed the old bias << k (by up to 2^(k-1))
        lo, hi = -layer.acc_max, layer.acc_max
        for n in chain:
            mod = gm.get_submodule(str(n.target)) if n.op == "call_module" else None
            if isinstance(mod, IntClamp):
                mod.lo.mul_(2 ** k)
                mod.hi.mul_(2 ** k)
                lo, hi = max(lo, int(mod.lo.min())), min(hi, int(mod.hi.max()))
            elif isinstance(mod, IntAvgPoolSum):
                lo, hi = lo * mod.lcm, hi * mod.lcm
            if isinstance(mod, (IntClamp, IntMaxPool, IntAvgPoolSum)):
                mod.qmin, mod.qmax = lo, hi
        new = Requantize(rq.real / 2.0 ** k, in_zero_point=0, out_zero_point=rq.out_zero_point,
                         qmin=rq.qmin, qmax=rq.qmax, rounding=rq.rounding,
                         multiplier_bits=rq.multiplier_bits, axis=rq.axis)
        new.prove(max(abs(lo), abs(hi)))
        rq_node = next(iter((chain[-1] if chain else node).users))
        gm.set_submodule(str(rq_node.target), new)


def _run_chain(gm: torch.fx.GraphModule, chain: list[Node], rq: Requantize, x: Tensor) -> Tensor:
    for n in chain:
        if n.op == "call_module":
            x = gm.get_submodule(str(n.target))(x)
        elif n.op == "call_function":
            x = n.target(x, *n.args[1:], **n.kwargs)
        else:
            x = getattr(x, n.target)(*n.args[1:], **n.kwargs)
    return rq(x)


def _exact_zero_kernel_constants(gm: torch.fx.GraphModule) -> int:
    """Give every all-zero (0-bit) kernel the integer bias whose output, after the ops up to its
    requantization, equals the fake-quant graph's constant: the float bias, clamped, through the
    output quantizer (``clamp(rne(b · (1/s)) + z)`` in float32). Rounding the bias onto the
    accumulator grid and requantizing it afterwards can land one LSB off that, and
    ``prune-zero-bit-channels`` folds the fake-quant constant; with this, pruned and unpruned
    graphs lower to the same integers. Only biases within the layer's current ``max |b_q|`` are
    used, so every declared range stays valid. Returns the number of biases changed."""
    changed = 0
    for node in gm.graph.nodes:
        layer = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not isinstance(layer, IntLayer) or layer.bias_q is None or \
                getattr(layer, "bias", None) is None or layer._float_bias_fused:
            continue
        zero = _zero_kernels(layer)
        found = _constant_chain(gm, node, layer) if bool(zero.any()) else None
        shape = _shape(node)
        if found is None or shape is None or len(shape) < 2:
            continue
        chain, rq = found
        c = layer.bias_q.numel()
        if rq.rounding == "float-rne" or rq.real.numel() not in (1, c) or shape[1] != c:
            continue
        # real value of one code entering rq, per code leaving the layer (pool sums scale by L)
        real = rq.real.reshape(-1).expand(c) * _pool_lcm(gm, chain)
        acc_scale = layer.acc_scale.reshape(-1).expand(c) / 2.0 ** layer.acc_shift
        b = layer.bias.detach().double().reshape(-1)
        for n in chain:
            mod = gm.get_submodule(str(n.target)) if n.op == "call_module" else None
            if isinstance(mod, IntClamp):
                b = torch.minimum(torch.maximum(b, mod.lo.expand(c) * acc_scale),
                                  mod.hi.expand(c) * acc_scale)
        s32 = (acc_scale / real).to(torch.float32)
        z = rq.out_zero_point
        want = (torch.round(b.to(torch.float32) * (1.0 / s32)).to(torch.int64) + z).clamp(
            rq.qmin, rq.qmax)
        b_q = layer.bias_q
        # the integer inputs v with round(v·real) = want - z, nearest to the current bias
        lo = torch.ceil((want - z - 0.5).double() / real)
        hi = torch.floor((want - z + 0.5).double() / real)
        v = torch.minimum(torch.maximum(b_q.double(), lo), hi).to(torch.int64)
        cands = torch.cat([b_q.unsqueeze(0), v + torch.arange(-2, 3).unsqueeze(1)])
        x = cands.reshape(*cands.shape, *[1] * (len(shape) - 2)).expand(
            cands.shape[0], c, *shape[2:])
        with torch.no_grad():
            out = _run_chain(gm, chain, rq, x)     # a zero kernel's accumulator is its bias
        hit = (out.reshape(cands.shape[0], c, -1) == want.view(1, c, 1)).all(-1)
        hit &= cands.abs() <= int(b_q.abs().max())
        dist = torch.where(hit, (cands - b_q).abs(), torch.iinfo(torch.int64).max)
        best = cands.gather(0, dist.argmin(0, keepdim=True)).squeeze(0)
        new = torch.where(zero & hit.any(0), best, b_q)
        changed += int((new != b_q).sum())
        layer.set_acc_shift(layer.acc_shift, new)
    return changed


def _fuse_requant(gm: torch.fx.GraphModule, bias_frac_bits: int | None = None) -> dict[str, str]:
    """Fold a Requantize that is the only consumer of an IntLayer into the layer (with the bias's
    fractional bits, see :func:`_bias_frac_bits`); returns {removed requantize node: layer node}."""
    fused: dict[str, str] = {}
    mods = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(mods.get(str(node.target)), Requantize):
            continue
        src = node.args[0]
        if not (isinstance(src, Node) and src.op == "call_module"):
            continue
        layer = mods.get(str(src.target))
        if not isinstance(layer, IntLayer) or layer.requant is not None or len(src.users) != 1:
            continue
        rq = mods[str(node.target)]
        k = _bias_frac_bits(layer, rq.real, rq.rounding, bias_frac_bits)
        if k:
            layer.set_acc_shift(k, _scaled_bias(layer, k))
            rq = Requantize(rq.real / 2.0 ** k, in_zero_point=0,
                            out_zero_point=rq.out_zero_point, qmin=rq.qmin, qmax=rq.qmax,
                            rounding=rq.rounding, multiplier_bits=rq.multiplier_bits,
                            axis=rq.axis)
        rq.prove(layer.acc_max)
        layer.set_requant(rq)
        node.replace_all_uses_with(src)
        meta = src.meta
        for k in ("tensor_meta",):
            if k in node.meta:
                meta[k] = node.meta[k]
        fused[node.name] = src.name
        gm.graph.erase_node(node)
    return fused


def observe_ranges(gm: torch.fx.GraphModule, batches: Sequence[tuple[Tensor, ...]],
                   names: set[str]) -> dict[str, tuple[float, float]]:
    """Min/max of the named nodes' values over ``batches`` (fake-quant graph, no_grad)."""
    if not names or not batches:
        return {}
    out: dict[str, tuple[float, float]] = {}

    class _Rec(torch.fx.Interpreter):
        def run_node(self, node: Node) -> Any:
            v = super().run_node(node)
            if node.name in names and isinstance(v, Tensor) and v.is_floating_point() \
                    and v.numel():
                mn, mx = float(v.min()), float(v.max())
                if node.name in out:
                    a, b = out[node.name]
                    mn, mx = min(a, mn), max(b, mx)
                out[node.name] = (mn, mx)
            return v

    was = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            for b in batches:
                _Rec(gm).run(*b)
    finally:
        gm.train(was)
    return out


def _range_candidates(gm: torch.fx.GraphModule) -> set[str]:
    """Values that may need an intermediate grid: inputs of elementwise nonlinearities and of
    tensor products that no fake quantizer covers."""
    mods = dict(gm.named_modules())
    names = set()
    for n in gm.graph.nodes:
        m = mods.get(str(n.target)) if n.op == "call_module" else None
        hit = (m is not None and type(m) in _LUT_MODULES) or \
            (n.op == "call_function" and (n.target in _LUT_FUNCS or n.target in _MUL_FUNCS)) or \
            (n.op == "call_method" and (n.target in _LUT_METHODS or n.target in ("mul", "mul_")))
        if not hit:
            continue
        for src in n.all_input_nodes:
            sm = mods.get(str(src.target)) if src.op == "call_module" else None
            if not isinstance(sm, ActFakeQuant) and _is_tensor(src):
                names.add(src.name)
    return names


def lower_graph(gm: torch.fx.GraphModule, cfg: LoweringConfig,
                batches: Sequence[tuple[Tensor, ...]] = ()) -> dict[str, Any]:
    """Rewrite ``gm`` (calibrated fake-quant) in place into the integer graph; returns the record
    stored in ``gm.meta[INT_SIM_META_KEY]`` (options, float islands, kernel counts, stats)."""
    source = None
    if cfg.keep_fake_quant:
        source = copy.deepcopy(gm)
        source.meta.pop(INT_SIM_META_KEY, None)
    ranges = observe_ranges(gm, list(batches)[:2], _range_candidates(gm))
    b = _Lowering(gm, cfg, ranges)
    b.run()
    # install modules
    for path, mod in b.layer_swaps.items():
        gm.set_submodule(path, mod)
    if b.int_modules:
        box = nn.ModuleDict()
        for k, m in b.int_modules.items():
            box[k] = m
        if hasattr(gm, INT_SIM_CONTAINER):
            delattr(gm, INT_SIM_CONTAINER)
        gm.add_module(INT_SIM_CONTAINER, box)
    gm.graph = b.new
    fused = _fuse_requant(gm, cfg.bias_frac_bits)
    _shift_unfused_biases(gm, cfg.bias_frac_bits)
    num_exact_constants = _exact_zero_kernel_constants(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    # drop int-sim modules no node uses any more (fused requants stay inside their layers)
    used = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    box = getattr(gm, INT_SIM_CONTAINER, None)
    if isinstance(box, nn.ModuleDict):
        for k in list(box.keys()):
            if f"{INT_SIM_CONTAINER}.{k}" not in used:
                del box[k]
    set_backend(gm, cfg.backend)
    gm.recompile()
    stats = dict(b.stats)
    stats["num_requantize"] -= len(fused)
    stats["num_fused_requant"] = len(fused)
    stats["num_exact_zero_kernel_constants"] = num_exact_constants
    live = {n.name for n in gm.graph.nodes}
    fq_map = {}
    for k, v in b.fq_map.items():
        v = dict(v, node=fused.get(v["node"], v["node"]))
        if v["node"] in live:
            fq_map[k] = v
    for k, v in sorted(b.kernels.items()):
        stats[f"num_kernel_{k.replace('-', '_')}"] = v
    record = {"rounding": cfg.rounding, "backend": cfg.backend,
              "multiplier_bits": cfg.multiplier_bits, "lut_bits": cfg.lut_bits,
              "gate_bits": cfg.gate_bits, "bias_frac_bits": cfg.bias_frac_bits,
              "float_islands": list(b.islands),
              "stats": stats, "fake_quant": source, "ranges": ranges, "fq_map": fq_map}
    gm.meta[INT_SIM_META_KEY] = record
    return record
