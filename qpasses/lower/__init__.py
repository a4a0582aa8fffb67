"""Integer simulation of a calibrated fake-quant graph: the runtime modules ``lower-to-int-sim``
puts into the lowered GraphModule (:mod:`qpasses.lower.int_sim`) and the independent reference
interpreter ``verify-int-sim`` checks them against (:mod:`qpasses.lower.reference`)."""
from .int_sim import (BACKENDS, INT_SIM_META_KEY, Dequantize, IntAdd, IntAvgPoolSum, IntCat,
                      IntClamp, IntConv1d, IntConv2d, IntConv3d, IntLayer, IntLinear, IntLUT,
                      IntMaxPool, IntMul, IntSimModule, Quantize, Requant, Requantize,
                      int_sim_modules, is_int_sim_graph, kernel_table, set_backend)

__all__ = [
    "BACKENDS", "INT_SIM_META_KEY", "Dequantize", "IntAdd", "IntAvgPoolSum", "IntCat", "IntClamp",
    "IntConv1d", "IntConv2d", "IntConv3d", "IntLUT", "IntLayer", "IntLinear", "IntMaxPool",
    "IntMul", "IntSimModule", "Quantize", "Requant", "Requantize", "int_sim_modules",
    "is_int_sim_graph", "kernel_table", "set_backend",
]
