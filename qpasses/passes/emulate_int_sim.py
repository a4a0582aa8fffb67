"""emulate-int-sim: make a calibrated fake-quant graph compute what its integer graph computes.

The runtime pieces are in :mod:`qpasses.modules.emulation`; the lowering is the one of
``lower-to-int-sim`` (:mod:`qpasses.algorithms.lowering`), run on a copy of the graph.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch.fx

from passes_registry import (Pass, PassContext, PassFailure, PassManager, PassResult,
                             format_options, get_record, register_pass, set_record)
from passes_registry.errors import OptionError

from qpasses.errors import EmulationWarning
from qpasses.ir.batches import context_batches
from qpasses.ir.fx import copy_sharing_tensors
from qpasses.ir.records import EMULATION_KEY, INT_SIM_KEY, EmulationRecord
from qpasses.modules.emulation import install_emulation, strip_emulation
from qpasses.modules.int_sim import is_int_sim_graph
from qpasses.algorithms.lowering.config import LoweringOptions

__all__ = ["EmulateIntSim", "EmulateIntSimOptions", "lower_emulated"]

PASS_NAME = "emulate-int-sim"


@dataclass(frozen=True)
class EmulateIntSimOptions:
    """The integer contract to emulate (the options of ``lower-to-int-sim`` that change the
    integers) and the backend the emulation runs the integer graph on."""
    rounding: Literal["gemmlowp", "single", "float-rne", "hawq"] = field(
        default="gemmlowp", metadata={"help": "requantization contract to emulate (as "
                                              "lower-to-int-sim's rounding)"})
    multiplier_bits: int = field(default=31, metadata={
        "help": "fractional bits of the fixed-point multipliers (2..31)"})
    lut_bits: int = field(default=16, metadata={
        "help": "width of the intermediate grid a lookup table reads (8..16)"})
    gate_bits: int = field(default=12, metadata={
        "help": "width of a bounded nonlinearity's output grid when it feeds no quantizer "
                "(4..16)"})
    bias_frac_bits: int | None = field(default=None, metadata={
        "help": "fractional bias bits (none = auto, as lower-to-int-sim)"})
    bias: Literal["float", "int32"] = field(default="float", metadata={
        "help": "how float-rne adds a conv/linear bias (as lower-to-int-sim's bias)"})
    backend: Literal["reference", "fast"] = field(default="fast", metadata={
        "help": "backend of the integer graph the emulation runs (same integers either way)"})

    def __post_init__(self) -> None:
        try:
            self.lowering(keep_fake_quant=False)
        except OptionError as e:
            raise OptionError(PASS_NAME, e.option, e.reason) from None

    def lowering(self, **kw: Any) -> LoweringOptions:
        """These options as lowering options."""
        return LoweringOptions(rounding=self.rounding, backend=kw.pop("backend", self.backend),
                               multiplier_bits=self.multiplier_bits, lut_bits=self.lut_bits,
                               gate_bits=self.gate_bits, bias_frac_bits=self.bias_frac_bits,
                               bias=self.bias, **kw)


def lower_emulated(plain: torch.fx.GraphModule
                   ) -> tuple[torch.fx.GraphModule, dict[str, dict[str, Any]]]:
    """Lower a copy of the plain fake-quant graph of an emulating graph (it carries the
    :class:`~qpasses.ir.records.EmulationRecord`) with ``lower-to-int-sim`` under the recorded
    contract and ranges; (integer graph in eval mode, its ``fq_map``). The engine of
    :mod:`qpasses.modules.emulation` calls this whenever the weights changed."""
    # the lowering swaps modules and reads weights, it never writes into them: no weight copy
    gm = copy_sharing_tensors(plain)
    gm.eval()
    rec: EmulationRecord = get_record(gm, EMULATION_KEY)
    backend = getattr(plain, "emulation_backend", "fast")
    opts = LoweringOptions(**rec.contract(), backend=backend, keep_fake_quant=False)
    with PassContext(verify_each=False):
        PassManager.parse(f"graph(lower-to-int-sim{format_options(opts)})",
                          assume={"calibrated"}).run(gm)
    return gm, dict(get_record(gm, INT_SIM_KEY).fq_map)


@register_pass
class EmulateIntSim(Pass):
    """Emulation mode ("train what you deploy"): rewrite a calibrated fake-quant graph so that
    every activation quantization point and every output computes exactly what
    ``lower-to-int-sim`` with the same contract computes: integer-grid biases (with the
    contract's bias fractional bits), the contract's fixed-point requantization (rounding,
    multiplier bits), integer average pools and rescaling adds, lookup tables. Gradients are the
    fake quantizers' own (straight-through, LSQ, PACT), so the graph trains as before
    (docs/int-sim.md, "Emulation").

    How: the graph gets an engine node that runs the integer graph of the current weights
    (relowered when a parameter or quantizer buffer changed) and, after each quantizer, a node
    taking the integer value in the forward pass and the fake-quant gradient in the backward
    pass; each fake-quant conv/linear takes its value from the integer layer's accumulator
    (no second GEMM) and keeps its own gradients. The values *are* the lowering's, so
    ``lower-to-int-sim`` of the emulating graph
    (which removes the emulation nodes first and must use the same contract, else
    ``EmulationContractError`` naming both) gives a graph whose codes and outputs
    ``verify-int-sim`` finds equal to the emulating graph's.

    Ops without an integer kernel stay float islands in both graphs: they are listed in the
    record and an ``EmulationWarning`` names them. Writes the ``qpasses.emulation`` record
    (``EmulationRecord``). A second run replaces the emulation (new contract). Cost: one
    lowering per weight update plus the integer forward in place of the float one (ResNet-18
    at 224x224: ~1.15x the fp32 training step); use it for QAT whose accuracy is the deployed
    one and to evaluate what will deploy, the plain fake-quant graph for the search passes. Stats:
    ``num_points``, ``num_float_islands``.
    """
    name = PASS_NAME
    summary = "make every quantization point compute the integer graph's value (STE gradients)"
    Options = EmulateIntSimOptions
    requires = frozenset({"calibrated"})
    reads_records = frozenset({EMULATION_KEY})
    writes_records = frozenset({EMULATION_KEY})

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        opts: EmulateIntSimOptions = self.options
        if is_int_sim_graph(gm):
            raise PassFailure("emulate-int-sim needs the calibrated fake-quant graph; this graph "
                              "is already lowered (run emulate-int-sim before lower-to-int-sim)")
        strip_emulation(gm)
        # lower a copy once with the context's calibration data: the ranges of values without
        # a quantizer, the quantization points and the float islands; every later lowering
        # (the engine's and lower-to-int-sim's) reuses these ranges
        probe = copy.deepcopy(gm)
        probe.eval()
        lopts = opts.lowering(keep_fake_quant=False)
        with PassContext(verify_each=False, example_inputs=getattr(ctx, "example_inputs", None),
                         calibration_data=_first_batches(ctx, gm)):
            PassManager.parse(f"graph(lower-to-int-sim{format_options(lopts)})",
                              assume={"calibrated"}).run(probe)
        irec = get_record(probe, INT_SIM_KEY)
        record = EmulationRecord(opts.rounding, opts.multiplier_bits, opts.lut_bits,
                                 opts.gate_bits, opts.bias_frac_bits, dict(irec.ranges),
                                 tuple(irec.float_islands), tuple(irec.fq_map), bias=opts.bias)
        set_record(gm, EMULATION_KEY, record)
        engine = install_emulation(gm, list(irec.fq_map), lower_emulated)
        engine.plain.emulation_backend = opts.backend
        if irec.float_islands:
            listed = "; ".join(f"{i['node']} ({i['op']}): {i['reason']}"
                               for i in irec.float_islands)
            warnings.warn(f"emulate-int-sim: {len(irec.float_islands)} op(s) have no integer "
                          f"kernel and stay float islands (the emulation reproduces the float "
                          f"island exactly as lowered): {listed}", EmulationWarning, stacklevel=2)
        return PassResult(modified=True, stats={"num_points": len(irec.fq_map),
                                                "num_float_islands": len(irec.float_islands)})


def _first_batches(ctx: Any, gm: torch.fx.GraphModule) -> list[Any] | None:
    batches = context_batches(ctx, gm)
    return list(batches)[:2] if batches else None

