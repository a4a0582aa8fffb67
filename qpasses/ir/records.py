"""The graph records qpasses keeps in ``gm.meta``: one frozen dataclass per key, registered with
passes_registry so they are validated, printed in the graph dump and fingerprinted under
verify-each (see docs/annotations.md, "Graph records", for each record's writer and readers).

Read and write them with :func:`passes_registry.get_record` / ``set_record`` / ``pop_record``;
a record is replaced, never mutated. Tables keyed by layer name are plain dicts inside the frozen
record: treat them as read-only. Fields declared ``compare=False`` are memos or findings, not
part of the record's value (left out of fingerprints and JSON).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx

from passes_registry import register_graph_record

__all__ = [
    "BITSPLIT_KEY", "EMULATION_KEY", "EmulationRecord", "FRACBITS_META", "FROZEN_META", "GMPQ_META", "INT_SIM_KEY", "MODEL_KEY",
    "PRUNE_LOG_KEY", "SELECTED_META", "ActGroup", "BitsplitLayerError", "BitsplitRecord",
    "FracBitsLayer", "FracBitsRecord", "FrozenFracBitsLayer", "FrozenFracBitsRecord",
    "GmpqLayer", "GmpqSelectedLayer", "GmpqSelectedRecord", "GmpqSupernetRecord",
    "GmpqTeacherRecord", "IntSimRecord", "PruneLog",
]

MODEL_KEY = "qpasses.model"                 # str: the traced model's class name
FRACBITS_META = "qpasses.fracbits"          # FracBitsRecord
FROZEN_META = "qpasses.fracbits.frozen"     # FrozenFracBitsRecord
GMPQ_META = "qpasses.gmpq"                  # GmpqSupernetRecord, or GmpqTeacherRecord on a teacher
SELECTED_META = "qpasses.gmpq.selected"     # GmpqSelectedRecord
BITSPLIT_KEY = "ptq_bitsplit"               # BitsplitRecord
PRUNE_LOG_KEY = "qpasses.prune_log"         # PruneLog
INT_SIM_KEY = "qpasses.int_sim"             # IntSimRecord


def _is_bits(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 32


def _bits_problems(what: str, cands: Any) -> list[str]:
    if not isinstance(cands, tuple) or not all(_is_bits(b) for b in cands):
        return [f"{what} must be a tuple of bit-widths in 0..32, got {cands!r}"]
    return []


def _table_problems(what: str, table: Any, entry_type: type) -> list[str]:
    if not isinstance(table, dict):
        return [f"{what} must be a dict keyed by layer name, got {type(table).__name__}"]
    return [f"{what}['{k}'] must be a {entry_type.__name__}, got {type(v).__name__}"
            for k, v in table.items() if not isinstance(k, str) or not isinstance(v, entry_type)]


# ---------------------------------------------------------------------------------------------
# FracBits: written by insert-fracbits, replaced by FrozenFracBitsRecord in freeze-fracbits


@dataclass(frozen=True)
class FracBitsLayer:
    """One searched layer of a FracBits graph."""
    module: str             # path of the wrapped layer; its weight_fake_quant holds λ_w
    node: str               # the layer's fx node
    act: str | None         # path of its input's FracBitsActQuant, None when not quantized
    first: bool
    last: bool
    pinned: bool            # weights at a fixed width (first/last layers)


@dataclass(frozen=True)
class ActGroup:
    """A scale-sharing group of the annotated graph: the layers reading it get one input width
    (the max) when λ is rounded; ``joins`` are its add/cat nodes with an output spec."""
    layers: tuple[str, ...]
    joins: tuple[str, ...]


@dataclass(frozen=True)
class FracBitsRecord:
    """The FracBits quantizers installed by insert-fracbits and the options they were built
    with. ``cost_cache`` memoizes the cost model's layer table for the penalty."""
    layers: dict[str, FracBitsLayer]
    granularity: str
    candidates: tuple[int, ...]
    allow_zero: bool
    pin_first_last: int | None
    act_groups: tuple[ActGroup, ...] = ()
    cost_cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    def problems(self) -> list[str]:
        out = _table_problems("layers", self.layers, FracBitsLayer)
        out += _bits_problems("candidates", self.candidates)
        if self.granularity not in ("layer", "kernel"):
            out.append(f"granularity must be 'layer' or 'kernel', got {self.granularity!r}")
        if not all(isinstance(g, ActGroup) for g in self.act_groups):
            out.append("act_groups must hold ActGroup values")
        return out

    def summary(self) -> str:
        pinned = sum(1 for r in self.layers.values() if r.pinned)
        cs = sorted(self.candidates)
        return (f"{len(self.layers)} layers ({pinned} pinned), granularity={self.granularity}, "
                f"candidates={cs[0]}..{cs[-1]}" + (", allow-zero" if self.allow_zero else ""))


