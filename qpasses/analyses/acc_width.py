"""``acc-width``: accumulator widths per layer (docs/algorithms.md,
"Cost accounting"), worst case and data-aware.

For every layer whose weights and input activation are both quantized (bits > 0):

* ``acc_bits``: the minimal signed two's-complement width that holds every value of
  ``Σ_i (w_i − z_w)(x_i − z_x) + b`` over *all* codes of the declared grids (bits, signedness,
  narrow range, zero points; fan-in ``C_in/groups · prod(kernel)``), per kernel when bits are per
  kernel (``costs.acc_bits_worst_case``).
* ``acc_bits_data``: the tight bound from the actual integer weights of each output channel,
  ``S⁺_j·hi − S⁻_j·lo + b_j`` (``costs.acc_bits_data``). Needs the weight scales (``calibrate``
  or ``insert-fake-quant`` fills ``QuantSpec.scale``); integer weights are
  ``clamp(round(w / s) + z, qmin, qmax)`` per channel, exactly as the fake-quant path computes them
  (``quantizers.quantize``). ``None`` (with a ``note``) when scales are unknown.

The bias enters both bounds in accumulator units, ``round(b / (s_w · s_a))``, when the weight and
activation scales are known; otherwise both bounds leave it out. Either way ``acc_bits_data <=
acc_bits`` holds layer by layer and kernel by kernel. The layer's width is the max over kernels.
Flag layers above a target with ``check-acc-width{target=16}``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from passes_registry import Analysis, register_analysis

from qpasses.ir.layers import layer_bias, layer_weight, quantizable_layers
from qpasses.algorithms.product_costs import ProductCost, product_costs
from qpasses.ir.annotations import QuantSpec, get_qmeta
from qpasses.numerics import costs, quantizers
from qpasses.analyses.table import LayerTable, bits_text, require_annotations, table


@dataclass(frozen=True)
class AccWidthRow:
    name: str
    op: str
    w_bits: int | None
    w_bits_per_kernel: tuple[int, ...] | None
    a_bits: int | None
    fan_in: int
    acc_bits: int | None
    acc_bits_data: int | None
    kernel_acc_bits: tuple[int, ...] | None       # per kernel, when bits are per kernel
    kernel_acc_bits_data: tuple[int, ...] | None  # per kernel, when bits are per kernel
    bias_included: bool = False
    note: str | None = None                       # why a bound is missing


@dataclass(frozen=True)
class AccWidthResult(LayerTable):
    rows: tuple[AccWidthRow, ...]
    # act x act products (attention's matmuls): worst case over their operands' grid
    products: tuple[AccWidthRow, ...] = ()

    @property
    def max_acc_bits(self) -> int | None:
        vals = [r.acc_bits for r in self.rows + self.products if r.acc_bits is not None]
        return max(vals) if vals else None

    @property
    def max_acc_bits_data(self) -> int | None:
        vals = [r.acc_bits_data for r in self.rows if r.acc_bits_data is not None]
        return max(vals) if vals else None


def _zero_points(spec: QuantSpec, n: int | None = None) -> torch.Tensor:
    if spec.zero_point is None:
        return torch.zeros((), dtype=torch.int64) if n is None else torch.zeros(n, dtype=torch.int64)
    zp = torch.tensor(spec.zero_point, dtype=torch.int64)
    if n is None:
        return zp
    return zp.expand(n).clone() if zp.numel() == 1 else zp


def integer_weights(weight: torch.Tensor, w: QuantSpec, kernel_bits: torch.Tensor) -> torch.Tensor:
    """Integer codes of a weight tensor under its calibrated spec, per output channel (axis 0)."""
    c_out = weight.shape[0]
    scale = torch.tensor(w.scale, dtype=torch.float32)
    if scale.numel() not in (1, c_out):
        raise ValueError(f"{scale.numel()} scales for {c_out} kernels")
    zp = _zero_points(w, c_out)
    x = weight.detach().float()
    if not (w.narrow_range and not w.signed):
        scheme = "symmetric" if w.signed else "asymmetric"
        return quantizers.quantize(x, scale if scale.numel() > 1 else scale.reshape(()),
                                   zp, kernel_bits, scheme, narrow=w.narrow_range, axis=0)
    # unsigned narrow grid [1, 2^n - 1]: same rounding, own clamp
    lo, hi = costs.int_range(kernel_bits, signed=False, narrow=True)
    shape = (-1,) + (1,) * (x.dim() - 1)
    s = scale.reshape(shape) if scale.numel() > 1 else scale
    q = quantizers.round_tensor(x * (1.0 / s)) + zp.reshape(shape)
    return torch.clamp(q, lo.reshape(shape), hi.reshape(shape)).to(torch.int64)


def _row(gm, info, q) -> AccWidthRow:
    w, a = q.weight, q.act
    per_kernel = w.kernel_bits(info.out_channels) if w is not None and w.per_kernel else None
    base = dict(name=info.name, op=info.kind, w_bits=None if w is None else w.bits,
                w_bits_per_kernel=per_kernel, a_bits=None if a is None else a.bits,
                fan_in=info.fan_in)
    if w is None or a is None or w.bits == 0 or a.bits == 0:
        why = ("float island" if q.float_island is not None else
               "weights or input not quantized (no spec or 0 bits)")
        return AccWidthRow(**base, acc_bits=None, acc_bits_data=None, kernel_acc_bits=None,
                           kernel_acc_bits_data=None, note=why)
    kb = torch.tensor(w.kernel_bits(info.out_channels), dtype=torch.int64)
    w_zp = torch.where(kb == 0, 0, _zero_points(w, info.out_channels))
    a_zps = sorted(set(a.zero_point)) if a.zero_point is not None else [0]
    lo_t, hi_t = costs.int_range(a.bits, a.signed, a.narrow_range)  # the grid both bounds use
    a_qmin, a_qmax = int(lo_t), int(hi_t)
    # Bias in accumulator units (needs both scales).
    bias = layer_bias(gm, info)
    int_bias = None
    if bias is not None and w.scale is not None and a.scale is not None and len(a.scale) == 1:
        s_w = torch.tensor(w.scale, dtype=torch.float64).expand(info.out_channels)
        int_bias = torch.round(bias.detach().double() / (s_w * a.scale[0])).to(torch.int64)
    bias_abs = int_bias.abs() if int_bias is not None else 0
    worst = None
    for za in a_zps:
        p = costs.acc_bits_worst_case(kb, a.bits, info.fan_in, w_signed=w.signed,
                                      a_signed=a.signed, w_zero_point=w_zp, a_zero_point=za,
                                      w_narrow=w.narrow_range, a_narrow=a.narrow_range,
                                      bias_abs_max=bias_abs)
        p = p.expand(info.out_channels)
        worst = p if worst is None else torch.maximum(worst, p)
    data, note = None, None
    if w.scale is None:
        note = "no weight scale yet (run calibrate / insert-fake-quant): data-aware bound unknown"
    elif w.axis not in (None, 0) and len(w.scale) > 1:
        note = f"per-channel weight scales along axis {w.axis} (expected 0): data bound skipped"
    else:
        qw = integer_weights(layer_weight(gm, info), w, kb)
        for za in a_zps:
            p = costs.acc_bits_data(qw, a_qmin, a_qmax, za, int_bias, w_zp)
            data = p if data is None else torch.maximum(data, p)
    if bias is not None and int_bias is None and note is None:
        note = "bias left out of the bounds (activation scale unknown)"
    return AccWidthRow(
        **base, acc_bits=int(worst.max()), acc_bits_data=None if data is None else int(data.max()),
        kernel_acc_bits=tuple(int(v) for v in worst.tolist()) if per_kernel is not None else None,
        kernel_acc_bits_data=(tuple(int(v) for v in data.tolist())
                              if per_kernel is not None and data is not None else None),
        bias_included=int_bias is not None, note=note)


# quantizer schemes whose zero point is 0 (docs/algorithms.md, "Scheme names")
_ZERO_POINT_FREE = frozenset({"symmetric", "unsigned", "pact", "lsq"})


def _product_row(p: ProductCost, spec: QuantSpec | None) -> AccWidthRow:
    """An act x act product ``Σ_k (a − z_a)(b − z_b)``: both operands on the product's act grid
    (one spec, each operand its own quantizer). Zero points are not in the spec: 0 for the
    zero-point-free schemes, else the worst over every zero point of the grid (the extremes of
    a bilinear form are at the corners). No weights, so no data-aware bound."""
    base = dict(name=p.name, op=p.op, w_bits=None, w_bits_per_kernel=None,
                a_bits=None if spec is None else spec.bits, fan_in=p.k,
                acc_bits_data=None, kernel_acc_bits=None, kernel_acc_bits_data=None)
    if spec is None or p.float_island or spec.bits == 0:
        return AccWidthRow(**base, acc_bits=None,
                           note="float island" if p.float_island else "operands not quantized")
    lo, hi = costs.int_range(spec.bits, spec.signed, spec.narrow_range)
    zps = [0] if spec.scheme in _ZERO_POINT_FREE else sorted({int(lo), int(hi)})
    width = max(int(costs.acc_bits_worst_case(spec.bits, spec.bits, p.k, w_signed=spec.signed,
                                              a_signed=spec.signed, w_zero_point=za,
                                              a_zero_point=zb, w_narrow=spec.narrow_range,
                                              a_narrow=spec.narrow_range))
                for za in zps for zb in zps)
    return AccWidthRow(**base, acc_bits=width,
                       note="act x act: worst case only" + ("" if zps == [0] else
                                                            " (any zero points)"))


def compute_acc_width(gm, am) -> AccWidthResult:
    nodes = {n.name: n for n in gm.graph.nodes}
    return AccWidthResult(tuple(_row(gm, info, get_qmeta(nodes[info.node]))
                                for info in quantizable_layers(gm)),
                          tuple(_product_row(p, get_qmeta(nodes[p.node]).act)
                                for p in product_costs(gm)))


@register_analysis
class AccWidthAnalysis(Analysis):
    """Worst-case and data-aware signed accumulator widths per layer and kernel."""
    name = "acc-width"
    summary = "worst-case and data-aware accumulator widths per layer/kernel"
    depends_on = frozenset({"structure", "annotations", "weights"})

    def compute(self, gm, am):
        require_annotations(gm, self.name)
        return compute_acc_width(gm, am)

    def format(self, result, gm):
        body = [[r.name, r.op, bits_text(r.w_bits, r.w_bits_per_kernel),
                 "-" if r.a_bits is None else r.a_bits, r.fan_in,
                 "-" if r.acc_bits is None else r.acc_bits,
                 "-" if r.acc_bits_data is None else r.acc_bits_data, r.note or ""]
                for r in result.rows + result.products]
        return (table(["layer", "op", "w", "a", "fan-in", "acc (worst)", "acc (data)", "note"],
                      body)
                + f"\nmax accumulator: worst case {result.max_acc_bits}, data-aware "
                  f"{result.max_acc_bits_data}")
