"""Lowering rules for per-channel affine ops on integer values (:class:`IntAffine`): eval-mode
BatchNorm that no conv absorbed (DenseNet's pre-activation BN after a concatenation), and
``x * param``, ``x + param``, ``x - c``, ``c - x``, ``x / c`` with a constant operand that is
per channel or per tensor (ConvNeXt's layer scale); constant operands are evaluated at lowering
(:meth:`AffineRules.const_value`). Also the channel-axis bookkeeping of channel-moving shape ops
(:func:`moved_axis`)."""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from qpasses.errors import NumericsError
from qpasses.ir.annotations import QMETA_KEY
from qpasses.ir.fx import attr_value, node_arg, node_shape
from qpasses.ir import ops
from qpasses.modules.fake_quant import ActFakeQuant
from qpasses.modules.int_sim_affine import IntAffine
from qpasses.numerics.int_affine import affine_constants
from qpasses.algorithms.lowering.config import INT32_MAX, FloatIsland, QType, Rep
from qpasses.algorithms.lowering.nodes import f32

__all__ = ["AffineRules", "is_shape_query", "moved_axis"]

Node = torch.fx.Node

_BN_F_NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
               "eps")
# binary op family of a target: (kind, is a method)
_BINARY = {**{f: "add" for f in ops.ADD_FUNCTIONS}, **{f: "sub" for f in ops.SUB_FUNCTIONS},
           **{f: "mul" for f in ops.MUL_FUNCTIONS}, **{f: "div" for f in ops.DIV_FUNCTIONS}}
_BINARY_METHODS = {**{m: "add" for m in ops.ADD_METHODS}, **{m: "sub" for m in ops.SUB_METHODS},
                   **{m: "mul" for m in ops.MUL_METHODS}, **{m: "div" for m in ops.DIV_METHODS}}
_PERMUTES = ops.PERMUTE_FUNCTIONS | ops.PERMUTE_METHODS | {torch.movedim, "movedim", torch.t,
                                                              "t"}


def moved_axis(n: Node, axis: int, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...]) -> int | None:
    """Where dim ``axis`` of the input of shape op ``n`` lands in its output: permutes,
    transposes and movedims move it; reshapes keep it whole when the sizes before it and its own
    size survive (the channels are neither split nor merged). None when it does not survive."""
    rank, out_rank = len(in_shape), len(out_shape)
    if not -rank <= axis < rank:
        return None
    a = axis % rank
    t = n.target
    new: int | None = None
    if t in _PERMUTES:
        perm = _permutation(n, rank)
        if perm is None:
            return None
        new = perm.index(a)
    elif t in ops.SHAPE_ONLY_TARGETS or (n.op == "call_module"):
        before = math.prod(in_shape[:a])
        for b in range(out_rank):
            if math.prod(out_shape[:b]) == before and out_shape[b] == in_shape[a]:
                new = b
                break
    if new is None:
        return None
    # a negative axis (a linear accumulator's -1) stays -1 while the channels stay last; else
    # the position counts from the front (pools and convs read channels at dim 1)
    return -1 if axis < 0 and new == out_rank - 1 else new


def _permutation(n: Node, rank: int) -> list[int] | None:
    t, args = n.target, list(n.args[1:])
    try:
        if t in (torch.permute, "permute"):
            dims = node_arg(n, 1, "dims", None) if t is torch.permute else args
            if dims is not None and len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = dims[0]
            perm = [int(d) % rank for d in dims]
        elif t in (torch.t, "t"):
            perm = list(range(rank))[::-1] if rank == 2 else list(range(rank))
        elif t in (torch.movedim, "movedim"):
            src = node_arg(n, 1, "source", None)
            dst = node_arg(n, 2, "destination", None)
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src, dst = [int(s) % rank for s in src], [int(d) % rank for d in dst]
            rest = [d for d in range(rank) if d not in src]
            perm = [-1] * rank
            for s_, d_ in zip(src, dst):
                perm[d_] = s_
            it = iter(rest)
            perm = [p if p >= 0 else next(it) for p in perm]
        else:                       # transpose / swapaxes / swapdims
            i, j = (int(d) % rank for d in args[:2])
            perm = list(range(rank))
            perm[i], perm[j] = perm[j], perm[i]
    except (TypeError, ValueError, StopIteration):
        return None
    return perm if sorted(perm) == list(range(rank)) else None


