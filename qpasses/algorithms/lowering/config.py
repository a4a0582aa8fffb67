"""Options and value types of the lowering: :class:`LoweringOptions`, :class:`QType`,
:class:`Rep`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from passes_registry.errors import OptionError

__all__ = ["INT32_MAX", "INT_SIM_CONTAINER", "FloatIsland", "LoweringOptions", "QType", "Rep"]

# The submodule of a lowered graph that holds the integer-simulation modules the lowering adds.
INT_SIM_CONTAINER = "int_sim"
INT32_MAX = 2 ** 31 - 1


@dataclass(frozen=True)
class LoweringOptions:
    """The lowering contract: options of ``lower-fake-quant-ops`` and of the ``lower-to-int-sim``
    pipeline (``owner`` names which one in an OptionError)."""

    owner: ClassVar[str] = "lower-fake-quant-ops"

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
    bias: Literal["float", "int32"] = field(default="float", metadata={
        "help": "how rounding=float-rne adds a conv/linear bias before a fused requantization: "
                "float (fbgemm: b/(s_x·s_w) in float32 added to the float32 accumulator) or "
                "int32 (ONNX Runtime's QLinearConv/QGemm: rne(b/(s_x·s_w)) added to the int32 "
                "accumulator; export-onnx's bit-exact contract, docs/export.md); the integer "
                "contracts always add an int32 bias (see bias-frac-bits)"})
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
            raise OptionError(self.owner, "multiplier-bits",
                              f"must be an int in 2..31 (31 = Q31 multipliers as in TFLite; 15 "
                              f"or 7 for narrow hardware), got {b!r}")
        if not 8 <= self.lut_bits <= 16:
            raise OptionError(self.owner, "lut-bits", f"must be in 8..16, got {self.lut_bits}")
        if self.bias_frac_bits is not None and not 0 <= self.bias_frac_bits <= 24:
            raise OptionError(self.owner, "bias-frac-bits",
                              f"must be none (auto) or in 0..24, got {self.bias_frac_bits}")
        if not 4 <= self.gate_bits <= 16:
            raise OptionError(self.owner, "gate-bits", f"must be in 4..16, got {self.gate_bits}")


@dataclass(frozen=True)
class QType:
    """An integer grid: real value = ``scale·(q − zero_point)``; ``scale`` has one value, or one
    per channel along ``axis``; ``[qmin, qmax]`` is the declared range of the codes.
    ``fbgemm`` = (s_x, s_w per channel) for accumulators (fbgemm's float32 multiplier order)."""
    scale: tuple[float, ...]
    zero_point: int
    qmin: int
    qmax: int
    axis: int | None = None
    fbgemm: tuple[float, tuple[float, ...]] | None = None
    kind: str = "codes"          # codes | acc | sum

    @property
    def per_channel(self) -> bool:
        return len(self.scale) > 1

    @property
    def max_abs_centered(self) -> int:
        return max(self.qmax - self.zero_point, self.zero_point - self.qmin)

    @property
    def span(self) -> int:
        return self.qmax - self.qmin

    def same_grid(self, other: "QType") -> bool:
        return self.scale == other.scale and self.zero_point == other.zero_point

    def within(self, other: "QType") -> bool:
        return self.same_grid(other) and other.qmin <= self.qmin and self.qmax <= other.qmax


@dataclass
class Rep:
    """How a fake-quant value is represented in the integer graph."""
    node: Any                      # new-graph node (or a constant for non-tensor values)
    qt: QType | None = None        # None: float (or a non-tensor value)
    lo: float | None = None        # pending clamp in real units (relu/relu6/hardtanh/clamp)
    hi: float | None = None
    island: str | None = None      # float value inside the integer region: why
    value: bool = False            # a non-tensor value (size(), shapes...)
    pieces: list | None = None     # a split per-channel value: the grid of each piece

    @property
    def is_int(self) -> bool:
        return self.qt is not None

    @property
    def pending(self) -> bool:
        return self.lo is not None or self.hi is not None


class FloatIsland(Exception):
    """Raised by a lowering rule: the node must run in float (message = reason)."""

