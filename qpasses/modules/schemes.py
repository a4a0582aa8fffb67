"""Scheme names: the one mapping between the three vocabularies that name a quantizer.

- The text options of ``insert-fake-quant``: ``weight-scheme`` (``symmetric``, ``asymmetric``,
  ``dorefa``) and ``act-scheme`` (``affine``, ``symmetric``, ``pact``, ``lsq``).
- ``QuantSpec.scheme`` of the annotations (:mod:`qpasses.ir.annotations`): *which* quantizer;
  ``QuantSpec.signed`` says which half of the integer line the tensor uses.
- The integer grids of :data:`qpasses.numerics.quantizers.SCHEMES`: range and zero-point rule,
  where ``asymmetric`` is the *unsigned* affine grid (PyTorch's quint8) and ``asymmetric_signed``
  the signed one.

So ``act-scheme=affine`` is recorded as ``QuantSpec(scheme="asymmetric")`` and quantizes on the
``asymmetric`` (unsigned tensor) or ``asymmetric_signed`` (signed tensor) grid. The table is in
docs/algorithms.md, "Conventions".
"""
from __future__ import annotations

from qpasses.errors import NumericsError

__all__ = ["ACT_SCHEME_OPTIONS", "act_spec_scheme", "grid_scheme"]

#: ``act-scheme`` option -> ``QuantSpec.scheme`` for an (unsigned, signed) tensor. ``affine`` is
#: recorded as ``asymmetric``: a zero point on the tensor's own side of the integer line.
ACT_SCHEME_OPTIONS: dict[str, tuple[str, str]] = {
    "affine": ("asymmetric", "asymmetric"),
    "symmetric": ("unsigned", "symmetric"),
    "pact": ("pact", "pact"),
    "lsq": ("lsq", "lsq"),
}


def act_spec_scheme(option: str, signed: bool) -> str:
    """The ``QuantSpec.scheme`` that ``insert-fake-quant{act-scheme=option}`` records."""
    if option not in ACT_SCHEME_OPTIONS:
        raise NumericsError(f"unknown act-scheme {option!r}; valid: "
                            f"{', '.join(ACT_SCHEME_OPTIONS)}")
    return ACT_SCHEME_OPTIONS[option][1 if signed else 0]


def grid_scheme(scheme: str, signed: bool) -> str:
    """The integer grid (a ``numerics.quantizers`` scheme) of a ``QuantSpec`` scheme and sign.

    ``asymmetric`` -> ``asymmetric_signed`` / ``asymmetric`` (signed / unsigned range with a zero
    point); ``symmetric``, ``unsigned``, ``pact`` and ``lsq`` -> ``symmetric`` / ``unsigned``
    (zero point 0). ``dorefa`` has no affine grid (``2·q(tanh-normalised w) − 1``).
    """
    if scheme == "asymmetric":
        return "asymmetric_signed" if signed else "asymmetric"
    if scheme in ("symmetric", "unsigned", "pact", "lsq"):
        return "symmetric" if signed else "unsigned"
    raise NumericsError(f"scheme {scheme!r} has no affine integer grid")
