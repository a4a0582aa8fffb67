"""Training-time fake-quantization modules: the weight and activation quantizers.

These are the ``nn.Module`` s that ``insert-fake-quant`` puts into a GraphModule; they are usable on
their own too. The math comes from :mod:`qpasses.numerics` (or :func:`fast_fake_quant`, which
computes the same thing faster); this module adds state, modes and autograd plumbing.

State (all in ``state_dict``, so a trained or calibrated graph round-trips through save/load into a
freshly prepared one): ``bits`` (a buffer: one per kernel for weights, a 0-D tensor for activations),
``scale`` / ``zero_point`` buffers, PACT's ``alpha`` and LSQ's ``step`` parameters, the observer's
statistics, and two mode flags as uint8 buffers (the torch.ao convention):

- ``fake_quant_enabled``: when 0 the quantizer is the identity (e.g. float calibration);
- ``observer_enabled``: when 1 the quantizer updates its range from the data it sees. Weights: the
  scale tracks the current weights (recomputed only when the weight tensor changed, by its version
  counter, so frozen inference pays nothing). Affine activations: the observer folds every batch in
  and, while fake-quant is on, the scale follows it (torch.ao QAT behaviour). PACT / LSQ: the
  observer only records statistics that ``calibrate`` turns into the initial ``alpha`` / ``step``.

Python-side copies of the flags and bits (refreshed by the setters and after ``load_state_dict``)
keep ``forward`` free of device syncs. Change modes through :meth:`FakeQuantize.enable_fake_quant` /
:meth:`FakeQuantize.enable_observer` (or :func:`set_fake_quant` / :func:`set_observing` on a whole
model, :mod:`qpasses.modules.fake_quant_layers`), not by writing the buffers. The layer wrappers
(``FakeQuantConv2d``...) that hold a weight quantizer are in that module too.

Fast path: weights with one bit-width per tensor (per-channel scales) and per-tensor activations
(affine and PACT) go through :func:`~qpasses.numerics.fast_fake_quant.fast_fake_quant`, a straight-
through fake quantizer bit-identical to torch's fused
``torch.fake_quantize_per_{tensor,channel}_affine`` kernels and to ``numerics.quantize_dequantize``
(all multiply by the float32 reciprocal of the scale and round half to even) but written as a few
vectorized ATen ops, which on CPU is 4-10x faster than the fused kernels (they round element by
element with a scalar ``nearbyint``). Per-kernel bit vectors (0-bit kernels exactly 0), other
rounding modes and codes wider than 16 bits use the vectorized numerics path. There are no Python
loops over channels.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from qpasses.errors import CalibrationError, NumericsError
from qpasses.modules.quantizer_args import check_bits
from qpasses.modules.quantizer_args import quantizer_where as _where
from qpasses.modules.schemes import grid_scheme
from qpasses.modules.tensor_keys import tensor_versions
from qpasses.numerics.fast_fake_quant import FAST_DTYPES, FAST_MAX_BITS, fast_fake_quant
from qpasses.numerics.observers import MinMaxObserver, Observer
from qpasses.numerics.weight_codes import WeightCodes, fake_quant_codes, fake_quant_codes_bytes
from qpasses.numerics.quantizers import (MAX_BITS, ROUNDING_MODES, calc_qparams, dorefa_weight,
                                         fake_quantize, lsq_fake_quant, quantize_dequantize,
                                         scheme_qrange)

__all__ = [
    "FakeQuantize", "WeightFakeQuant", "ActFakeQuant", "AffineActFakeQuant", "PACTActFakeQuant",
    "LSQActFakeQuant", "WEIGHT_SCHEMES", "ACT_SCHEMES", "check_bits",
]

WEIGHT_SCHEMES = ("symmetric", "asymmetric", "dorefa")
AFFINE_ACT_SCHEMES = ("symmetric", "asymmetric", "asymmetric_signed", "unsigned")
ACT_SCHEMES = AFFINE_ACT_SCHEMES + ("pact", "lsq")


class FakeQuantize(nn.Module):
    """Base of every fake-quant module: the two mode flags and the ready/scale bookkeeping."""

    is_weight_quantizer: ClassVar[bool] = False
    fake_quant_enabled: Tensor
    observer_enabled: Tensor

    def __init__(self, name: str = "", observe: bool = True) -> None:
        super().__init__()
        self.qname = name          # layer / tensor this quantizer serves, for messages
        self.register_buffer("fake_quant_enabled", torch.ones(1, dtype=torch.uint8))
        self.register_buffer("observer_enabled", torch.tensor([int(observe)], dtype=torch.uint8))
        self._fq_on = True
        self._obs_on = observe
        self.register_load_state_dict_post_hook(_after_load)

    # -- modes -------------------------------------------------------------------------------------

    @property
    def fake_quant_on(self) -> bool:
        return self._fq_on

    @property
    def observing(self) -> bool:
        return self._obs_on

    def enable_fake_quant(self, enabled: bool = True) -> "FakeQuantize":
        self.fake_quant_enabled.fill_(int(bool(enabled)))
        self._fq_on = bool(enabled)
        return self

    def enable_observer(self, enabled: bool = True) -> "FakeQuantize":
        self.observer_enabled.fill_(int(bool(enabled)))
        self._obs_on = bool(enabled)
        return self

    def _refresh_caches(self) -> None:
        self._fq_on = bool(int(self.fake_quant_enabled.reshape(-1)[0]))
        self._obs_on = bool(int(self.observer_enabled.reshape(-1)[0]))

    # -- calibration interface ---------------------------------------------------------------------

    def qparams(self) -> tuple[Tensor, Tensor]:
        """Current ``(scale, zero_point)`` (detached copies)."""
        raise NotImplementedError

    def calibration_problems(self) -> list[str]:
        """Why this quantizer is not usable for inference yet ([] when it is)."""
        try:
            scale, _ = self.qparams()
        except CalibrationError as e:
            return [str(e)]
        if scale.numel() == 0 or not bool(torch.isfinite(scale).all()) or \
                not bool((scale > 0).all()):
            return [f"{_where(self.qname)} has non-finite or non-positive scales"]
        return []


def _after_load(module: nn.Module, incompatible: Any) -> None:
    if isinstance(module, FakeQuantize):
        module._refresh_caches()
        module._after_load()


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------

class WeightFakeQuant(FakeQuantize):
    """Fake quantizer of a conv/linear weight (output channels along dim 0).

    ``scheme``: ``symmetric`` (signed, z = 0; ``narrow_range`` drops -2^(b-1)), ``asymmetric``
    (an integral zero point; the signed range, or ``[0, 2^b - 1]`` with ``signed=False``) or
    ``dorefa`` (FracBits/DoReFa
    ``2 q(tanh-normalised w) - 1``, no scale to calibrate). ``bits``: one int or one per output
    channel ("per-kernel"); 0-bit kernels are exactly 0. ``per_channel``: one range per output
    channel (a per-tensor range with per-kernel bits still gives per-kernel scales). The scale is the
    min/max range of the current weight (Distiller: weights are quantized with min/max).
    """

    is_weight_quantizer = True
    bits: Tensor
    scale: Tensor
    zero_point: Tensor

    def __init__(self, num_channels: int, bits: Any = 8, scheme: str = "symmetric", *,
                 per_channel: bool = True, narrow_range: bool = False, signed: bool = True,
                 rounding: str = "rne", name: str = "") -> None:
        super().__init__(name, observe=True)
        if scheme not in WEIGHT_SCHEMES:
            raise NumericsError(f"{_where(name)}: weight scheme {scheme!r} is not one of "
                                f"{', '.join(WEIGHT_SCHEMES)}")
        if rounding not in ROUNDING_MODES:
            raise NumericsError(f"{_where(name)}: rounding {rounding!r} is not one of "
                                f"{', '.join(ROUNDING_MODES)}")
        if not isinstance(num_channels, int) or num_channels < 1:
            raise NumericsError(f"{_where(name)}: num_channels must be a positive int")
        if narrow_range and scheme != "symmetric":
            raise NumericsError(f"{_where(name)}: narrow_range is only defined for the symmetric "
                                "weight scheme")
        if not signed and scheme != "asymmetric":
            raise NumericsError(f"{_where(name)}: unsigned weights need scheme 'asymmetric'")
        b = check_bits(bits, name=name, num_channels=num_channels)
        self.num_channels = num_channels
        self.scheme = scheme
        self.per_channel = per_channel
        self.narrow_range = narrow_range
        self.signed = signed
        self.rounding = rounding
        self.register_buffer("bits", b.expand(num_channels).clone())
        self.register_buffer("scale", torch.full((num_channels,), float("nan")))
        self.register_buffer("zero_point", torch.zeros(num_channels, dtype=torch.int64))
        self._seen: tuple | None = None    # tensor_versions of the weight last observed
        self._cache_bits()

    # Numerics scheme name of the integer grid (DoReFa has none; its codes are symmetric).
    @property
    def _ns_scheme(self) -> str:
        return "symmetric" if self.scheme == "dorefa" else grid_scheme(self.scheme, self.signed)

    def _cache_bits(self) -> None:
        b = self.bits
        lo, hi = int(b.min()), int(b.max())
        if lo < 0 or hi > MAX_BITS:
            raise NumericsError(f"{_where(self.qname)}: loaded bits outside 0..{MAX_BITS} "
                                f"(min {lo}, max {hi})")
        self._uniform: int | None = lo if lo == hi else None
        self._bits_arg: Any = self._uniform if self._uniform is not None else b
        if self._uniform is not None and self.scheme != "dorefa":
            self._qmin, self._qmax = scheme_qrange(self._uniform, self._ns_scheme,  # type: ignore[arg-type]
                                                   self.narrow_range)
        if self.scheme == "dorefa":
            # DoReFa grid: scale * (k - (2^b - 1) / 2), scale = 2 / (2^b - 1); 0-bit kernels: 1.
            levels = (torch.pow(2.0, b.double()) - 1)
            step = torch.where(levels > 0, 2.0 / levels.clamp(min=1), torch.ones_like(levels))
            with torch.no_grad():
                self.scale.copy_(step.to(self.scale.dtype))
                self.zero_point.zero_()
            self._ready = True
        else:
            self._ready = bool(torch.isfinite(self.scale).all() and (self.scale > 0).all())
        self._seen = None

    def _after_load(self) -> None:
        self._cache_bits()

    def set_bits(self, bits: Any) -> None:
        """New bit-width(s) (int or one per kernel); the scale is recomputed on the next use."""
        b = check_bits(bits, name=self.qname, num_channels=self.num_channels)
        with torch.no_grad():
            self.bits.copy_(b.expand(self.num_channels).to(self.bits.device))
            if self.scheme != "dorefa":
                self.scale.fill_(float("nan"))
        self._cache_bits()

    @property
    def per_kernel(self) -> bool:
        return self._uniform is None

    @torch.no_grad()
    def observe(self, w: Tensor) -> None:
        """Set ``scale`` / ``zero_point`` from the min/max of ``w`` (skipped if ``w`` is unchanged)."""
        if self.scheme == "dorefa":
            return
        if self._ready and self._seen == tensor_versions(w):
            return
        if w.shape[0] != self.num_channels:
            raise NumericsError(f"{_where(self.qname)}: weight has {w.shape[0]} output channels, "
                                f"the quantizer was built for {self.num_channels}")
        # min/max of the weight (numerics.minmax_qparams uses aminmax, ~20x slower on CPU)
        flat = w.detach().reshape(w.shape[0] if self.per_channel else 1, -1)
        mn, mx = flat.amin(1), flat.amax(1)
        if not self.per_channel:
            mn, mx = mn.reshape(()), mx.reshape(())
        scale, zp = calc_qparams(mn, mx, self._bits_arg, self._ns_scheme,  # type: ignore[arg-type]
                                 narrow=self.narrow_range)
        self.scale.copy_(scale.to(self.scale.dtype))
        self.zero_point.copy_(zp)
        self._ready = True
        self.mark_observed(w)

    def mark_observed(self, w: Tensor) -> None:
        """Take the current scales as observed from ``w`` as it is now: until ``w`` changes (or
        another tensor comes), forward does not re-observe. Keyed by
        :func:`~qpasses.modules.tensor_keys.tensor_versions`, not ``id``: a new tensor at a freed
        one's address is another tensor (an ``id`` key let that skip a re-observe in some
        processes and not others). Copies and pickles forget it."""
        self._seen = tensor_versions(w)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_seen"] = None
        return state

    def forward(self, w: Tensor) -> Tensor:
        if not self._fq_on:
            return w
        if self.scheme == "dorefa":
            return dorefa_weight(w, self._bits_arg, axis=0, rounding=self.rounding)  # type: ignore[arg-type]
        grid = self._prepared_grid(w)
        if grid is not None:
            return fast_fake_quant(w, *grid, axis=0)
        return quantize_dequantize(w, self.scale, self.zero_point, self._bits_arg,  # type: ignore[arg-type]
                                   self._ns_scheme, narrow=self.narrow_range, axis=0,  # type: ignore[arg-type]
                                   rounding=self.rounding)  # type: ignore[arg-type]

    def _prepared_grid(self, w: Tensor) -> tuple[Tensor, Tensor | None, int, int] | None:
        """Observe ``w`` (or check a scale exists); (scale, zero point or None, qmin, qmax) of
        the fast fake-quant path ``forward`` takes for ``w``, None where it takes another."""
        if self._obs_on:
            self.observe(w)
        elif not self._ready:
            raise CalibrationError(f"{_where(self.qname)} has no scale: its observer is disabled "
                                   "and it was never calibrated (run calibrate, or "
                                   "enable_observer(True))")
        return self._fast_grid(w)

    def _fast_grid(self, w: Tensor) -> tuple[Tensor, Tensor | None, int, int] | None:
        if (self._uniform is not None and 0 < self._uniform <= FAST_MAX_BITS
                and self.rounding == "rne" and w.dtype in FAST_DTYPES):
            zp = None if self._ns_scheme == "symmetric" else self.zero_point
            return self.scale, zp, int(self._qmin), int(self._qmax)
        return None

    def _has_codes(self) -> bool:
        return self._fq_on and self.scheme != "dorefa" and \
            type(self).forward is WeightFakeQuant.forward

    def integer_codes(self, w: Tensor) -> WeightCodes | None:
        """The integer codes ``forward(w)`` puts ``w`` on, their per-kernel L1 norms and range
        (:func:`~qpasses.numerics.weight_codes.fake_quant_codes`), without fake-quantizing it;
        None where ``forward`` does not take the fast path (or the shortcut does not apply)."""
        grid = self._prepared_grid(w) if self._has_codes() else None
        return None if grid is None else fake_quant_codes(w.detach(), *grid)

    def integer_codes_bytes(self, w: Tensor) -> int | None:
        """Bytes per weight :meth:`integer_codes` allocates for ``w`` at most; None where it
        would not take the fast path (the caller fake-quantizes and checks instead)."""
        grid = self._fast_grid(w) if self._has_codes() else None
        return None if grid is None else fake_quant_codes_bytes(grid[2], grid[3], grid[1])

    def qparams(self) -> tuple[Tensor, Tensor]:
        if not self._ready:
            raise CalibrationError(f"{_where(self.qname)} was never observed")
        return self.scale.detach().clone(), self.zero_point.detach().clone()

    def extra_repr(self) -> str:
        bits = self._uniform if self._uniform is not None else "per-kernel"
        return (f"bits={bits}, scheme={self.scheme}, signed={self.signed}, "
                f"per_channel={self.per_channel}, narrow_range={self.narrow_range}, "
                f"rounding={self.rounding}")


# ------------------------------------------------------------------------------------------------
# activations
# ------------------------------------------------------------------------------------------------

class ActFakeQuant(FakeQuantize):
    """Base of per-tensor activation quantizers: ``bits`` buffer (1..32), an ``observer`` submodule
    and ``consumers`` (the layers reading the quantized tensor, for messages)."""

    scheme: ClassVar[str] = ""
    bits: Tensor

    def __init__(self, bits: Any = 8, *, signed: bool = False, observer: Observer | None = None,
                 rounding: str = "rne", name: str = "", observe: bool = True) -> None:
        super().__init__(name, observe=observe)
        if rounding not in ROUNDING_MODES:
            raise NumericsError(f"{_where(name)}: rounding {rounding!r} is not one of "
                                f"{', '.join(ROUNDING_MODES)}")
        b = check_bits(bits, name=name, min_bits=1)
        if b.numel() != 1:
            raise NumericsError(f"{_where(name)}: activation bits must be a single int "
                                "(per-tensor), got a per-kernel list")
        self.register_buffer("bits", b.reshape(()).clone())
        self.signed = signed
        self.rounding = rounding
        self.observer = observer if observer is not None else MinMaxObserver()
        self.consumers: tuple[str, ...] = ()
        self._cache_bits()

    @property
    def num_bits(self) -> int:
        return self._bits

    @property
    def range_scheme(self) -> str:
        """The numerics scheme of the integer grid (``symmetric``/``asymmetric``/``unsigned``...)."""
        return grid_scheme("symmetric", self.signed)

    @property
    def narrow(self) -> bool:
        return False

    @property
    def qmin(self) -> int:
        """Smallest integer code of the grid (from ``bits`` and the range scheme)."""
        return int(self._qmin)

    @property
    def qmax(self) -> int:
        """Largest integer code of the grid."""
        return int(self._qmax)

    def _cache_bits(self) -> None:
        b = int(self.bits)
        if not 1 <= b <= MAX_BITS:
            raise NumericsError(f"{_where(self.qname)}: bits={b} is outside 1..{MAX_BITS}")
        self._bits = b
        self._qmin, self._qmax = scheme_qrange(b, self.range_scheme, self.narrow)  # type: ignore[arg-type]

    def _after_load(self) -> None:
        self._cache_bits()

    def set_bits(self, bits: Any) -> None:
        b = check_bits(bits, name=self.qname, min_bits=1)
        if b.numel() != 1:
            raise NumericsError(f"{_where(self.qname)}: activation bits must be a single int")
        with torch.no_grad():
            self.bits.copy_(b.reshape(()))
        self._cache_bits()
        self._bits_changed()

    def _bits_changed(self) -> None:
        pass

    @property
    def observed(self) -> bool:
        return self.observer.observed

    def init_from_observer(self) -> None:
        """Turn the observer's statistics into this quantizer's parameters (calibration)."""
        raise NotImplementedError

    def _fast_ok(self, x: Tensor) -> bool:
        return self._bits <= FAST_MAX_BITS and self.rounding == "rne" and x.dtype in FAST_DTYPES

    def extra_repr(self) -> str:
        return f"bits={self._bits}, scheme={self.scheme}, signed={self.signed}"


class AffineActFakeQuant(ActFakeQuant):
    """Observer-driven affine activation quantizer (per tensor).

    ``range_scheme``: ``asymmetric`` (unsigned range with a zero point; "affine"), ``symmetric``,
    ``asymmetric_signed`` or ``unsigned``. While observing, every batch is folded into the observer;
    while fake-quant is also on, the scale follows the observer (torch.ao QAT behaviour).
    """

    scheme = "affine"
    scale: Tensor
    zero_point: Tensor

    def __init__(self, bits: Any = 8, range_scheme: str = "asymmetric", *,
                 observer: Observer | None = None, rounding: str = "rne", name: str = "") -> None:
        if range_scheme not in AFFINE_ACT_SCHEMES:
            raise NumericsError(f"{_where(name)}: activation range scheme {range_scheme!r} is not "
                                f"one of {', '.join(AFFINE_ACT_SCHEMES)}")
        self._range_scheme = range_scheme
        super().__init__(bits, signed=range_scheme in ("symmetric", "asymmetric_signed"),
                         observer=observer, rounding=rounding, name=name, observe=True)
        self.register_buffer("scale", torch.full((1,), float("nan")))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int64))
        self._ready = False

    @property
    def range_scheme(self) -> str:
        return self._range_scheme

    def _after_load(self) -> None:
        super()._after_load()
        self._ready = bool(torch.isfinite(self.scale).all() and (self.scale > 0).all())

    def _bits_changed(self) -> None:
        if self.observer.observed:
            self.init_from_observer()
        else:
            with torch.no_grad():
                self.scale.fill_(float("nan"))
            self._ready = False

    @torch.no_grad()
    def init_from_observer(self) -> None:
        scale, zp = self.observer.qparams(self._bits, self._range_scheme)  # type: ignore[arg-type]
        self.scale.copy_(scale.reshape(1).to(self.scale.dtype))
        self.zero_point.copy_(zp.reshape(1))
        self._ready = True

    def forward(self, x: Tensor) -> Tensor:
        if self._obs_on:
            self.observer.observe(x)
            if self._fq_on:
                self.init_from_observer()
        if not self._fq_on:
            return x
        if not self._ready:
            raise CalibrationError(f"{_where(self.qname)} has no scale: its observer is disabled "
                                   "and it was never calibrated (run calibrate)")
        if self._fast_ok(x):
            zp = self.zero_point if self._range_scheme.startswith("asymmetric") else None
            return fast_fake_quant(x, self.scale, zp, int(self._qmin), int(self._qmax))
        return fake_quantize(x, self.scale, self.zero_point, self._qmin, self._qmax,
                             self.rounding, 0)  # type: ignore[arg-type]

    def qparams(self) -> tuple[Tensor, Tensor]:
        if not self._ready:
            raise CalibrationError(f"{_where(self.qname)} was never observed")
        return self.scale.detach().clone(), self.zero_point.detach().clone()

    def extra_repr(self) -> str:
        return f"bits={self._bits}, scheme=affine/{self._range_scheme}"


class PACTActFakeQuant(ActFakeQuant):
    """PACT (Choi et al. 2018): clip at a learnable ``alpha`` then quantize uniformly.

    One-sided (``signed=False``, non-negative inputs): ``y = min(relu(x), |alpha|)`` on the unsigned
    grid ``[0, 2^b - 1]`` with ``scale = |alpha| / (2^b - 1)``, exactly ``numerics.pact``'s forward.
    Signed inputs: ``y = clip(x, -|alpha|, |alpha|)`` on the symmetric narrow grid
    ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` with ``scale = |alpha| / (2^(b-1) - 1)`` (zero stays exactly
    representable, unlike FracBits' double-sided mid-rise grid; FracBits uses ``numerics.pact``).
    Gradients: STE for ``x`` inside the clip range, PACT's ``d/d alpha = ±1`` on clipped elements.
    ``alpha`` starts at ``alpha_init``; ``calibrate`` sets it from the observed clip range.
    """

    scheme = "pact"

    def __init__(self, bits: Any = 8, *, signed: bool = False, alpha_init: float = 8.0,
                 observer: Observer | None = None, rounding: str = "rne", name: str = "") -> None:
        super().__init__(bits, signed=signed, observer=observer, rounding=rounding, name=name,
                         observe=False)
        if signed and self._bits < 2:
            raise NumericsError(f"{_where(name)}: signed PACT needs bits >= 2")
        if not alpha_init > 0:
            raise NumericsError(f"{_where(name)}: alpha_init must be > 0, got {alpha_init}")
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    @property
    def narrow(self) -> bool:
        return self.signed

    def _cache_bits(self) -> None:
        super()._cache_bits()
        if self.signed and self._bits < 2:
            raise NumericsError(f"{_where(self.qname)}: signed PACT needs bits >= 2")

    @torch.no_grad()
    def init_from_observer(self) -> None:
        lo, hi = self.observer.clip_range(self._bits, self.range_scheme)  # type: ignore[arg-type]
        a = torch.maximum(lo.abs(), hi.abs()) if self.signed else hi
        a = a.reshape(()).to(self.alpha.dtype).clamp(min=torch.finfo(self.alpha.dtype).tiny * 2**24)
        self.alpha.copy_(a)

    def forward(self, x: Tensor) -> Tensor:
        if self._obs_on:
            self.observer.observe(x)
        if not self._fq_on:
            return x
        a = self.alpha.abs().to(x.dtype)
        y = torch.clamp(x, -a, a) if self.signed else torch.minimum(torch.relu(x), a)
        scale = (a.detach() / self._qmax).reshape(1)
        zero = torch.zeros(1, dtype=torch.int64, device=x.device)
        if self._fast_ok(x):
            return fast_fake_quant(y, scale, None, int(self._qmin), int(self._qmax))
        return fake_quantize(y, scale, zero, self._qmin, self._qmax, self.rounding, 0)  # type: ignore[arg-type]

    def qparams(self) -> tuple[Tensor, Tensor]:
        scale = (self.alpha.detach().abs() / self._qmax).reshape(1).clone()
        return scale, torch.zeros(1, dtype=torch.int64, device=scale.device)


class LSQActFakeQuant(ActFakeQuant):
    """LSQ (Esser et al. 2020): a learnable step size ``step`` on the unsigned (non-negative
    inputs) or signed grid, zero point 0, LSQ's step gradient (``numerics.lsq_fake_quant``) scaled
    by ``1/sqrt(N Q_P)`` with N the features per sample (the paper's activation setting).

    ``step`` is set by ``calibrate`` from the observer (the observed range's scale) or, when the
    quantizer runs uncalibrated, from the first batch with LSQ's ``2 mean|x| / sqrt(qmax)``.
    """

    scheme = "lsq"
    initialized: Tensor

    def __init__(self, bits: Any = 8, *, signed: bool = False, observer: Observer | None = None,
                 rounding: str = "rne", name: str = "") -> None:
        super().__init__(bits, signed=signed, observer=observer, rounding=rounding, name=name,
                         observe=False)
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.zeros(1, dtype=torch.uint8))
        self._init = False

    def _after_load(self) -> None:
        super()._after_load()
        self._init = bool(int(self.initialized[0]))

    @torch.no_grad()
    def _set_step(self, step: Tensor) -> None:
        s = step.reshape(()).to(self.step.dtype)
        s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
        self.step.copy_(s.clamp(min=1e-8))
        self.initialized.fill_(1)
        self._init = True

    def init_from_observer(self) -> None:
        scale, _ = self.observer.qparams(self._bits, self.range_scheme)  # type: ignore[arg-type]
        self._set_step(scale)

    def forward(self, x: Tensor) -> Tensor:
        if self._obs_on:
            self.observer.observe(x)
        if not self._fq_on:
            return x
        if not self._init:
            self._set_step(2 * x.detach().abs().mean() / max(self._qmax, 1) ** 0.5)
        # LSQ's gradient scale 1/sqrt(N * Q_P), N = features per sample (not per batch)
        features = x.numel() // x.shape[0] if x.dim() > 1 else x.numel()
        g = 1.0 / (max(features, 1) * max(self._qmax, 1)) ** 0.5
        return lsq_fake_quant(x, self.step, self._qmin, self._qmax, g,  # type: ignore[arg-type]
                              rounding=self.rounding)  # type: ignore[arg-type]

    def qparams(self) -> tuple[Tensor, Tensor]:
        if not self._init:
            raise CalibrationError(f"{_where(self.qname)}: the LSQ step was never initialized")
        scale = self.step.detach().abs().reshape(1).clone()
        return scale, torch.zeros(1, dtype=torch.int64, device=scale.device)