@dataclass(frozen=True)
class FrozenFracBitsLayer:
    """What freeze-fracbits learned and chose for one layer. ``lambda_w``: a float, or one per
    kernel; ``alpha``: the learned PACT clip of its input (None when not quantized)."""
    lambda_w: float | tuple[float, ...]
    lambda_a: float | None
    w_bits: int | tuple[int, ...]
    a_bits: int | None
    alpha: float | None


@dataclass(frozen=True)
class FrozenFracBitsRecord:
    """The learned λ and PACT α of a frozen FracBits search, by layer. insert-fake-quant
    (act-scheme=pact, no pact-alpha) starts each PACT clip from ``alpha``."""
    layers: dict[str, FrozenFracBitsLayer]

    def problems(self) -> list[str]:
        return _table_problems("layers", self.layers, FrozenFracBitsLayer)

    def summary(self) -> str:
        return f"{len(self.layers)} layers"


# ---------------------------------------------------------------------------------------------
# GMPQ: written by insert-gmpq-supernet (and make_teacher), replaced by GmpqSelectedRecord


@dataclass(frozen=True)
class GmpqLayer:
    """One composite layer of a GMPQ supernet."""
    module: str             # path of the wrapped layer (weight_fake_quant is its GMPQWeightMixer)
    node: str
    act: str | None         # path of its input's GMPQActMixer, None when not quantized


@dataclass(frozen=True)
class GmpqSupernetRecord:
    """The composite layers installed by insert-gmpq-supernet, its options and the Grad-CAM
    feature tap (``feature``: the tapped node, ``tap``: the FeatureTap module path).
    ``cost_cache`` memoizes the cost model's layer table for the complexity loss."""
    layers: dict[str, GmpqLayer]
    w_candidates: tuple[int, ...]
    a_candidates: tuple[int, ...]
    pin_first_last: bool
    feature: str | None = None
    feature_shape: tuple[int, ...] | None = None
    tap: str | None = None
    cost_cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    def problems(self) -> list[str]:
        return (_table_problems("layers", self.layers, GmpqLayer)
                + _bits_problems("w_candidates", self.w_candidates)
                + _bits_problems("a_candidates", self.a_candidates))

    def summary(self) -> str:
        return (f"{len(self.layers)} layers, w-candidates={list(self.w_candidates)}, "
                f"a-candidates={list(self.a_candidates)}, feature={self.feature or 'none'}")


@dataclass(frozen=True)
class GmpqTeacherRecord:
    """On the fp32 teacher built by ``make_teacher``: its feature tap and BN mode."""
    tap: str
    feature: str
    teacher_mode: str

    def problems(self) -> list[str]:
        if self.teacher_mode not in ("eval", "train"):
            return [f"teacher_mode must be 'eval' or 'train', got {self.teacher_mode!r}"]
        return []

    def summary(self) -> str:
        return f"teacher, feature={self.feature}, mode={self.teacher_mode}"


@dataclass(frozen=True)
class GmpqSelectedLayer:
    """The learned distribution and the chosen widths of one searched layer. ``alpha``: the
    chosen activation branch's PACT clip; ``threshold``: the weight range T."""
    w_candidates: tuple[int, ...]
    pi_w: tuple[float, ...]
    a_candidates: tuple[int, ...]
    pi_a: tuple[float, ...]
    alpha: float | None
    threshold: float
    w_bits: int | tuple[int, ...]
    a_bits: int | None


