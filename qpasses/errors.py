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