class AffineRules:
    """Lowers per-channel affine ops to :class:`IntAffine`.

    Mixed into :class:`~qpasses.algorithms.lowering.builder.GraphLowering`, whose ``env``,
    ``options``, ``stats`` and emit helpers it uses.
    """

    # -- constants ----------------------------------------------------------------------------

    def const_value(self, node: Any, depth: int = 0) -> Tensor | None:
        """The value of a node computed from constants only (parameters and buffers, and ops
        on them with literal arguments), evaluated now; None when it depends on an input."""
        if not isinstance(node, Node):
            return None
        cache = self.__dict__.setdefault("_const_cache", {})
        if node.name in cache:
            return cache[node.name]
        val = None if depth > 64 else self._const_eval(node, depth)
        cache[node.name] = val
        return val

    def _const_eval(self, node: Node, depth: int) -> Tensor | None:
        if node.op == "get_attr":
            v = attr_value(self.gm, str(node.target))
            return v.detach() if isinstance(v, Tensor) else None
        if node.op not in ("call_function", "call_method"):
            return None
        if node.op == "call_function" and node.target in ops.DROPOUT_FUNCTIONS:
            return None
        vals: dict[str, Any] = {}
        for a in node.all_input_nodes:
            v = self.const_value(a, depth + 1)
            if v is None:
                return None
            vals[a.name] = v
        if not vals:
            return None

        def get(a: Node) -> Any:
            return vals[a.name]
        args = torch.fx.node.map_arg(node.args, get)
        kwargs = torch.fx.node.map_arg(node.kwargs, get)
        try:
            with torch.no_grad():
                out = node.target(*args, **kwargs) if node.op == "call_function" else \
                    getattr(args[0], str(node.target))(*args[1:], **kwargs)
        except Exception:  # noqa: BLE001 - any failure: not a constant we can evaluate
            return None
        return out.detach() if isinstance(out, Tensor) else None

    # -- recognising affine ops -----------------------------------------------------------------

    def affine_spec(self, n: Node, mod: Any) -> tuple[Node, Tensor, Tensor, int | None, str] | None:
        """(integer input, gain, bias, channel axis of the output or None, name) of a per-channel
        affine op on an integer value, None for other ops; FloatIsland for a BatchNorm that is
        not affine (training mode)."""
        shape = node_shape(n)
        if shape is None:
            return None
        if isinstance(mod, ops.BATCH_NORM_BASE):
            if type(mod).forward is not ops.BATCH_NORM_FORWARD:
                return None
            if mod.training or mod.running_mean is None or mod.running_var is None:
                raise FloatIsland("BatchNorm normalizing with batch statistics (training mode "
                                  "or no running statistics)")
            if len(n.args) != 1 or n.kwargs:
                return None
            g, b = self._bn_affine(mod.running_mean, mod.running_var, mod.weight, mod.bias,
                                   float(mod.eps))
            return n.args[0], g, b, 1 if len(shape) > 1 else None, type(mod).__name__
        if n.op == "call_function" and n.target is F.batch_norm:
            vals = {k: node_arg(n, i, k, None) for i, k in enumerate(_BN_F_NAMES)}
            if vals["training"] not in (False, None) or not isinstance(vals["input"], Node):
                return None
            t = {k: self.const_value(vals[k]) if isinstance(vals[k], Node) else None
                 for k in ("running_mean", "running_var", "weight", "bias")}
            if t["running_mean"] is None or t["running_var"] is None or \
                    any(isinstance(vals[k], Node) and t[k] is None for k in ("weight", "bias")):
                return None
            eps = vals["eps"] if vals["eps"] is not None else 1e-5
            g, b = self._bn_affine(t["running_mean"], t["running_var"], t["weight"], t["bias"],
                                   float(eps))
            return vals["input"], g, b, 1 if len(shape) > 1 else None, "batch_norm"
        kind = _BINARY.get(n.target) if n.op == "call_function" else \
            _BINARY_METHODS.get(n.target) if n.op == "call_method" else None
        if kind is None or len(n.args) != 2 or n.kwargs:
            return None
        a, c = n.args
        x_left = isinstance(a, Node) and self.env[a.name].is_int
        x, const = (a, c) if x_left else (c, a)
        if not isinstance(x, Node) or not self.env[x.name].is_int or not isinstance(const, Node):
            return None
        cv = self.const_value(const)
        if cv is None or not cv.is_floating_point() or node_shape(x) != shape:
            return None
        axis = _broadcast_axis(tuple(cv.shape), shape)
        if axis is False:
            return None
        v = cv.reshape(-1).to(torch.float64)
        one, zero = torch.ones_like(v), torch.zeros_like(v)
        if kind == "mul":
            g, b = v, zero
        elif kind == "add":
            g, b = one, v
        elif kind == "sub":
            g, b = (one, -v) if x_left else (-one, v)
        else:
            if not x_left or bool((v == 0).any()):
                return None
            g, b = 1.0 / v, zero
        return x, g, b, axis, f"{kind} by a constant"

    @staticmethod
    def _bn_affine(mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                   eps: float) -> tuple[Tensor, Tensor]:
        """(gain, bias) of eval-mode BatchNorm from its float32 parameters (float64)."""
        inv = 1.0 / torch.sqrt(var.detach().double() + eps)
        g = inv * (weight.detach().double() if weight is not None else 1.0)
        b = (bias.detach().double() if bias is not None else 0.0) - mean.detach().double() * g
        return g, b

    # -- the rule --------------------------------------------------------------------------------

    def lower_affine(self, n: Node, x_node: Node, gain: Tensor, bias: Tensor,
                     axis: int | None, what: str) -> Rep:
        """``y = gain·x + bias`` per channel: one :class:`IntAffine` onto the grid of the quantizer
        the value reaches (through clamps, shape ops and identities), or an intermediate grid."""
        shape = node_shape(n)
        assert shape is not None
        rank = len(shape)
        if gain.numel() == 1 and bias.numel() == 1:
            axis = None
        src = self.materialize(self.env[x_node.name], n)
        qt = src.qt
        assert qt is not None
        if qt.per_channel and axis is None and qt.axis is not None:
            axis = qt.axis % rank            # one gain for all channels of an accumulator
        if qt.per_channel:
            same = axis is not None and qt.axis is not None and \
                qt.axis % rank == axis % rank and len(qt.scale) == shape[axis]
            if not same:
                src = self.intermediate_grid(n, x_node, src, f"{n.name}_affine_in")
                qt = src.qt
                assert qt is not None
        c = shape[axis] if axis is not None else 1
        # channels fed by 0-bit kernels (constants): left out of the choices that depend on the
        # channel set (bias bits, intermediate grid), so pruning them changes no other channel
        const = self.constant_channels(x_node) if not qt.per_channel and axis is not None \
            and axis % rank == 1 else None
        live = None if const is None or const.numel() != c else torch.isnan(const)
        found = self.affine_target(n)
        fq = None
        if found is not None:
            target, lo, hi, fq = found
            qmin, qmax = self.clamp_codes(target, lo, hi)
        else:
            target = self._affine_grid(n, gain, bias, qt, c, live)
            qmin, qmax = target.qmin, target.qmax
        in_scale = torch.tensor(qt.scale, dtype=torch.float64)
        if qt.max_abs_centered > INT32_MAX:
            raise FloatIsland("affine input beyond int32")
        try:
            k = affine_constants(gain.expand(c) if gain.numel() == 1 else gain,
                                 bias.expand(c) if bias.numel() == 1 else bias,
                                 in_scale, target.scale[0], qt.max_abs_centered,
                                 self.options.rounding, self.options.multiplier_bits,
                                 self.options.bias_frac_bits, live)
        except NumericsError as e:
            raise FloatIsland(f"{what}: {e}") from None
        if self.options.rounding == "gemmlowp":
            left = max(0, math.frexp(float(k.real.max()))[1])
            if (k.acc_max << left) > INT32_MAX:
                raise FloatIsland(f"{what}: gemmlowp's left shift of the affine accumulator "
                                  "would leave int32 (use rounding=single or hawq)")
        mod = IntAffine(k, in_zero_point=qt.zero_point, out_zero_point=target.zero_point,
                        qmin=qmin, qmax=qmax, rounding=self.options.rounding,
                        multiplier_bits=self.options.multiplier_bits,
                        axis=axis if c > 1 else None, what=what)
        if found is None:
            self.plan_exact_chain(mod, x_node, n, qt)
        changed = self.exact_constant_channels(mod, x_node, n, qt, target, fq)
        if changed:
            self.stats["num_exact_affine_constants"] = \
                self.stats.get("num_exact_affine_constants", 0) + changed
        node = self.call_int(n.name, mod, (src.node,), n, n.name)
        if QMETA_KEY in n.meta:
            node.meta[QMETA_KEY] = n.meta[QMETA_KEY]
        self.stats["num_int_affines"] = self.stats.get("num_int_affines", 0) + 1
        return Rep(node, QType(target.scale, target.zero_point, qmin, qmax, kind=target.kind))

    def affine_target(self, n: Node
                      ) -> tuple[QType, float | None, float | None, ActFakeQuant] | None:
        """(grid, lo, hi, quantizer): the quantizer a value reaches through a single-user chain of clamps,
        identities and shape ops, with the clamps met on the way (real units). Exact: rounding
        is monotone, so clamping before or after quantization gives the same codes."""
        cur, lo, hi = n, None, None
        for _ in range(64):
            users = [u for u in cur.users if not is_shape_query(u)]
            if len(users) != 1:
                return None
            u = users[0]
            m = self.module_of(u)
            if isinstance(m, ActFakeQuant):
                return self.fq_qtype(m), lo, hi, m
            if not u.args or u.args[0] is not cur:
                return None
            cl = self.clamp_bounds(u, m)
            if cl is not None:
                a, b = cl
                lo = a if lo is None else (lo if a is None else max(lo, a))
                hi = b if hi is None else (hi if b is None else min(hi, b))
                if lo is not None and hi is not None and hi < lo:
                    hi = lo
                cur = u
                continue
            if _is_identity(u, m) or \
                    (u.op == "call_function" and u.target in ops.PASSTHROUGH_FUNCTIONS
                     and u.target is not operator.getitem) or \
                    (u.op == "call_method" and u.target in ops.PASSTHROUGH_METHODS
                     and u.target != "__getitem__") or isinstance(m, nn.Flatten):
                cur = u
                continue
            return None
        return None

    def _affine_grid(self, n: Node, gain: Tensor, bias: Tensor, qt: QType, c: int,
                     live: Tensor | None = None) -> QType:
        """A ``lut-bits`` signed grid for an affine value that reaches no quantizer: its
        observed range on the calibration data, or its proven bound (power-of-two range)."""
        s = torch.tensor(qt.scale, dtype=torch.float64).expand(c) if len(qt.scale) == 1 \
            else torch.tensor(qt.scale, dtype=torch.float64)
        per = (gain.abs() * s * qt.max_abs_centered + bias.abs()).expand(c)
        if live is not None and bool(live.any()):
            per = per[live]
        bound = float(per.max())
        if n.name in self.ranges:
            mn, mx = self.ranges[n.name]
            amax = min(max(abs(mn), abs(mx)), bound)
        else:
            amax = bound
        amax = 2.0 ** math.ceil(math.log2(amax)) if amax > 0 else 1.0
        half = 2 ** (self.options.lut_bits - 1) - 1
        return QType((float(f32(amax / half)),), 0, -half, half, kind="codes")