@dataclass(frozen=True)
class GmpqSelectedRecord:
    """What select-gmpq-policy learned and chose, by layer (read by the gmpq-pi sensitivity)."""
    layers: dict[str, GmpqSelectedLayer]

    def problems(self) -> list[str]:
        return _table_problems("layers", self.layers, GmpqSelectedLayer)

    def summary(self) -> str:
        return f"{len(self.layers)} layers"


# ---------------------------------------------------------------------------------------------
# ptq-bitsplit


@dataclass(frozen=True)
class BitsplitLayerError:
    """Relative reconstruction errors ``||Y - X W_hat^T||² / ||Y||²`` of one layer: round to
    nearest with the best MSE clip (``rtn``) and bit-split (``bitsplit``); ``rows`` sampled."""
    rtn: float
    bitsplit: float
    rows: float


@dataclass(frozen=True)
class BitsplitRecord:
    """Per-layer reconstruction errors of the last ptq-bitsplit run."""
    layers: dict[str, BitsplitLayerError]

    def problems(self) -> list[str]:
        return _table_problems("layers", self.layers, BitsplitLayerError)

    def summary(self) -> str:
        if not self.layers:
            return "0 layers"
        n = len(self.layers)
        rtn = sum(e.rtn for e in self.layers.values()) / n
        bs = sum(e.bitsplit for e in self.layers.values()) / n
        return f"{n} layers, mean relative error rtn {rtn:.4g} -> bit-split {bs:.4g}"


# ---------------------------------------------------------------------------------------------
# prune-zero-bit-channels and lower-to-int-sim


@dataclass(frozen=True)
class PruneLog:
    """What prune-zero-bit-channels removed and kept, appended to by every run: per producer
    layer ``{"layer", "node", "mode", "removed", "kept": [{"channel", "reason"}]}``, and one
    ``{"layer": None, "mode", "note", "max_deviation", ...}`` entry per run. A log, not graph
    state: not fingerprinted."""
    entries: tuple[dict[str, Any], ...] = ()

    def problems(self) -> list[str]:
        if not isinstance(self.entries, tuple):
            return [f"entries must be a tuple, got {type(self.entries).__name__}"]
        return [f"entry {i} must be a dict with a 'layer' key" for i, e in enumerate(self.entries)
                if not isinstance(e, dict) or "layer" not in e]

    def summary(self) -> str:
        removed = sum(len(e.get("removed", ())) for e in self.entries if e.get("layer"))
        return f"{len(self.entries)} entries, {removed} channels removed"


@dataclass(frozen=True)
class IntSimRecord:
    """The contract lower-to-int-sim implemented (rounding, multiplier, LUT, gate and bias
    widths, how float-rne adds biases, backend), what stayed in float, its stats, the observed ranges of uncovered values
    and ``fq_map`` (fake-quant node -> integer node, scale, zero point).

    ``fake_quant``: the calibrated fake-quant graph before lowering (``keep-fake-quant``), which
    verify-int-sim compares against; fingerprinted by identity, not by content. ``verify``: the
    findings of the last verify-int-sim (a read-only check), not part of the record's value."""
    rounding: str
    backend: str
    multiplier_bits: int
    lut_bits: int
    gate_bits: int
    bias_frac_bits: int
    bias: str = "float"          # float-rne: fbgemm's float bias or ONNX Runtime's int32 bias
    float_islands: tuple[dict[str, str], ...] = ()
    stats: dict[str, int] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    fq_map: dict[str, dict[str, Any]] = field(default_factory=dict)
    fake_quant: torch.fx.GraphModule | None = field(
        default=None, compare=False, repr=False, metadata={"fingerprint": "identity"})
    verify: dict[str, Any] | None = field(default=None, compare=False)

    def problems(self) -> list[str]:
        out = []
        if not isinstance(self.float_islands, tuple):
            out.append(f"float_islands must be a tuple, got {type(self.float_islands).__name__}")
        if self.backend not in ("reference", "fast"):
            out.append(f"backend must be 'reference' or 'fast', got {self.backend!r}")
        if self.fake_quant is not None and not isinstance(self.fake_quant, torch.fx.GraphModule):
            out.append(f"fake_quant must be a GraphModule, got {type(self.fake_quant).__name__}")
        return out

    def summary(self) -> str:
        return (f"rounding={self.rounding}, backend={self.backend}, "
                f"multiplier-bits={self.multiplier_bits}, "
                + (f"bias={self.bias}, " if self.bias != "float" else "")
                + f"{len(self.float_islands)} float "
                "islands" + (", fake-quant kept" if self.fake_quant is not None else ""))


