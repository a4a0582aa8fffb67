"""Analyses: costs (MACs, BitOPs, model size) and accumulator widths, plus check-acc-width."""
from . import cost_layers, macs, bitops, model_size, acc_width, check_acc_width  # noqa: F401
