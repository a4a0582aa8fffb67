"""lower-to-int-sim: turn a calibrated fake-quant graph into an integer-only simulation.

The rewrite itself is :mod:`qpasses.algorithms.lowering` (rules in its docstring); the runtime modules
are :mod:`qpasses.modules.int_sim`; the arithmetic is :mod:`qpasses.numerics` (``fixed_point``,
``int_ops``, ``int_sim_math``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx

from passes_registry import Pass, PassFailure, PassResult, PreservedAnalyses, register_pass
from passes_registry.errors import OptionError

from qpasses.modules.int_sim import INT_SIM_META_KEY, is_int_sim_graph, set_backend
from qpasses.algorithms.lowering import LoweringConfig, lower_graph
from qpasses.passes.calibrate import batch_inputs

__all__ = ["LowerToIntSim", "LowerToIntSimOptions", "context_batches"]

PASS_NAME = "lower-to-int-sim"


@dataclass(frozen=True)
class LowerToIntSimOptions:
    rounding: Literal["gemmlowp", "single", "float-rne", "hawq"] = field(
        default="gemmlowp", metadata={
            "help": "requantization contract: gemmlowp (SRDHM + rounding shift, TFLite), single "
                    "(one round-half-up, TFLM/CMSIS), float-rne (float32 multiply, "
                    "round-half-even, fbgemm/ONNX Runtime), hawq (dyadic, round-half-even)"})
    backend: Literal["reference", "fast"] = field(default="fast", metadata={
        "help": "reference: int64 kernels only; fast: per layer the fastest kernel its "
                "accumulator bound proves exact (int8 GEMM, float32 < 2^24, float64 < 2^53)"})
    multiplier_bits: int = field(default=31, metadata={
        "help": "fractional bits of the fixed-point multipliers (2..31; 31 = TFLite Q31)"})
    lut_bits: int = field(default=16, metadata={
        "help": "width of the intermediate grid a lookup table reads when its input is an "
                "accumulator (conv -> hardswish), ranged from calibration data (8..16)"})
    gate_bits: int = field(default=12, metadata={
        "help": "width of the output grid of a bounded nonlinearity (sigmoid, hardsigmoid, "
                "tanh) that feeds no quantizer, e.g. a squeeze-excitation gate (4..16)"})
    bias_frac_bits: int | None = field(default=None, metadata={
        "help": "fractional bits kept in the int32 bias of a conv/linear whose requantization "
                "multiplier M is large (coarse inputs/weights, fine output): acc = (Σ << k) + "
                "b_q at scale s_x·s_w/2^k; none = auto (k = ceil(log2 M) + 5 where that is "
                "> 0, so 8-bit layers keep TFLite's k = 0), 0 = always TFLite's plain int32 "
                "bias; integer contracts only (float-rne keeps fbgemm's float bias)"})
    keep_fake_quant: bool = field(default=True, metadata={
        "help": "keep a copy of the fake-quant graph (gm.meta) so verify-int-sim can report "
                "the int-sim vs fake-quant deviation"})

    def __post_init__(self) -> None:
        b = self.multiplier_bits
        if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 31:
            raise OptionError(PASS_NAME, "multiplier-bits",
                              f"must be an int in 2..31 (31 = Q31 multipliers as in TFLite; 15 "
                              f"or 7 for narrow hardware), got {b!r}")
        if not 8 <= self.lut_bits <= 16:
            raise OptionError(PASS_NAME, "lut-bits", f"must be in 8..16, got {self.lut_bits}")
        if self.bias_frac_bits is not None and not 0 <= self.bias_frac_bits <= 24:
            raise OptionError(PASS_NAME, "bias-frac-bits",
                              f"must be none (auto) or in 0..24, got {self.bias_frac_bits}")
        if not 4 <= self.gate_bits <= 16:
            raise OptionError(PASS_NAME, "gate-bits", f"must be in 4..16, got {self.gate_bits}")


def context_batches(ctx: Any, gm: torch.fx.GraphModule, limit: int = 4
                    ) -> list[tuple[torch.Tensor, ...]]:
    """Up to ``limit`` input tuples from ``ctx.calibration_data`` (else ``ctx.example_inputs``)."""
    k = max(1, sum(1 for n in gm.graph.nodes if n.op == "placeholder"))
    out: list[tuple[torch.Tensor, ...]] = []
    data = getattr(ctx, "calibration_data", None)
    if data is not None and not isinstance(data, (torch.Tensor, str, bytes)):
        try:
            for i, b in enumerate(data):
                out.append(batch_inputs(b, i, k))
                if len(out) >= limit:
                    break
        except TypeError:
            out = []
    if not out and getattr(ctx, "example_inputs", None):
        ex = tuple(ctx.example_inputs)
        if all(isinstance(t, torch.Tensor) for t in ex[:k]) and len(ex) >= k:
            out.append(ex[:k])
    return out


@register_pass
class LowerToIntSim(Pass):
    """Lower a calibrated fake-quant graph to an integer-only graph with fixed-point
    requantization (reference §5; rules in :mod:`qpasses.algorithms.lowering`).

    Requires ``calibrated``; establishes ``int-sim`` (every tensor between the input quantize and
    the output dequantize is an integer tensor on a declared grid, or explicitly a float island);
    invalidates ``fake-quant-inserted`` (the quantizers are gone). Conv/linear modules keep their
    module paths (as ``IntConv2d``/``IntLinear`` subclasses of the float layers), so the report and
    the cost analyses still see them. Ops that cannot be lowered stay in float between a
    dequantize and a quantize, with ``QMeta.float_island`` set and listed in the report.

    Running it on an already lowered graph only switches the backend (same rounding and
    multiplier bits) or does nothing. Stats: ``num_int_layers``, ``num_kernel_<k>`` per fast
    kernel, ``num_requantize``, ``num_fused_requant``, ``num_luts``, ``num_int_adds``,
    ``num_int_cats``, ``num_int_muls``, ``num_pools``, ``num_clamps``, ``num_quantize``,
    ``num_dequantize``, ``num_float_islands``. The per-layer kernel choice is printed by
    ``print<int-sim-kernels>``.
    """
    name = PASS_NAME
    summary = "lower a calibrated fake-quant graph to integer-only ops with fixed-point requant"
    Options = LowerToIntSimOptions
    requires = frozenset({"calibrated"})
    establishes = frozenset({"int-sim"})
    invalidates = frozenset({"fake-quant-inserted"})
    preserves = PreservedAnalyses.none()

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        opts: LowerToIntSimOptions = self.options
        if is_int_sim_graph(gm):
            rec = gm.meta[INT_SIM_META_KEY]
            if rec.get("rounding") != opts.rounding or \
                    rec.get("multiplier_bits") != opts.multiplier_bits:
                raise PassFailure(
                    f"the graph is already lowered with rounding={rec.get('rounding')} "
                    f"multiplier-bits={rec.get('multiplier_bits')}; lower the fake-quant graph "
                    "again to change the contract (only backend= can change here)")
            changed = set_backend(gm, opts.backend)
            return PassResult(modified=changed, stats={})
        cfg = LoweringConfig(rounding=opts.rounding, backend=opts.backend,
                             multiplier_bits=opts.multiplier_bits, lut_bits=opts.lut_bits,
                             gate_bits=opts.gate_bits, bias_frac_bits=opts.bias_frac_bits,
                             keep_fake_quant=opts.keep_fake_quant,
                             pass_name=self.name)
        record = lower_graph(gm, cfg, context_batches(ctx, gm))
        return PassResult(modified=True, stats=dict(record["stats"]))
