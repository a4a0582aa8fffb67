"""Translate a lowered integer-simulation graph into an ONNX graph (QDQ or QOperator format).

The walk follows the fx graph in order; every node becomes ONNX nodes named after it (helper
nodes get ``<node>/<role>``), every value a :class:`~qpasses.export.onnx_values.Val`. The
arithmetic each mapping reproduces, and where onnxruntime's differs, is documented in
docs/export.md.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from passes_registry import get_record

from qpasses.errors import ExportError, ExportWarning
from qpasses.ir import ops
from qpasses.ir.fx import node_shape
from qpasses.ir.records import INT_SIM_KEY
from qpasses.modules.int_sim import Dequantize, IntSimModule, Quantize, Requantize
from qpasses.modules.int_sim_layers import IntLayer, IntLinear
from qpasses.modules.int_sim_ops import (IntAdd, IntAvgPoolSum, IntCat, IntClamp, IntLUT,
                                         IntMaxPool, IntMul)
from qpasses.export.onnx_acc import acc_clamp, acc_max_pool, acc_requantize
from qpasses.export.onnx_qonnx import QonnxGraph, weight_grid
from qpasses.export.onnx_values import OnnxGraph, Val, container, onnx_grid

__all__ = ["FORMATS", "GraphExporter"]

FORMATS = ("qdq", "qoperator", "qonnx")
MS = "com.microsoft"
Node = torch.fx.Node

# float ops allowed in float islands (and before the input quantize): fx target -> ONNX op
_FLOAT_UNARY = {**{f: "Relu" for f in ops.RELU_FUNCTIONS}, torch.sigmoid: "Sigmoid",
                torch.tanh: "Tanh", torch.exp: "Exp", torch.abs: "Abs", torch.neg: "Neg",
                torch.nn.functional.gelu: "Gelu"}
_FLOAT_UNARY_METHODS = {"relu": "Relu", "relu_": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh",
                        "exp": "Exp", "abs": "Abs", "neg": "Neg"}
_FLOAT_MODULES = {nn.ReLU: "Relu", nn.Sigmoid: "Sigmoid", nn.Tanh: "Tanh", nn.GELU: "Gelu"}
_FLOAT_BINARY = {**{f: "Add" for f in ops.ADD_FUNCTIONS}, **{f: "Sub" for f in ops.SUB_FUNCTIONS},
                 **{f: "Mul" for f in ops.MUL_FUNCTIONS}, **{f: "Div" for f in ops.DIV_FUNCTIONS}}
_FLOAT_BINARY_METHODS = {**{m: "Add" for m in ops.ADD_METHODS}, **{m: "Sub" for m in ops.SUB_METHODS},
                         **{m: "Mul" for m in ops.MUL_METHODS}, **{m: "Div" for m in ops.DIV_METHODS}}


def _f32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).astype(np.float32)


class GraphExporter:
    """One export of a lowered GraphModule ``gm`` in ``fmt`` (``qdq``, ``qoperator`` or
    ``qonnx``: the QDQ walk with QONNX ``Quant`` nodes, :mod:`qpasses.export.onnx_qonnx`)."""

    def __init__(self, gm: torch.fx.GraphModule, fmt: str, *, strict: bool = False) -> None:
        if fmt not in FORMATS:
            raise ExportError(f"export-onnx: unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
        self.gm, self.fmt, self.strict = gm, fmt, strict
        self.g = QonnxGraph() if fmt == "qonnx" else OnnxGraph()
        self.env: dict[str, Val | None] = {}
        self.modules = dict(gm.named_modules())
        rec = get_record(gm, INT_SIM_KEY)
        self.fq_scale = {v["node"]: float(v["scale"]) for v in rec.fq_map.values()} if rec else {}
        self.islands = [dict(i) for i in rec.float_islands] if rec else []
        self.shifts: dict[str, int] = {}     # fx node -> ONNX code minus int-sim code
        self.pool_inputs: dict[int, int] = {}  # id(IntAvgPoolSum) -> spatial size of its input

    # -- driver -----------------------------------------------------------------------------------

    def run(self) -> OnnxGraph:
        if self.islands:
            listing = "; ".join(f"{i['node']} ({i['op']}: {i['reason']})" for i in self.islands)
            if self.strict:
                raise ExportError(f"export-onnx{{strict=true}}: the graph has float islands: "
                                  f"{listing}; quantize them or export with strict=false")
            warnings.warn(f"export-onnx: float islands exported as float ops between "
                          f"DequantizeLinear/QuantizeLinear: {listing}", ExportWarning,
                          stacklevel=3)
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                self._placeholder(n)
            elif n.op == "output":
                self._output(n)
            elif n.op == "get_attr":
                raise ExportError(f"export-onnx: node '{n.name}' reads attribute {n.target!r}; "
                                  "graphs with get_attr nodes are not exported")
            else:
                v = self.env[n.name] = self._node(n)
                if v is not None and v.is_codes and v.name == n.name:
                    self.shifts[n.name] = v.shift
        return self.g

    def _placeholder(self, n: Node) -> None:
        from onnx import TensorProto, helper
        shape = node_shape(n)
        if shape is None:
            raise ExportError(f"export-onnx: input '{n.name}' has no traced shape; trace with "
                              "qpasses.trace (example inputs) first")
        dims: list[Any] = ["batch"] + list(shape[1:]) if shape else []
        self.g.used.add(n.name)
        self.g.inputs.append(helper.make_tensor_value_info(n.name, TensorProto.FLOAT, dims))
        self.env[n.name] = Val(n.name, "float")

    def _output(self, n: Node) -> None:
        from onnx import TensorProto, helper
        outs = n.args[0] if isinstance(n.args[0], (tuple, list)) else (n.args[0],)
        for i, a in enumerate(outs):
            if not isinstance(a, Node):
                raise ExportError("export-onnx: graph outputs must be tensors")
            v = self._val(a, n)
            name = self._float(v, f"output_{i}")
            shape = node_shape(a)
            dims = ["batch"] + list(shape[1:]) if shape else None
            if name in [o.name for o in self.g.outputs] or name in [i.name for i in self.g.inputs]:
                name = self.g.node("Identity", [name], f"output_{i}")
            self.g.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))

    def _val(self, a: Any, user: Node) -> Val:
        v = self.env.get(a.name) if isinstance(a, Node) else None
        if v is None:
            raise ExportError(f"export-onnx: node '{user.name}' reads {a!r}, which is not a "
                              "tensor the exporter produced")
        return v

    def _node(self, n: Node) -> Val | None:
        if n.op == "call_module":
            mod = self.modules[str(n.target)]
            if isinstance(mod, IntSimModule):
                return self._int_module(n, mod)
            if isinstance(mod, ops.EVAL_IDENTITY_MODULES):
                return self._val(n.args[0], n)
            if isinstance(mod, (nn.Flatten, nn.Unflatten)):
                return self._shape_op(n)
            return self._float_op(n, mod)
        if n.op == "call_method" and n.target in ops.SHAPE_QUERY_METHODS:
            return None                          # sizes: reshapes use the traced shapes
        if n.op == "call_function" and n.target is getattr:
            return None
        if (n.op == "call_function" and n.target in ops.RESHAPE_FUNCTIONS | ops.PERMUTE_FUNCTIONS
                | ops.COPY_FUNCTIONS) or (n.op == "call_method" and n.target in
                                          ops.RESHAPE_METHODS | ops.PERMUTE_METHODS
                                          | ops.COPY_METHODS):
            return self._shape_op(n)
        return self._float_op(n, None)

    # -- float values and float ops -----------------------------------------------------------------

    def _float(self, v: Val, name: str) -> str:
        if v.kind == "pool":
            return self._pool(v, name, None)[0]
        return self.g.dequantize(v, name)

    def _float_op(self, n: Node, mod: nn.Module | None) -> Val:
        """A float op (before the input quantize, or a float island between DQ and Q)."""
        t = n.target
        if mod is not None:
            op = next((o for c, o in _FLOAT_MODULES.items() if isinstance(mod, c)), None)
            what = type(mod).__name__
        elif n.op == "call_method":
            op = _FLOAT_UNARY_METHODS.get(t) or _FLOAT_BINARY_METHODS.get(t)
            what = f".{t}()"
        else:
            op = _FLOAT_UNARY.get(t) or _FLOAT_BINARY.get(t)
            what = getattr(t, "__name__", str(t))
        if op is None or n.kwargs:
            raise ExportError(f"export-onnx: node '{n.name}' ({what}) has no ONNX mapping in the "
                              "exporter; lower it (lower-to-int-sim) or replace the op")
        args = []
        for a in n.args:
            if isinstance(a, Node):
                args.append(self._float(self._val(a, n), n.name))
            elif isinstance(a, (int, float)):
                args.append(self.g.const(f"{n.name}.const", a, "float32"))
            else:
                raise ExportError(f"export-onnx: node '{n.name}' ({what}) takes {a!r}")
        return Val(self.g.node(op, args, n.name, out=n.name), "float")

    # -- shape ops ---------------------------------------------------------------------------------

    def _shape_op(self, n: Node) -> Val:
        v = self._val(n.args[0], n)
        step = self._shape_step(n)
        if v.kind == "pool":
            return Val(v.name, "pool", v.dtype, v.scale, v.zero_point, v.qmin, v.qmax, v.axis,
                       v.src, v.pool, v.post + [step])
        if v.kind in ("acc", "accf") and step[0] != "identity":
            raise ExportError(f"export-onnx: shape op '{n.name}' on an unrequantized accumulator "
                              "(per-channel grid) is not exported")
        return self._apply_step(v, step, n.name)

    def _shape_step(self, n: Node) -> tuple[str, Any]:
        t = n.target
        if n.op == "call_module":
            t = None                       # nn.Flatten / nn.Unflatten: the traced shape
        if t in ops.COPY_FUNCTIONS or t in ops.COPY_METHODS:
            return ("identity", None)
        if t in ops.PERMUTE_FUNCTIONS or t in ops.PERMUTE_METHODS:
            rank = len(node_shape(n.args[0]) or ())
            if t in ("permute",) or t is torch.permute:
                dims = n.args[1:] if t == "permute" else n.args[1]
                if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                    dims = dims[0]
                perm = [int(d) % rank for d in dims]
            else:
                i, j = (int(d) % rank for d in n.args[1:3])
                perm = list(range(rank))
                perm[i], perm[j] = perm[j], perm[i]
            if perm[0] != 0:
                raise ExportError(f"export-onnx: '{n.name}' moves the batch dimension")
            return ("Transpose", perm)
        shape = node_shape(n)
        if shape is None or not shape:
            raise ExportError(f"export-onnx: '{n.name}' has no traced shape")
        return ("Reshape", [0] + list(shape[1:]))

    def _apply_step(self, v: Val, step: tuple[str, Any], name: str) -> Val:
        kind, arg = step
        if kind == "identity":
            return v
        if kind == "Transpose":
            y = self.g.node("Transpose", [v.name], name, out=name, perm=arg)
        else:
            y = self.g.node("Reshape", [v.name, self.g.const(f"{name}.shape", arg, "int64")],
                            name, out=name)
        return Val(y, v.kind, v.dtype, v.scale, v.zero_point, v.qmin, v.qmax, v.axis, v.src,
                   v.pool, list(v.post), v.shift)

    # -- integer-simulation modules -------------------------------------------------------------------

    def _int_module(self, n: Node, mod: IntSimModule) -> Val:
        if isinstance(mod, Quantize):
            x = self._float(self._val(n.args[0], n), n.name)
            return self.g.quantize(x, n.name, mod.scale, mod.zero_point, mod.qmin, mod.qmax,
                                   out=n.name)
        if isinstance(mod, Dequantize):
            v = self._val(n.args[0], n)
            if v.kind == "codes":
                v = Val(v.name, "codes", v.dtype, float(mod.scale[0]), mod.zero_point, v.qmin,
                        v.qmax, shift=v.shift)
            return Val(self._float(v, n.name), "float")
        if isinstance(mod, Requantize):
            return self._requantize(n, mod, self._val(n.args[0], n), n.name)
        if isinstance(mod, IntLayer):
            return self._layer(n, mod)
        if isinstance(mod, IntAdd):
            return self._add(n, mod)
        if isinstance(mod, IntMul):
            return self._mul(n, mod)
        if isinstance(mod, IntCat):
            return self._cat(n, mod)
        if isinstance(mod, IntMaxPool):
            return self._max_pool(n, mod)
        if isinstance(mod, IntAvgPoolSum):
            v = self._val(n.args[0], n)
            if v.is_codes:
                self._check_width(v, n.name)
            s = np.asarray(v.scale, dtype=np.float64) / mod.lcm if v.scale is not None else None
            self.pool_inputs[id(mod)] = math.prod((node_shape(n.args[0]) or ())[2:])
            return Val(n.name, "pool", "int32", s, v.zero_point * mod.lcm, src=v, pool=mod)
        if isinstance(mod, IntClamp):
            v = self._val(n.args[0], n)
            if not v.is_codes:
                return self._float_clamp(n, mod, v)
            return self.g.clip_codes(v, max(int(mod.lo), v.qmin), min(int(mod.hi), v.qmax),
                                     n.name, out=n.name)
        if isinstance(mod, IntLUT):
            return self._lut(n, mod)
        raise ExportError(f"export-onnx: no ONNX mapping for {type(mod).__name__} ('{n.name}')")

    def _float_clamp(self, n: Node, mod: IntClamp, v: Val) -> Val:
        """A clamp on an accumulator (a ReLU before a pool or a max pool): see onnx_acc."""
        if v.kind == "pool":
            raise ExportError(f"export-onnx: '{n.name}': a clamp on pooled sums is not exported")
        return acc_clamp(self.g, v, mod.lo.double().numpy(), mod.hi.double().numpy(), n.name,
                         len(node_shape(n) or ()))

    def _codes_in(self, n: Node, mod: Any, i: int = 0) -> Val:
        v = self._val(n.args[i], n)
        if v.kind != "codes":
            raise ExportError(f"export-onnx: '{n.name}' ({type(mod).__name__}) expects integer "
                              f"codes, got a {v.kind} value")
        self._check_width(v, n.name)
        return v

    def _check_width(self, v: Val, where: str) -> None:
        if self.fmt == "qoperator" and v.dtype not in ("uint8", "int8"):
            raise ExportError(f"export-onnx{{format=qoperator}}: '{where}' carries codes in "
                              f"[{v.qmin}, {v.qmax}], wider than 8 bits; QOperator kernels are "
                              "8-bit: export with format=qdq (16-bit containers) or qonnx")

    def _out_grid(self, n: Node, rq: Requantize, s_in: Any) -> tuple[float, int, int, int]:
        """(scale, zero point, qmin, qmax) of a requantization's output."""
        s = self.fq_scale.get(n.name)
        if s is None:
            s_in = np.asarray(s_in, dtype=np.float64).reshape(-1)
            real = rq.real.detach().double().numpy().reshape(-1)
            i = int(np.argmax(np.abs(real) > 0)) if real.size > 1 else 0
            s = float(np.float32(s_in[min(i, s_in.size - 1)] / real[i]))
        return s, rq.out_zero_point, rq.qmin, rq.qmax

    def _requantize(self, n: Node, rq: Requantize, v: Val, name: str) -> Val:
        s, z, lo, hi = self._out_grid(n, rq, v.scale)
        if v.kind == "pool":
            return self._pool(v, name, (s, z, lo, hi))[1]
        exact = acc_requantize(self.g, v, rq, (s, z, lo, hi), name, len(node_shape(n) or ()))
        if exact is not None:
            return exact
        x = self._float(v, name)
        return self.g.quantize(x, name, s, z, lo, hi, out=name)

    # -- conv / linear -------------------------------------------------------------------------------

    def _layer(self, n: Node, mod: IntLayer) -> Val:
        x = self._codes_in(n, mod)
        name = n.name
        acc_scale = mod.acc_scale.detach().double().numpy().reshape(-1)
        c = int(mod.w_q.shape[0])
        if acc_scale.size == 1:
            acc_scale = np.repeat(acc_scale, c)
        s_w = acc_scale / x.scale                         # exact: float32 · float32 in float64
        w = mod.w_q.detach().numpy()
        wdt = container(int(w.min()), int(w.max()), f"{name}: weights")
        self._check_width(Val("", "codes", wdt), f"{name} (weights)")
        if wdt.endswith("16"):
            self.g.min_opset = max(self.g.min_opset, 21)
        w_zp = np.broadcast_to(mod.w_zp.detach().numpy().reshape(-1), (c,))
        linear = isinstance(mod, IntLinear)
        wname = "" if self.fmt == "qonnx" else self.g.const(
            f"{name}.weight_q", w.T if linear and self.fmt == "qoperator" and mod.requant is None
            else w, wdt)
        bias = self._int_bias(mod, acc_scale)
        rq = mod.requant
        out = self._out_grid(n, rq, acc_scale) if rq is not None else None
        in_shape = node_shape(n.args[0]) or ()
        uniform_zp = bool(np.all(w_zp == w_zp[0]))
        if self.fmt == "qoperator" and (not linear or len(in_shape) == 2) and (
                rq is not None or uniform_zp):
            return self._layer_qop(n, mod, x, wname, s_w, w_zp, wdt, bias, out, linear)
        # QDQ: DequantizeLinear on input, weights and bias; the float op; QuantizeLinear
        xf = self.g.dequantize(x, f"{name}/input")
        if isinstance(self.g, QonnxGraph):
            ins = [xf, self.g.weights(name, w, s_w, w_zp, *weight_grid(n, mod, w))]
            if bias is not None:
                ins.append(self.g.bias(name, mod, bias, acc_scale))
        else:
            sw, zw = self.g.scale_zp(f"{name}.weight", s_w, w_zp, wdt)
            ins = [xf, self.g.node("DequantizeLinear", [wname, sw, zw],
                                   f"{name}/weight_dequantize", axis=0)]
        wf = ins[1]
        if bias is not None and len(ins) == 2:
            sb, zb = self.g.scale_zp(f"{name}.bias", acc_scale, np.zeros(c), "int32")
            bq = self.g.const(f"{name}.bias_q", bias, "int32")
            ins.append(self.g.node("DequantizeLinear", [bq, sb, zb], f"{name}/bias_dequantize",
                                   axis=0))
        y_name = name if out is None else f"{name}/float"
        if linear:
            if len(in_shape) == 2:
                y = self.g.node("Gemm", ins, y_name, out=y_name if out is None else None,
                                transB=1)
            else:
                wt = self.g.node("Transpose", [wf], f"{name}/weight_t", perm=[1, 0])
                y = self.g.node("MatMul", [xf, wt], y_name if len(ins) == 2 else f"{name}/matmul")
                if len(ins) == 3:
                    y = self.g.node("Add", [y, ins[2]], y_name)
        else:
            y = self.g.node("Conv", ins, y_name, out=y_name if out is None else None,
                            **self._conv_attrs(mod))
        if out is None:
            return Val(y, "acc", "float32", acc_scale, 0, axis=-1 if linear else 1)
        return self.g.quantize(y, name, *out, out=name)

    def _int_bias(self, mod: IntLayer, acc_scale: np.ndarray) -> np.ndarray | None:
        """The int32 bias at ``s_x·s_w`` (what the int-sim adds under ``bias=int32``; under
        ``bias=float`` it adds fbgemm's float bias instead, see docs/export.md)."""
        if mod.bias_q is None:
            return None
        b = mod.bias_q.detach().numpy().astype(np.int64)
        if mod.acc_shift:
            b = np.round(b / 2.0 ** mod.acc_shift).astype(np.int64)
        if np.abs(b).max(initial=0) > 2 ** 31 - 1:
            raise ExportError("export-onnx: integer bias outside int32")
        return b

    def _conv_attrs(self, mod: IntLayer) -> dict[str, Any]:
        pads = list(mod.int_padding)
        return {"strides": list(mod.stride), "pads": pads + pads,
                "dilations": list(mod.dilation), "group": int(mod.groups),
                "kernel_shape": list(mod.kernel_size)}

    def _layer_qop(self, n: Node, mod: IntLayer, x: Val, wname: str, s_w: np.ndarray,
                   w_zp: np.ndarray, wdt: str, bias: np.ndarray | None,
                   out: tuple[float, int, int, int] | None, linear: bool) -> Val:
        name, g = n.name, self.g
        if out is None:
            # the accumulator itself (logits): exact int32 arithmetic, dequantized by the consumer
            zx_ = g.const(f"{name}.input.zero_point_scalar", x.onnx_zp, x.dtype)
            zw_ = g.const(f"{name}.weight.zero_point_scalar", w_zp[0], wdt)
            if linear:
                acc = g.node("MatMulInteger", [x.name, wname, zx_, zw_],
                             f"{name}/matmul_integer" if bias is not None else name,
                             out=None if bias is not None else name)
                shape_b = [-1]
            else:
                acc = g.node("ConvInteger", [x.name, wname, zx_, zw_],
                             f"{name}/conv_integer" if bias is not None else name,
                             out=None if bias is not None else name, **self._conv_attrs(mod))
                shape_b = [-1] + [1] * (len(mod.kernel_size))
            if bias is not None:
                b = g.const(f"{name}.bias_q_b", bias.reshape(shape_b), "int32")
                acc = g.node("Add", [acc, b], name, out=name)
            return Val(acc, "acc", "int32", s_w * x.scale, 0, axis=-1 if linear else 1)
        sx, zx = g.scale_zp(f"{name}.input", x.scale, x.onnx_zp, x.dtype)
        per_tensor = bool(np.all(s_w == s_w[0])) and bool(np.all(w_zp == w_zp[0]))
        sw, zw = g.scale_zp(f"{name}.weight", s_w[:1] if per_tensor else s_w,
                            w_zp[:1] if per_tensor else w_zp, wdt)
        bq = None if bias is None else g.const(f"{name}.bias_q", bias, "int32")
        s_y, z_y, lo, hi = out
        ydt, shift = onnx_grid(lo, hi, name)
        self._check_width(Val("", "codes", ydt), name)
        sy, zy = g.scale_zp(f"{name}.output", s_y, z_y + shift, ydt)
        narrow = g.narrow(ydt, shift, lo, hi)
        yname = f"{name}/qlinear" if narrow else name
        if linear:
            ins = [x.name, sx, zx, wname, sw, zw, bq or "", sy, zy]
            y = g.node("QGemm", ins, yname, out=None if narrow else name, domain=MS, transB=1)
        else:
            ins = [x.name, sx, zx, wname, sw, zw, sy, zy] + ([bq] if bq else [])
            y = g.node("QLinearConv", ins, yname, out=None if narrow else name,
                       **self._conv_attrs(mod))
        return g.with_range(Val(y, "codes", ydt, s_y, z_y, shift=shift), lo, hi, name, out=name)

    # -- joins, pools, tables ------------------------------------------------------------------------

    def _grid_out(self, n: Node, mod: Any) -> tuple[float, int, int, int]:
        return float(mod.out_scale), int(mod.out_zero_point), int(mod.qmin), int(mod.qmax)

    def _binary_q(self, n: Node, mod: Any, op: str, qop: str) -> Val:
        a, b = self._codes_in(n, mod, 0), self._codes_in(n, mod, 1)
        s, z, lo, hi = self._grid_out(n, mod)
        g, name = self.g, n.name
        ydt, shift = onnx_grid(lo, hi, name)
        if self.fmt == "qoperator" and a.dtype == b.dtype == ydt:
            sa, za = g.scale_zp(f"{name}.a", a.scale, a.onnx_zp, a.dtype)
            sb, zb = g.scale_zp(f"{name}.b", b.scale, b.onnx_zp, b.dtype)
            sy, zy = g.scale_zp(f"{name}.output", s, z + shift, ydt)
            narrow = g.narrow(ydt, shift, lo, hi)
            y = g.node(qop, [a.name, sa, za, b.name, sb, zb, sy, zy],
                       f"{name}/qlinear" if narrow else name, out=None if narrow else name,
                       domain=MS)
            return g.with_range(Val(y, "codes", ydt, s, z, shift=shift), lo, hi, name, out=name)
        y = g.node(op, [g.dequantize(a, f"{name}/a"), g.dequantize(b, f"{name}/b")],
                   f"{name}/float")
        return g.quantize(y, name, s, z, lo, hi, out=name)

    def _add(self, n: Node, mod: IntAdd) -> Val:
        if len(n.args) != 2:
            raise ExportError(f"export-onnx: '{n.name}': adds of {len(n.args)} inputs are not "
                              "exported")
        return self._binary_q(n, mod, "Add", "QLinearAdd")

    def _mul(self, n: Node, mod: IntMul) -> Val:
        return self._binary_q(n, mod, "Mul", "QLinearMul")

    def _cat(self, n: Node, mod: IntCat) -> Val:
        g, name = self.g, n.name
        ins = [self._val(a, n) for a in (n.args[:-1] if len(n.args) > len(mod.requants)
                                         else n.args)]
        grid = None
        for v, r in zip(ins, mod.requants):
            if isinstance(r, Requantize):
                s, z, _, _ = self._out_grid(n, r, v.scale)
                grid = (self.fq_scale.get(name, s), r.out_zero_point)
            elif grid is None and v.is_codes:
                grid = (v.scale, v.zero_point)
        assert grid is not None
        s, z = grid
        ydt, shift = onnx_grid(mod.qmin, mod.qmax, name)
        codes = [v for v in ins if v.is_codes]
        if self.fmt == "qoperator" and len(codes) == len(ins) and all(
                v.dtype == ydt for v in codes):
            for v in codes:
                self._check_width(v, name)
            sy, zy = g.scale_zp(f"{name}.output", s, z + shift, ydt)
            args = [sy, zy]
            for i, v in enumerate(codes):
                args += [v.name, *g.scale_zp(f"{name}.in{i}", v.scale, v.onnx_zp, v.dtype)]
            y = g.node("QLinearConcat", args, f"{name}/qlinear", domain=MS, axis=mod.dim)
            return g.with_range(Val(y, "codes", ydt, s, z, shift=shift), mod.qmin, mod.qmax,
                                name, out=name)
        fl = [self._float(v, f"{name}/in{i}") for i, v in enumerate(ins)]
        y = g.node("Concat", fl, f"{name}/float", axis=mod.dim)
        return g.quantize(y, name, s, z, mod.qmin, mod.qmax, out=name)

    def _max_pool(self, n: Node, mod: IntMaxPool) -> Val:
        v = self._val(n.args[0], n)
        v = v if v.kind in ("acc", "accf") else self._codes_in(n, mod)
        rank = len(node_shape(n.args[0]) or ()) - 2

        def tup(a: Any) -> list[int]:
            return list(a) if isinstance(a, (tuple, list)) else [int(a)] * rank
        stride = tup(mod.stride if mod.stride is not None else mod.kernel_size)
        pads = tup(mod.padding)
        attrs = dict(kernel_shape=tup(mod.kernel_size), strides=stride, pads=pads + pads,
                     dilations=tup(mod.dilation), ceil_mode=int(mod.ceil_mode))
        if v.kind in ("acc", "accf"):
            return acc_max_pool(self.g, v, n.name, attrs, rank + 2)
        y = self.g.node("MaxPool", [v.name], n.name, out=n.name, **attrs)
        return Val(y, "codes", v.dtype, v.scale, v.zero_point, v.qmin, v.qmax, shift=v.shift)

    def _pool(self, v: Val, name: str, out: tuple[float, int, int, int] | None
              ) -> tuple[str, Val]:
        """Emit a pending average pool: into ``out``'s grid (QLinear pool in qoperator, or DQ →
        pool → Q), or as float (``out`` None); then its pending shape ops."""
        mod, src, g = v.pool, v.src, self.g
        assert src is not None
        rank = len(mod.factor.shape) - 2 if mod.factor.dim() > 2 else 2
        attrs: dict[str, Any] = {}
        if mod.mode == "adaptive":
            size = mod.output_size
            sizes = list(size) if isinstance(size, (tuple, list)) else [size] * rank
            if any(s not in (1, None) for s in sizes):
                raise ExportError(f"export-onnx: '{name}': adaptive average pooling to "
                                  f"{mod.output_size} (only global pooling is exported)")
            op, qop = "GlobalAveragePool", "QLinearGlobalAveragePool"
        else:
            if mod.divisor_override:
                raise ExportError(f"export-onnx: '{name}': divisor_override is not exported")

            def tup(a: Any) -> list[int]:
                return list(a) if isinstance(a, (tuple, list)) else [int(a)] * rank
            pads = tup(mod.padding)
            attrs = {"kernel_shape": tup(mod.kernel_size), "strides": tup(mod.stride or
                                                                            mod.kernel_size),
                     "pads": pads + pads, "count_include_pad": int(mod.count_include_pad)}
            op, qop = "AveragePool", "QLinearAveragePool"
        if out is not None:
            s, z, lo, hi = out
            if op == "GlobalAveragePool" and self.fmt != "qonnx" and src.scale is not None:
                self._check_global_pool_ratio(name, float(np.max(src.scale)), s,
                                              self.pool_inputs.get(id(mod), 0))
            ydt, shift = onnx_grid(lo, hi, name)
            if self.fmt == "qoperator" and src.is_codes and ydt == src.dtype:
                sx, zx = g.scale_zp(f"{name}.input", src.scale, src.onnx_zp, src.dtype)
                sy, zy = g.scale_zp(f"{name}.output", s, z + shift, ydt)
                y = g.node(qop, [src.name, sx, zx, sy, zy], f"{name}/pool", domain=MS,
                           **({"channels_last": 0} if mod.mode == "adaptive" else attrs))
                res = g.with_range(Val(y, "codes", ydt, s, z, shift=shift), lo, hi,
                                   f"{name}/clip")
            else:
                pf = g.node(op, [self._float(src, f"{name}/pool_input")], f"{name}/pool",
                            **attrs)
                res = g.quantize(pf, f"{name}/quantize", s, z, lo, hi)
            for i, step in enumerate(v.post):
                res = self._apply_step(res, step, name if i == len(v.post) - 1 else
                                       f"{name}/shape{i}")
            if not v.post:
                res = Val(g.node("Identity", [res.name], name, out=name), "codes", res.dtype,
                          res.scale, res.zero_point, res.qmin, res.qmax, shift=res.shift)
            return res.name, res
        pf = g.node(op, [self._float(src, f"{name}/pool_input")], f"{name}/pool", **attrs)
        res = Val(pf, "float")
        for i, step in enumerate(v.post):
            res = self._apply_step(res, step, f"{name}/shape{i}")
        return res.name, res

    @staticmethod
    def _check_global_pool_ratio(name: str, s_in: float, s_out: float, size: int) -> None:
        """onnxruntime computes a quantized global average pool (QLinearGlobalAveragePool, also
        what it fuses DQ -> GlobalAveragePool -> Q into) only when ``s_in / (s_out * N)`` lies in
        [2^-32, 256); outside it refuses at run time, so refuse here, naming the node."""
        if size <= 0:
            return
        ratio = float(np.float32(s_in) / (np.float32(s_out) * np.float32(size)))
        if not 2.0 ** -32 <= ratio < 256.0:
            raise ExportError(
                f"export-onnx: '{name}': global average pool with input scale {s_in:.3g}, "
                f"output scale {s_out:.3g} over {size} positions gives s_in/(s_out*N) = "
                f"{ratio:.3g}, outside [2^-32, 256) where onnxruntime's "
                "QLinearGlobalAveragePool computes; give the pool's input more bits (or its "
                "output fewer), or export with format=qonnx")

    def _lut(self, n: Node, mod: IntLUT) -> Val:
        v = self._codes_in(n, mod)
        g, name = self.g, n.name
        if isinstance(g, QonnxGraph):
            return g.lut(v, mod, name)
        ydt, shift = onnx_grid(mod.qmin, mod.qmax, name)
        self._check_width(Val("", "codes", ydt), name)
        table = g.const(f"{name}.table", mod.table.detach().numpy() + shift, ydt)
        idx = g.node("Cast", [v.name], f"{name}/index_cast", to=6)          # int32
        idx = g.node("Sub", [idx, g.const(f"{name}.in_qmin", mod.in_qmin + v.shift, "int32")],
                     f"{name}/index")
        y = g.node("Gather", [table, idx], name, out=name, axis=0)
        return Val(y, "codes", ydt, mod.out_scale, mod.out_zero_point, mod.qmin, mod.qmax,
                   shift=shift)
