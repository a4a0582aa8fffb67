"""QMeta and QuantSpec: the one typed annotation qpasses keeps on graph nodes.

Decisions (bit-widths, quantizer specs, pruned channels) live in ``node.meta["qpasses"]`` as a
frozen, validated :class:`QMeta`; derived numbers (BitOPs, accumulator widths) are analyses and
are never stored here. Read with :func:`get_qmeta`, write with :func:`update_qmeta`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch.fx

from qpasses.errors import AnnotationError
from qpasses.numerics.quantizers import MAX_BITS

QMETA_KEY = "qpasses"
SCHEMA_VERSION = 1

Scheme = Literal["symmetric", "asymmetric", "unsigned", "dorefa", "pact", "lsq"]
SCHEMES = ("symmetric", "asymmetric", "unsigned", "dorefa", "pact", "lsq")


def _is_bits(b: Any) -> bool:
    return isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= MAX_BITS


def _all_finite_positive(values: tuple) -> bool:
    """Every value an int or float, finite and > 0 (per-channel scales: thousands of values, so
    plain floats and ints are checked with C-level ``map``/``min``)."""
    if set(map(type, values)) <= {float, int}:
        return all(map(math.isfinite, values)) and (not values or min(values) > 0)
    return all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in values)


def _all_ints_within(values: tuple, lo: int, hi: int) -> bool:
    """Every value an int in [lo, hi] (the fast path as in :func:`_all_finite_positive`)."""
    if set(map(type, values)) <= {int}:
        return not values or (lo <= min(values) and max(values) <= hi)
    return all(isinstance(z, int) and lo <= z <= hi for z in values)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    ``bits`` is the width of the tensor (the maximum over kernels when ``bits_per_kernel`` is set);
    0 means pruned. ``bits_per_kernel`` gives one width per slice along ``axis`` (per output
    channel for weights). ``scale``/``zero_point`` are filled by calibration: one value
    (per-tensor) or one per slice along ``axis``.
    """
    bits: int
    signed: bool = True
    scheme: Scheme = "symmetric"
    narrow_range: bool = False
    axis: int | None = None
    bits_per_kernel: tuple[int, ...] | None = None
    scale: tuple[float, ...] | None = None
    zero_point: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.bits_per_kernel is not None:
            object.__setattr__(self, "bits_per_kernel", tuple(self.bits_per_kernel))
            if self.axis is None:
                object.__setattr__(self, "axis", 0)
        for name in ("scale", "zero_point"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, name, tuple(v))
        problems = self.problems()
        if problems:
            raise AnnotationError("invalid QuantSpec: " + "; ".join(problems))

    def problems(self) -> list[str]:
        out = []
        if not _is_bits(self.bits):
            out.append(f"bits must be an int in 0..{MAX_BITS} (0 = pruned), got {self.bits!r}")
        if self.scheme not in SCHEMES:
            out.append(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.axis is not None and (not isinstance(self.axis, int) or self.axis < 0):
            out.append(f"axis must be a non-negative int or None, got {self.axis!r}")
        bpk = self.bits_per_kernel
        if bpk is not None:
            if len(bpk) == 0:
                out.append("bits_per_kernel must not be empty")
            elif not all(_is_bits(b) for b in bpk):
                out.append(f"every per-kernel bit-width must be an int in 0..{MAX_BITS}")
            elif _is_bits(self.bits) and self.bits != max(bpk):
                out.append(f"bits ({self.bits}) must equal max(bits_per_kernel) ({max(bpk)})")
        if self.scale is not None:
            if not _all_finite_positive(self.scale):
                out.append("scale values must be finite and > 0")
            n = self.num_channels
            if n is not None and len(self.scale) not in (1, n):
                out.append(f"scale has {len(self.scale)} values for {n} kernels")
        if self.zero_point is not None:
            if self.scale is not None and len(self.zero_point) != len(self.scale):
                out.append("zero_point and scale must have the same length")
            if _is_bits(self.bits) and self.bits > 0:
                lo, hi = self.qrange()
                if not _all_ints_within(self.zero_point, lo, hi):
                    out.append(f"zero_point values must be ints in [{lo}, {hi}]")
        return out

    @property
    def num_channels(self) -> int | None:
        return len(self.bits_per_kernel) if self.bits_per_kernel is not None else None

    @property
    def per_kernel(self) -> bool:
        return self.bits_per_kernel is not None

    @property
    def pruned(self) -> bool:
        return self.bits == 0

    def qrange(self, bits: int | None = None) -> tuple[int, int]:
        """(qmin, qmax) of the integer grid for ``bits`` (default: ``self.bits``)."""
        b = self.bits if bits is None else bits
        if b == 0:
            return 0, 0
        if self.signed:
            return (-(2 ** (b - 1)) + (1 if self.narrow_range else 0), 2 ** (b - 1) - 1)
        return 0, 2 ** b - 1

    def kernel_bits(self, num_channels: int) -> tuple[int, ...]:
        """One bit-width per kernel (broadcasting a per-tensor width)."""
        if self.bits_per_kernel is None:
            return (self.bits,) * num_channels
        if len(self.bits_per_kernel) != num_channels:
            raise AnnotationError(f"bits_per_kernel has {len(self.bits_per_kernel)} entries for "
                                  f"{num_channels} kernels")
        return self.bits_per_kernel

    def replace(self, **changes: Any) -> "QuantSpec":
        return dataclasses.replace(self, **changes)

    def short(self) -> str:
        """Compact text for dumps: ``i4``, ``u8``, ``i{2,4,0}``, with ``/ch`` when per-channel."""
        kind = "i" if self.signed else "u"
        if self.bits_per_kernel is not None:
            bits = _compress(self.bits_per_kernel)
        else:
            bits = str(self.bits)
        text = f"{kind}{bits}"
        if self.axis is not None and self.bits_per_kernel is None:
            text += f"/ch{self.axis}"
        if self.scheme not in ("symmetric", "unsigned"):
            text += f":{self.scheme}"
        if self.scale is not None:
            text += "@cal"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "QuantSpec":
        try:
            return QuantSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        except TypeError as e:
            raise AnnotationError(f"bad QuantSpec dict: {e}") from None


def _compress(bits: tuple[int, ...]) -> str:
    """``{4x3,2,0x5}``: run-length text of a per-kernel bit vector."""
    runs: list[list[int]] = []
    for b in bits:
        if runs and runs[-1][0] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    return "{" + ",".join(f"{b}x{n}" if n > 1 else str(b) for b, n in runs) + "}"


@dataclass(frozen=True)
class QMeta:
    """Everything qpasses decided about one node.

    ``weight``: the node's weight spec; ``act``: the spec of its (first) input activation;
    ``output``: the spec of its output (joins such as add/cat, and integer-lowered nodes);
    ``pruned_channels``: output channels removed by pruning; ``float_island``: why the node stays
    in float (reported); ``origin``: the passes that wrote this annotation, in order.
    """
    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    output: QuantSpec | None = None
    pruned_channels: tuple[int, ...] = ()
    float_island: str | None = None
    origin: tuple[str, ...] = ()
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "pruned_channels", tuple(self.pruned_channels))
        object.__setattr__(self, "origin", tuple(self.origin))
        problems = self.problems()
        if problems:
            raise AnnotationError("invalid QMeta: " + "; ".join(problems))

    def problems(self) -> list[str]:
        out = []
        for name in ("weight", "act", "output"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, QuantSpec):
                out.append(f"{name} must be a QuantSpec or None, got {type(v).__name__}")
        if not all(isinstance(c, int) and c >= 0 for c in self.pruned_channels):
            out.append("pruned_channels must be non-negative ints")
        if len(set(self.pruned_channels)) != len(self.pruned_channels):
            out.append("pruned_channels has duplicates")
        if self.schema != SCHEMA_VERSION:
            out.append(f"schema {self.schema} is not supported (expected {SCHEMA_VERSION})")
        return out

    @property
    def w_bits(self) -> int | None:
        return self.weight.bits if self.weight is not None else None

    @property
    def a_bits(self) -> int | None:
        return self.act.bits if self.act is not None else None

    @property
    def empty(self) -> bool:
        return self == QMeta(origin=self.origin)

    def short(self) -> str:
        parts = []
        if self.weight is not None:
            parts.append(f"w={self.weight.short()}")
        if self.act is not None:
            parts.append(f"act={self.act.short()}")
        if self.output is not None:
            parts.append(f"out={self.output.short()}")
        if self.pruned_channels:
            parts.append(f"pruned={len(self.pruned_channels)}")
        if self.float_island is not None:
            parts.append("float-island")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight": self.weight.to_dict() if self.weight else None,
            "act": self.act.to_dict() if self.act else None,
            "output": self.output.to_dict() if self.output else None,
            "pruned_channels": list(self.pruned_channels),
            "float_island": self.float_island,
            "origin": list(self.origin),
            "schema": self.schema,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "QMeta":
        unknown = set(d) - {f.name for f in dataclasses.fields(QMeta)}
        if unknown:
            raise AnnotationError(f"bad QMeta dict: unknown keys {sorted(unknown)}")
        spec = {k: QuantSpec.from_dict(d[k]) if d.get(k) is not None else None
                for k in ("weight", "act", "output")}
        return QMeta(**spec, pruned_channels=tuple(d.get("pruned_channels", ())),
                     float_island=d.get("float_island"), origin=tuple(d.get("origin", ())),
                     schema=d.get("schema", SCHEMA_VERSION))