EMULATION_KEY = "qpasses.emulation"        # EmulationRecord


@dataclass(frozen=True)
class EmulationRecord:
    """The integer contract an emulating fake-quant graph reproduces (``emulate-int-sim``):
    ``lower-to-int-sim`` of the graph must use the same ``rounding``, ``multiplier_bits``,
    ``lut_bits``, ``gate_bits``, ``bias_frac_bits`` and ``bias`` (else ``EmulationContractError``) and lowers
    with the recorded ``ranges`` (intermediate grids of values without a quantizer), so both sides
    make the same decisions. ``float_islands``: the ops without an integer kernel (node, op,
    reason); ``points``: the emulated quantization points."""
    rounding: str
    multiplier_bits: int
    lut_bits: int
    gate_bits: int
    bias_frac_bits: int | None
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    float_islands: tuple[dict[str, str], ...] = ()
    points: tuple[str, ...] = ()
    bias: str = "float"

    def contract(self) -> dict[str, Any]:
        """The contract as lowering option values (field name -> value)."""
        return {"rounding": self.rounding, "multiplier_bits": self.multiplier_bits,
                "lut_bits": self.lut_bits, "gate_bits": self.gate_bits,
                "bias_frac_bits": self.bias_frac_bits, "bias": self.bias}

    def problems(self) -> list[str]:
        out = []
        if self.rounding not in ("gemmlowp", "single", "float-rne", "hawq"):
            out.append(f"rounding must be gemmlowp, single, float-rne or hawq, got "
                       f"{self.rounding!r}")
        if not isinstance(self.float_islands, tuple) or not isinstance(self.points, tuple):
            out.append("float_islands and points must be tuples")
        return out

    def summary(self) -> str:
        return (f"rounding={self.rounding}, multiplier-bits={self.multiplier_bits}, "
                f"bias-frac-bits={'auto' if self.bias_frac_bits is None else self.bias_frac_bits}"
                f", {len(self.points)} points, {len(self.float_islands)} float islands")


# ---------------------------------------------------------------------------------------------
# registration


def _register(key: str, cls: type | tuple[type, ...], summary: str, *,
              fingerprinted: bool = True) -> None:
    register_graph_record(key, cls, summary=summary, validate=lambda r: r.problems(),
                          format=lambda r: r.summary(), fingerprinted=fingerprinted)


# The model name is in the report header; it is not printed in dumps (every traced graph has it).
register_graph_record(MODEL_KEY, str, summary="class name of the traced model")
_register(FRACBITS_META, FracBitsRecord, "FracBits quantizers of a graph being searched")
_register(FROZEN_META, FrozenFracBitsRecord, "learned λ and PACT α of a frozen FracBits search")
_register(GMPQ_META, (GmpqSupernetRecord, GmpqTeacherRecord),
          "GMPQ supernet layers and feature tap (or a teacher's tap)")
_register(SELECTED_META, GmpqSelectedRecord, "learned π and chosen widths of a GMPQ search")
_register(BITSPLIT_KEY, BitsplitRecord, "per-layer reconstruction errors of ptq-bitsplit")
# A log, not graph state: neither fingerprinted nor printed in graph dumps.
register_graph_record(PRUNE_LOG_KEY, PruneLog, summary="what prune-zero-bit-channels removed and kept",
                      validate=lambda r: r.problems(), fingerprinted=False)
_register(INT_SIM_KEY, IntSimRecord, "integer-simulation contract of a lowered graph")
_register(EMULATION_KEY, EmulationRecord, "integer contract an emulating fake-quant graph reproduces")
