"""``int-sim-kernels``: which kernel each integer layer (and each matmul of two activations,
``IntMatMul``: x/w bits are its operands') of a lowered graph runs, and why.

A derived fact (never stored in QMeta): read from the lowered modules. ``print<int-sim-kernels>``
lists per layer the kernel in use, the fast kernel its bound allows, what computes it on CPU
(``cpu engine``: ``onednn-conv`` where oneDNN's direct int8 convolution replaces the GEMM), the
bound on every partial
sum ``max_o ‖w_o − z_w‖₁ · max|x − z_x|``, the declared accumulator width and the operand widths.
"""
from __future__ import annotations

from dataclasses import dataclass

from tabulate import tabulate

from passes_registry import AnalysisError, get_record, register_analysis
from passes_registry.analysis_manager import Analysis

from qpasses.ir.records import INT_SIM_KEY
from qpasses.modules.int_sim_layers import kernel_table
from qpasses.modules.int_sim_transformer import matmul_kernel_table

__all__ = ["IntSimKernels", "IntSimKernelRow", "IntSimKernelsResult"]


@dataclass(frozen=True)
class IntSimKernelRow:
    name: str
    kernel: str
    fast_kernel: str
    cpu_engine: str
    acc_bound: int
    acc_bits: int
    x_bits: int
    w_bits: int
    reason: str


@dataclass(frozen=True)
class IntSimKernelsResult:
    rows: tuple[IntSimKernelRow, ...]
    rounding: str
    backend: str

    def counts(self) -> dict[str, int]:
        """Layers per kernel in use."""
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.kernel] = out.get(r.kernel, 0) + 1
        return out

    def engine_counts(self) -> dict[str, int]:
        """Layers per CPU engine (oneDNN's direct convolution where it replaces the GEMM)."""
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.cpu_engine] = out.get(r.cpu_engine, 0) + 1
        return out


@register_analysis
class IntSimKernels(Analysis):
    """Per integer layer: kernel in use, provably exact fast kernel, bound and widths."""
    name = "int-sim-kernels"
    summary = "kernel per integer layer of a lowered graph, with the bound that proves it exact"
    depends_on = frozenset({"structure", "weights", "records"})

    def compute(self, gm, am):
        rec = get_record(gm, INT_SIM_KEY)
        if rec is None:
            raise AnalysisError("int-sim-kernels needs a lowered graph: run lower-to-int-sim "
                                "first")
        rows = tuple(IntSimKernelRow(r["layer"], r["kernel"], r["fast_kernel"], r["cpu_engine"],
                                     r["acc_bound"],
                                     r["acc_bits"], r["x_bits"], r["w_bits"], r["reason"])
                     for r in kernel_table(gm) + matmul_kernel_table(gm))
        return IntSimKernelsResult(rows, rec.rounding, rec.backend)

    def format(self, result, gm):
        body = [[r.name, r.kernel, r.fast_kernel, r.cpu_engine, r.acc_bound, r.acc_bits, r.x_bits,
                 r.w_bits] for r in result.rows]
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.counts().items()))
        engines = ", ".join(f"{k}: {v}" for k, v in sorted(result.engine_counts().items()))
        return (tabulate(body, headers=["layer", "kernel", "fast kernel", "cpu engine",
                                        "|partial sum| <=", "acc bits", "x bits", "w bits"],
                         intfmt=",")
                + f"\nrounding={result.rounding} backend={result.backend}; {counts}; "
                  f"on CPU: {engines}")