_EMPTY = QMeta()


def get_qmeta(node: torch.fx.Node) -> QMeta:
    """The node's QMeta (an empty one when it has none)."""
    meta = node.meta.get(QMETA_KEY)
    return meta if meta is not None else _EMPTY


def has_qmeta(node: torch.fx.Node) -> bool:
    return node.meta.get(QMETA_KEY) is not None


def update_qmeta(node: torch.fx.Node, origin: str | None = None, **changes: Any) -> QMeta:
    """Replace fields of the node's QMeta (a new frozen object); ``origin`` names the writing pass."""
    old = get_qmeta(node)
    try:
        new = dataclasses.replace(old, **changes)
    except TypeError as e:
        raise AnnotationError(f"node '{node.name}': {e}") from None
    if origin is not None and (not new.origin or new.origin[-1] != origin):
        new = dataclasses.replace(new, origin=new.origin + (origin,))
    node.meta[QMETA_KEY] = new
    return new


def clear_qmeta(node: torch.fx.Node) -> None:
    node.meta.pop(QMETA_KEY, None)


def validate_qmeta_value(value: Any) -> list[str]:
    """Schema check used by the pass manager's verify-each."""
    if not isinstance(value, QMeta):
        return [f"node.meta['{QMETA_KEY}'] must be a QMeta, got {type(value).__name__}"]
    problems = value.problems()
    for name in ("weight", "act", "output"):
        spec = getattr(value, name)
        if isinstance(spec, QuantSpec):
            problems += [f"{name}: {p}" for p in spec.problems()]
    return problems


def format_qmeta_value(value: Any) -> str:
    return value.short() if isinstance(value, QMeta) else repr(value)