def is_shape_query(u: Node) -> bool:
    """Whether ``u`` reads only its input's shape (``size()``, ``.shape``, ``dim()``...)."""
    return (u.op == "call_method" and u.target in ops.SHAPE_QUERY_METHODS) or \
        (u.op == "call_function" and u.target is getattr and len(u.args) > 1
         and u.args[1] in ("shape", "ndim"))


def _is_identity(u: Node, m: Any) -> bool:
    if isinstance(m, ops.EVAL_IDENTITY_MODULES):
        return isinstance(m, nn.Identity) or not m.training
    if u.op == "call_function" and u.target in ops.DROPOUT_FUNCTIONS:
        return node_arg(u, 2, "training", True) is False
    if u.op == "call_function" and ops.is_stochastic_depth(u.target):
        return node_arg(u, 3, "training", True) is False
    return False


def _broadcast_axis(cshape: tuple[int, ...], shape: tuple[int, ...]) -> int | None | bool:
    """The output dim a constant of shape ``cshape`` varies along when broadcast to ``shape``
    (None: a single value), False when it varies along several dims or would grow the output."""
    if len(cshape) > len(shape):
        if any(d != 1 for d in cshape[:len(cshape) - len(shape)]):
            return False
        cshape = cshape[len(cshape) - len(shape):]
    padded = (1,) * (len(shape) - len(cshape)) + tuple(cshape)
    dims = [i for i, d in enumerate(padded) if d != 1]
    if any(padded[i] != shape[i] for i in dims):
        return False
    if not dims:
        return None
    if len(dims) > 1 or dims[0] == 0:
        return False
    return dims[0]
