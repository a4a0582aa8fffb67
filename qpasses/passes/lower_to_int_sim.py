"""lower-to-int-sim: the pipeline that turns a calibrated fake-quant graph into an integer-only
simulation.

The rewrite is :mod:`qpasses.algorithms.lowering` (rules in its docstring); the runtime modules are
:mod:`qpasses.modules.int_sim`, :mod:`~qpasses.modules.int_sim_layers` and
:mod:`~qpasses.modules.int_sim_ops`; the arithmetic is :mod:`qpasses.numerics` (``fixed_point``,
``int_ops``, ``int_sim_math``).
"""
from __future__ import annotations

from passes_registry import format_options, register_pipeline

from qpasses.algorithms.lowering.config import LoweringOptions

__all__ = ["LowerToIntSimOptions", "lower_to_int_sim"]

PIPELINE_NAME = "lower-to-int-sim"


class LowerToIntSimOptions(LoweringOptions):
    """The options of ``lower-to-int-sim``: the lowering contract, validated under this name."""
    owner = PIPELINE_NAME


def lower_to_int_sim(opts: LowerToIntSimOptions) -> str:
    """Lower a calibrated fake-quant graph to an integer-only graph with fixed-point
    requantization (docs/int-sim.md, "Integer arithmetic"; rules in
    :mod:`qpasses.algorithms.lowering`).

    Runs ``lower-fake-quant-ops`` (with all the options), ``fuse-requantize``,
    ``shift-unfused-biases``, ``exact-zero-kernel-constants`` and ``cleanup-int-sim``; printed
    pipelines show it as one element, while ``--print-ir-after``, timing, statistics, verify-each
    and bisection see each step. Requires ``calibrated``; establishes ``int-sim`` (every tensor
    between the input quantize and the output dequantize is an integer tensor on a declared grid,
    or explicitly a float island); invalidates ``fake-quant-inserted`` (the quantizers are gone).
    Conv/linear modules keep their module paths (as ``IntConv2d``/``IntLinear`` subclasses of the
    float layers), so the report and the cost analyses still see them. Ops that cannot be lowered
    stay in float between a dequantize and a quantize, with ``QMeta.float_island`` set and listed
    in the report.

    On an already lowered graph it only switches the backend (same rounding and multiplier bits)
    or does nothing. The int-sim record (``qpasses.int_sim``) holds the combined stats:
    ``num_int_layers``, ``num_kernel_<k>`` per fast kernel, ``num_requantize``,
    ``num_fused_requant``, ``num_exact_zero_kernel_constants``, ``num_luts``, ``num_int_adds``,
    ``num_int_cats``, ``num_int_muls``, ``num_pools``, ``num_clamps``, ``num_quantize``,
    ``num_dequantize``, ``num_float_islands``. The per-layer kernel choice is printed by
    ``print<int-sim-kernels>``.
    """
    return ("graph(lower-fake-quant-ops" + format_options(opts) + ",fuse-requantize,"
            "shift-unfused-biases,exact-zero-kernel-constants,cleanup-int-sim)")


register_pipeline(PIPELINE_NAME, lower_to_int_sim, options=LowerToIntSimOptions, keep_name=True,
                  summary="lower a calibrated fake-quant graph to integer-only ops with "
                          "fixed-point requant")
