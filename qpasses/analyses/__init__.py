"""Registered analyses: costs (MACs, BitOPs, model size), accumulator widths, channel groups, the
int-sim kernel table, and the IR property checkers."""
from qpasses.analyses import cost_layers, macs, bitops, model_size, acc_width  # noqa: F401
from qpasses.analyses import channel_groups, int_sim_kernels  # noqa: F401
