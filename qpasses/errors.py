"""qpasses' typed errors. All derive from passes_registry's PassesError (one hierarchy)."""
from __future__ import annotations

from passes_registry.errors import (AnalysisError, OptionError, PassesError, PassFailure,
                                    PipelineParseError, PropertyError, RegistryError,
                                    StaleAnalysisError, VerificationError)

__all__ = [
    "AnalysisError", "AnnotationError", "CalibrationError", "InputError", "NumericsError",
    "OptionError", "PassesError", "PassFailure", "PipelineParseError", "PropertyError",
    "QpassesError", "RegistryError", "StaleAnalysisError", "TraceError", "VerificationError",
]


class QpassesError(PassesError):
    """Base of qpasses' own errors."""


class InputError(QpassesError, TypeError):
    """The user passed something that is not what the API expects (not an nn.Module, bad inputs)."""


class TraceError(QpassesError):
    """torch.fx could not trace the model; names the module and the line that failed."""


class AnnotationError(QpassesError, ValueError):
    """A QMeta / QuantSpec annotation is invalid (bits out of range, shape mismatch...)."""


class NumericsError(QpassesError, ValueError):
    """Invalid arguments to a pure numeric routine (bits out of range, bad shapes, bad scale)."""


class CalibrationError(QpassesError):
    """Calibration data is missing or a quantizer was never observed."""


class ConfigError(AnnotationError):
    """A bit-width config file (annotate-bitwidths{config=PATH}) is missing, malformed or does not
    fit the graph; the message names the file, the glob, the layer and what is valid."""


__all__.append("ConfigError")


class BudgetError(OptionError):
    """A cost target (``target-bitops`` / ``target-size``) cannot be met: it lies outside the range
    reachable with the allowed candidates. ``minimum``/``maximum`` hold that range in the
    option's unit (GBitOPs or MB) and the message states it."""

    def __init__(self, pass_name: str, option: str, reason: str, *, minimum: float,
                 maximum: float, unit: str):
        self.minimum, self.maximum, self.unit = minimum, maximum, unit
        OptionError.__init__(self, pass_name, option, reason)


__all__.append("BudgetError")


class QpassesWarning(UserWarning):
    """Base of qpasses' warnings (problems that do not stop a pass but deserve attention)."""


class ConfigWarning(QpassesWarning):
    """A bit-width config entry had no effect (e.g. a glob that matches no layer)."""


__all__ += ["QpassesWarning", "ConfigWarning"]


class ExportError(QpassesError):
    """A graph cannot be exported (``qpasses.export``): not calibrated / not lowered (names the pass
    to run), a bit-width the format cannot carry (names the layer), a float island under
    ``strict``, or an op the exporter does not know (names the node)."""


class ExportDependencyError(ExportError, ImportError):
    """An optional dependency of the exporter is missing; the message names the extra to install."""


class ExportWarning(QpassesWarning):
    """Export went through with a caveat (float islands exported as float ops, a contract that
    onnxruntime does not reproduce bit for bit)."""


__all__ += ["ExportError", "ExportDependencyError", "ExportWarning"]


class EmulationContractError(QpassesError):
    """An emulating fake-quant graph (``emulate-int-sim``) is lowered under another integer
    contract than the one it emulates; the message names both contracts."""


class EmulationWarning(QpassesWarning):
    """``emulate-int-sim`` left something un-emulated: ops without an integer kernel stay float
    islands (listed), quantization points the integer graph does not keep."""


__all__ += ["EmulationContractError", "EmulationWarning"]


class LoweringMemoryError(PassFailure, MemoryError):
    """The lowering (``lower-to-int-sim``) of a conv/linear layer needs more memory than the process
    can allocate: raised before the layer when its temporaries are predicted not to fit
    (``MemAvailable`` and the ``RLIMIT_AS``/``RLIMIT_DATA`` headroom), or converted from the
    allocator's failure inside it. ``layer`` (module path), ``bytes_needed`` and
    ``bytes_available`` (None if unknown) name what did not fit. A ``MemoryError`` too."""

    def __init__(self, layer: str, bytes_needed: int, bytes_available: int | None = None, *,
                 node: str | None = None, detail: str | None = None):
        self.layer, self.bytes_needed, self.bytes_available = layer, bytes_needed, bytes_available
        self.detail = detail
        have = ("" if bytes_available is None
                else f", {bytes_available / 2**20:.1f} MiB available")
        PassFailure.__init__(
            self, f"lowering layer '{layer}' needs {bytes_needed} bytes "
                  f"({bytes_needed / 2**20:.1f} MiB{have}) of temporaries and int64 weight codes"
                  + (f" ({detail})" if detail else "")
                  + "; free memory (fewer processes, keep-fake-quant=false, a smaller "
                    "calibration batch) or lower on a machine with more", node)

    def with_context(self, *, pass_name: str, position: int, pipeline: str,
                     reproducer: str | None = None) -> "LoweringMemoryError":
        err = LoweringMemoryError(self.layer, self.bytes_needed, self.bytes_available,
                                  node=self.node, detail=self.detail)
        err.pass_name, err.position, err.pipeline = pass_name, position, pipeline
        err.reproducer = reproducer
        err.args = (err._format(),)
        return err


__all__ += ["LoweringMemoryError"]
