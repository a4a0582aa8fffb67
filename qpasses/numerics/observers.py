"""Range observers for calibration: min/max, moving average, per-sample average (Distiller AVG),
percentile, MSE-optimal clipping, ACIQ (Laplace/Gauss, Banner et al. / Distiller) and KL divergence
(TensorRT style).

Every observer is an ``nn.Module`` whose statistics live in buffers (so ``state_dict`` round-trips,
including per-channel shapes learned on the first ``observe``). ``forward(x)`` observes and returns
``x`` unchanged. Per-tensor (``axis=None``) or per-channel along ``axis``; statistics are computed for
all channels at once on a ``(C, N)`` view. ``clip_range(bits, scheme)`` gives the chosen real range and
``qparams(bits, scheme)`` turns it into ``(scale, zero_point)`` with ``calc_qparams``.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from qpasses.errors import CalibrationError, NumericsError
from qpasses.numerics.layout import in_memory_order, memory_order_dims
from qpasses.numerics.quant_utils import Bits, Scheme, check_bits, check_scheme
from qpasses.numerics.quantizers import DEFAULT_EPS, calc_qparams, round_tensor, scheme_qrange

__all__ = [
    "ACIQ_GAUSS", "ACIQ_GAUSS_HALF", "ACIQ_LAPLACE", "ACIQ_LAPLACE_HALF", "OBSERVERS",
    "Observer", "MinMaxObserver", "MovingAverageMinMaxObserver", "AvgMinMaxObserver",
    "PercentileObserver", "HistogramObserverBase", "MSEObserver", "KLObserver", "ACIQObserver",
    "aciq_clip", "batch_minmax", "make_observer",
]

# ACIQ optimal clip multipliers by bit-width (Distiller's tables; docs/algorithms.md,
# "Range-linear PTQ"):
# alpha = b * table (Laplace scale b) or sigma * table (Gauss). The half-range columns are for
# post-ReLU tensors.
ACIQ_LAPLACE = {0: 1.05, 1: 1.86, 2: 2.83, 3: 3.89, 4: 5.03, 5: 6.2, 6: 7.41, 7: 8.64, 8: 9.89}
ACIQ_LAPLACE_HALF = {0: 1.86, 1: 2.83, 2: 3.89, 3: 5.02, 4: 6.2, 5: 7.41, 6: 8.64, 7: 9.89, 8: 11.16}
ACIQ_GAUSS = {1: 1.24, 2: 1.71, 3: 2.15, 4: 2.55, 5: 2.93, 6: 3.28, 7: 3.61, 8: 3.92}
ACIQ_GAUSS_HALF = {1: 1.71, 2: 2.15, 3: 2.55, 4: 2.93, 5: 3.28, 6: 3.61, 7: 3.92, 8: 4.2}


def _aciq_table(dist: str, half_range: bool) -> dict[int, float]:
    if dist == "laplace":
        return ACIQ_LAPLACE_HALF if half_range else ACIQ_LAPLACE
    if dist == "gauss":
        return ACIQ_GAUSS_HALF if half_range else ACIQ_GAUSS
    raise NumericsError(f"unknown ACIQ distribution {dist!r}; valid: 'laplace', 'gauss'")


def _aciq_multiplier(bits: Bits, dist: str, half_range: bool,
                     device: torch.device | None = None) -> Tensor:
    """Table lookup for an int or a per-kernel bits tensor (one gather, no loop over channels)."""
    table = _aciq_table(dist, half_range)
    bits = check_bits(bits)
    lo, hi = min(table), max(table)
    b = torch.as_tensor(bits, device=device)
    if bool((b < lo).any()) or bool((b > hi).any()):
        raise NumericsError(f"ACIQ {dist} tables cover bits {lo}..{hi}; got bits={bits}")
    values = torch.tensor([table.get(i, float("nan")) for i in range(hi + 1)], dtype=torch.float64,
                          device=device)
    return values[b]


def aciq_clip(bits: Bits, dist: Literal["laplace", "gauss"], scale_param: Tensor | float,
              mean: Tensor | float = 0.0, half_range: bool = False) -> Tensor:
    """Symmetric ACIQ saturation value ``|mean| + table[bits] * scale_param`` (Laplace ``b`` or Gauss
    ``sigma``); e.g. Laplace, 4 bits, b = 1, mean = 0 gives 5.03."""
    mult = _aciq_multiplier(bits, dist, half_range)
    scale_t = torch.as_tensor(scale_param, dtype=torch.float64)
    mean_t = torch.as_tensor(mean, dtype=torch.float64)
    return mean_t.abs() + mult * scale_t


def batch_minmax(x: Tensor, axis: int | None = None) -> tuple[Tensor, Tensor]:
    """``(min, max)`` of ``x``: shape ``(1,)`` per tensor, ``(C,)`` per channel along ``axis``, by
    one ``aminmax`` or ``amin`` / ``amax`` over the other dims in place, dims in memory order (no
    ``(C, N)`` copy, no copy of a channels-last batch; min / max are exact in any order)."""
    if axis is None:
        mn, mx = torch.aminmax(in_memory_order(x))
        return mn.reshape(1), mx.reshape(1)
    ax = axis % x.dim()
    if x.dim() == 1:
        return x.clone(), x.clone()
    order = memory_order_dims(x)
    dims = tuple(i for i, d in enumerate(order) if d != ax)
    x = x.permute(order)
    return x.amin(dim=dims), x.amax(dim=dims)


def _check_ready(obs: "Observer") -> None:
    if not obs.observed:
        raise CalibrationError(f"{type(obs).__name__} was never observed: call observe(x) on "
                               "calibration data before asking for qparams")


class Observer(nn.Module):
    """Base class: per-tensor (``axis=None``) or per-channel statistics kept in buffers."""

    min_val: Tensor
    max_val: Tensor

    def __init__(self, axis: int | None = None) -> None:
        super().__init__()
        if axis is not None and not isinstance(axis, int):
            raise NumericsError(f"axis must be None (per-tensor) or an int, got {axis!r}")
        self.axis = axis
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    @property
    def observed(self) -> bool:
        return self.min_val.numel() > 0

    def forward(self, x: Tensor) -> Tensor:
        self.observe(x)
        return x

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold a batch into the statistics."""
        x = self._float_input(x)
        bmin, bmax = batch_minmax(x, self.axis)
        if self.observed and self.min_val.shape[0] != bmin.shape[0]:
            raise NumericsError(f"observer saw {self.min_val.shape[0]} channels before and "
                                f"{bmin.shape[0]} now along axis {self.axis}")
        mn, mx = bmin, bmax
        if self.observed:
            mn, mx = torch.minimum(self.min_val, mn), torch.maximum(self.max_val, mx)
        self._fold(x, bmin, bmax, mn, mx)
        self.min_val, self.max_val = mn, mx

    def clip_range(self, bits: Bits = 8, scheme: Scheme = "symmetric") -> tuple[Tensor, Tensor]:
        """The real range ``(lo, hi)`` to quantize (0-D per-tensor, ``(C,)`` per-channel)."""
        _check_ready(self)
        check_scheme(scheme)
        lo, hi = self._range(bits, scheme)
        return self._shape(lo), self._shape(hi)

    def qparams(self, bits: Bits = 8, scheme: Scheme = "symmetric", *, narrow: bool = False,
                eps: float = DEFAULT_EPS) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` for the clipped range; ``bits`` may be per kernel."""
        lo, hi = self.clip_range(bits, scheme)
        return calc_qparams(lo, hi, bits, scheme, narrow=narrow, eps=eps)

    def reset(self) -> None:
        """Forget everything observed (buffers back to empty)."""
        for name, buf in list(self._buffers.items()):
            if buf is not None:
                self._buffers[name] = torch.empty(0, dtype=buf.dtype, device=buf.device)

    def extra_repr(self) -> str:
        return f"axis={self.axis}"

    def _fold(self, x: Tensor, batch_min: Tensor, batch_max: Tensor, new_min: Tensor,
              new_max: Tensor) -> None:
        """Update subclass statistics from the float32 batch ``x`` (min / max per channel: its own
        ``batch_*``, the running ``new_*``); the ``(C, N)`` view for :meth:`_update` is built only
        for subclasses that override it."""
        if type(self)._update is not Observer._update:
            self._update(self._flatten(x), new_min, new_max)

    def _update(self, flat: Tensor, new_min: Tensor, new_max: Tensor) -> None:
        """Update subclass statistics; ``flat`` is the batch as ``(C, N)`` float32."""

    def _range(self, bits: Bits, scheme: str) -> tuple[Tensor, Tensor]:
        return self.min_val, self.max_val

    def _float_input(self, x: Tensor) -> Tensor:
        """``x`` detached as float32, after checking it can be observed along ``axis``."""
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            raise NumericsError("observers take floating-point tensors")
        if x.numel() == 0:
            raise NumericsError("cannot observe an empty tensor")
        if self.axis is not None and not -x.dim() <= self.axis < x.dim():
            raise NumericsError(f"observer axis={self.axis} is out of range for a "
                                f"{x.dim()}-D tensor")
        return x.detach().float()

    def _flatten(self, x: Tensor) -> Tensor:
        x = self._float_input(x)
        if self.axis is None:
            flat = x.reshape(1, -1)
        else:
            flat = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
        if self.observed and self.min_val.shape[0] != flat.shape[0]:
            raise NumericsError(f"observer saw {self.min_val.shape[0]} channels before and "
                                f"{flat.shape[0]} now along axis {self.axis}")
        return flat

    def _shape(self, t: Tensor) -> Tensor:
        # Per-tensor statistics stay 0-D unless per-kernel bits made the range per kernel.
        return t.reshape(()) if self.axis is None and t.numel() == 1 else t

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        # Buffers start empty and take their per-channel shape on the first observe: resize them to
        # the incoming shapes so load_state_dict works on a fresh observer.
        for name, buf in self._buffers.items():
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty_like(state_dict[key], dtype=buf.dtype,
                                                       device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MinMaxObserver(Observer):
    """Running min / max over everything observed."""


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of the batch min / max: ``m += momentum * (batch - m)`` (momentum is
    the weight of the new batch, as in BatchNorm and torch.ao's averaging_constant)."""

    def __init__(self, axis: int | None = None, momentum: float = 0.01) -> None:
        super().__init__(axis)
        if not 0 < momentum <= 1:
            raise NumericsError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("avg_min", torch.empty(0))
        self.register_buffer("avg_max", torch.empty(0))

    def _fold(self, x: Tensor, bmin: Tensor, bmax: Tensor, new_min: Tensor,
              new_max: Tensor) -> None:
        if self.avg_min.numel() == 0:
            self.avg_min, self.avg_max = bmin, bmax
        else:
            self.avg_min = self.avg_min + self.momentum * (bmin - self.avg_min)
            self.avg_max = self.avg_max + self.momentum * (bmax - self.avg_max)

    def _range(self, bits: Bits, scheme: str) -> tuple[Tensor, Tensor]:
        return self.avg_min, self.avg_max

    def extra_repr(self) -> str:
        return f"axis={self.axis}, momentum={self.momentum}"


class AvgMinMaxObserver(Observer):
    """Distiller's AVG clipping: the mean over samples of each sample's min / max (``batch_axis`` is
    the sample dimension). A correct per-sample average, not Distiller's element-weighted running mean
    (docs/algorithms.md, "Range-linear PTQ"). Tensors with one element per sample (per channel) contribute the batch
    min / max as a single sample, as in Distiller."""

    def __init__(self, axis: int | None = None, batch_axis: int = 0) -> None:
        super().__init__(axis)
        if axis is not None and axis == batch_axis:
            raise NumericsError(f"axis and batch_axis must differ (both {axis})")
        self.batch_axis = batch_axis
        self.register_buffer("sum_min", torch.empty(0, dtype=torch.float64))
        self.register_buffer("sum_max", torch.empty(0, dtype=torch.float64))
        self.register_buffer("n_samples", torch.empty(0, dtype=torch.float64))

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        super().observe(x)
        xd = x.detach().float()
        if xd.dim() == 0:
            xd = xd.reshape(1)
        b_ax = self.batch_axis % xd.dim()
        if self.axis is None:
            per = xd.movedim(b_ax, 0).reshape(xd.shape[b_ax], 1, -1)
        else:
            c_ax = self.axis % xd.dim()
            if c_ax == b_ax:
                raise NumericsError(f"axis and batch_axis refer to the same dimension {c_ax}")
            per = xd.movedim((b_ax, c_ax), (0, 1)).reshape(xd.shape[b_ax], xd.shape[c_ax], -1)
        if per.shape[2] == 1:  # one element per sample: use the batch min / max, counted once
            smin, smax = per.amin(dim=(0, 2)).unsqueeze(0), per.amax(dim=(0, 2)).unsqueeze(0)
        else:
            smin, smax = per.amin(dim=2), per.amax(dim=2)
        smin, smax = smin.double().sum(0), smax.double().sum(0)
        n = torch.full_like(smin, float(per.shape[0] if per.shape[2] > 1 else 1))
        if self.n_samples.numel() == 0:
            self.sum_min, self.sum_max, self.n_samples = smin, smax, n
        else:
            self.sum_min, self.sum_max = self.sum_min + smin, self.sum_max + smax
            self.n_samples = self.n_samples + n

    def _range(self, bits: Bits, scheme: str) -> tuple[Tensor, Tensor]:
        return (self.sum_min / self.n_samples).float(), (self.sum_max / self.n_samples).float()


def _quantile_rows(sorted_rows: Tensor, q: float) -> Tensor:
    """Linear-interpolated quantile of each row of an already sorted ``(C, N)`` tensor."""
    n = sorted_rows.shape[1]
    pos = q * (n - 1)
    i0 = int(pos)
    i1 = min(i0 + 1, n - 1)
    frac = pos - i0
    return sorted_rows[:, i0] + frac * (sorted_rows[:, i1] - sorted_rows[:, i0])


class PercentileObserver(Observer):
    """Clip at the ``(100 - p)``-th / ``p``-th percentiles of each batch (exact, interpolated like
    ``torch.quantile``), averaged over batches."""

    def __init__(self, axis: int | None = None, percentile: float = 99.99) -> None:
        super().__init__(axis)
        if not 50.0 < percentile <= 100.0:
            raise NumericsError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        self.register_buffer("sum_lo", torch.empty(0, dtype=torch.float64))
        self.register_buffer("sum_hi", torch.empty(0, dtype=torch.float64))
        self.register_buffer("n_batches", torch.empty(0, dtype=torch.float64))

    def _update(self, flat: Tensor, new_min: Tensor, new_max: Tensor) -> None:
        s = flat.sort(dim=1).values
        p = self.percentile / 100.0
        lo, hi = _quantile_rows(s, 1.0 - p).double(), _quantile_rows(s, p).double()
        if self.sum_lo.numel() == 0:
            self.sum_lo, self.sum_hi = lo, hi
            self.n_batches = torch.ones((), dtype=torch.float64, device=lo.device)
        else:
            self.sum_lo, self.sum_hi = self.sum_lo + lo, self.sum_hi + hi
            self.n_batches = self.n_batches + 1

    def _range(self, bits: Bits, scheme: str) -> tuple[Tensor, Tensor]:
        return (self.sum_lo / self.n_batches).float(), (self.sum_hi / self.n_batches).float()

    def extra_repr(self) -> str:
        return f"axis={self.axis}, percentile={self.percentile}"


def _bin_index(values: Tensor, lo: Tensor, width: Tensor, bins: int) -> Tensor:
    """Bin of each entry of ``values`` (C, N) for per-row ranges; flattened row-major over (C, bins)."""
    idx = torch.floor((values - lo[:, None]) / width[:, None]).clamp(0, bins - 1).long()
    return idx + torch.arange(values.shape[0], device=values.device)[:, None] * bins


class HistogramObserverBase(Observer):
    """Per-channel histograms with ``bins`` bins over ``[hist_lo, hist_hi]`` (which always contains 0;
    over ``|x|`` when ``absolute``). When a batch widens the range, old counts are re-binned at their
    bin centres. All channels are binned with one ``bincount``."""

    def __init__(self, axis: int | None = None, bins: int = 2048, absolute: bool = False) -> None:
        super().__init__(axis)
        if bins < 2:
            raise NumericsError(f"bins must be >= 2, got {bins}")
        self.bins = bins
        self.absolute = absolute
        self.register_buffer("hist", torch.empty(0))
        self.register_buffer("hist_lo", torch.empty(0))
        self.register_buffer("hist_hi", torch.empty(0))

    def _widths(self, lo: Tensor, hi: Tensor) -> Tensor:
        # A zero-width range puts everything in bin 0; width 1 only keeps the index arithmetic finite.
        return torch.where(hi > lo, (hi - lo) / self.bins, torch.ones_like(lo))

    def _count(self, values: Tensor, lo: Tensor, hi: Tensor, weights: Tensor | None = None) -> Tensor:
        c = values.shape[0]
        idx = _bin_index(values, lo, self._widths(lo, hi), self.bins).reshape(-1)
        w = None if weights is None else weights.reshape(-1)
        return torch.bincount(idx, weights=w, minlength=c * self.bins).reshape(c, self.bins).float()

    def bin_centers(self) -> Tensor:
        """``(C, bins)`` bin centres (all equal to ``hist_lo`` for a zero-width range)."""
        width = (self.hist_hi - self.hist_lo) / self.bins
        steps = torch.arange(self.bins, device=self.hist.device, dtype=self.hist.dtype) + 0.5
        return self.hist_lo[:, None] + steps[None, :] * width[:, None]

    def _fold(self, x: Tensor, bmin: Tensor, bmax: Tensor, new_min: Tensor,
              new_max: Tensor) -> None:
        flat = self._flatten(x)
        if self.absolute:
            flat = flat.abs()
            blo, bhi = torch.zeros_like(new_min), torch.maximum(bmax, -bmin)  # = max |x|
        else:
            blo, bhi = bmin.clamp(max=0), bmax.clamp(min=0)
        if self.hist.numel() == 0:
            lo, hi = blo, bhi
            hist = torch.zeros(flat.shape[0], self.bins, device=flat.device)
        else:
            lo, hi = torch.minimum(self.hist_lo, blo), torch.maximum(self.hist_hi, bhi)
            if bool((lo < self.hist_lo).any()) or bool((hi > self.hist_hi).any()):
                hist = self._count(self.bin_centers(), lo, hi, weights=self.hist)
            else:
                hist = self.hist
        self.hist = hist + self._count(flat, lo, hi)
        self.hist_lo, self.hist_hi = lo, hi

    def extra_repr(self) -> str:
        return f"axis={self.axis}, bins={self.bins}"


class MSEObserver(HistogramObserverBase):
    """Clip range minimising the histogram-weighted squared quantization error.

    Candidates are ``r * range`` for ``r = k / grid``, ``k = 1..grid`` (``range`` is ``[-amax, amax]``
    for symmetric, ``[lo, hi]`` with 0 inside for asymmetric, ``[0, hi]`` for unsigned). The error of
    each candidate is evaluated on bin centres for all ratios and channels in one batched op (chunked
    to bound memory); ties prefer the widest range.
    """

    def __init__(self, axis: int | None = None, bins: int = 2048, grid: int = 100,
                 rounding: str = "rne", max_elements: int = 1 << 22) -> None:
        super().__init__(axis, bins, absolute=False)
        if grid < 1:
            raise NumericsError(f"grid must be >= 1, got {grid}")
        self.grid = grid
        self.rounding = rounding
        self.max_elements = max_elements

    def _range(self, bits: Bits, scheme: str) -> tuple[Tensor, Tensor]:
        lo, hi = self.hist_lo, self.hist_hi
        if scheme == "symmetric":
            amax = torch.maximum(lo.abs(), hi)
            lo, hi = -amax, amax
        elif scheme == "unsigned":
            lo = torch.zeros_like(hi)
        c = lo.shape[0]
        centers, hist = self.bin_centers(), self.hist
        qmin, qmax = scheme_qrange(bits, scheme)
        qmin_t = torch.as_tensor(qmin, device=lo.device).float()
        qmax_t = torch.as_tensor(qmax, device=lo.device).float()
        # Descending ratios so argmin's first minimum is the widest range among ties.
        ratios = torch.arange(self.grid, 0, -1, device=lo.device, dtype=torch.float32) / self.grid
        chunk = max(1, self.max_elements // max(1, c * self.bins))
        best_err = torch.full((c,), float("inf"), device=lo.device)
        best_r = torch.ones(c, device=lo.device)
        for start in range(0, self.grid, chunk):
            r = ratios[start:start + chunk][:, None]                       # (R, 1)
            scale, zp = calc_qparams(r * lo[None, :], r * hi[None, :], bits, scheme)  # (R, C)
            s, z = scale[:, :, None], zp[:, :, None].float()
            lo_q, hi_q = qmin_t.reshape(1, -1, 1), qmax_t.reshape(1, -1, 1)
            q = torch.clamp(round_tensor(centers[None] * (1.0 / s), self.rounding) + z, lo_q, hi_q)
            fq = torch.where(hi_q > lo_q, (q - z) * s, torch.zeros_like(q))
            err = (hist[None] * (centers[None] - fq) ** 2).sum(-1)        # (R, C)
            e_min, i_min = err.min(dim=0)
            better = e_min < best_err
            best_err = torch.where(better, e_min, best_err)
            best_r = torch.where(better, r[i_min, 0], best_r)
        return best_r * lo, best_r * hi

    def extra_repr(self) -> str:
        return f"axis={self.axis}, bins={self.bins}, grid={self.grid}"


def _smooth(p: Tensor, eps: float = 1e-4) -> Tensor:
    """Move ``eps`` mass onto the zero bins of each (normalised) row so KL stays finite (MXNet /
    TensorRT calibration smoothing)."""
    zero = p == 0
    n_zero = zero.sum(-1, keepdim=True).float()
    n_nonzero = (~zero).sum(-1, keepdim=True).float().clamp(min=1)
    return torch.where(zero, torch.full_like(p, eps), p - eps * n_zero / n_nonzero)


class KLObserver(HistogramObserverBase):
    """TensorRT entropy calibration on the histogram of ``|x|``.

    For each candidate ``i`` (number of kept bins) the reference P is the first ``i`` bins with the
    outlier mass added to the last one; Q merges those bins into ``n`` quantization levels (spread
    uniformly over the non-empty bins of each level). The threshold is the upper edge of bin ``i``
    with the smallest KL(P || Q). ``n`` is the number of non-negative codes: ``2^(b-1)`` for signed
    schemes, ``2^b`` for unsigned. The loop runs over candidates, vectorised over channels (each
    channel may have its own bits).
    """

    def __init__(self, axis: int | None = None, bins: int = 2048, stride: int = 1) -> None:
        super().__init__(axis, bins, absolute=True)
        if stride < 1:
            raise NumericsError(f"stride must be >= 1, got {stride}")
        self.stride = stride

    def thresholds(self, bits: Bits = 8, scheme: Scheme = "symmetric") -> Tensor:
        """Per-channel ``|x|`` threshold ``(C,)``."""
        _check_ready(self)
        dev = self.hist.device
        qmin, qmax = scheme_qrange(bits, scheme)
        codes = torch.as_tensor(qmax, device=dev) - torch.as_tensor(qmin, device=dev) + 1
        n = codes if scheme == "unsigned" else codes // 2
        # Per-tensor statistics with per-kernel bits: one search per kernel on the shared histogram.
        c = max(self.hist.shape[0], n.numel())
        nb = self.bins
        hist = self.hist.expand(c, nb)
        n = torch.broadcast_to(n, (c,)).clone()
        n = torch.where(codes == 1, torch.zeros_like(n), n)  # 0 bits: nothing to search
        width = (self.hist_hi - self.hist_lo) / self.bins
        best_kl = torch.full((c,), float("inf"), device=dev)
        best_i = torch.full((c,), nb, device=dev, dtype=torch.long)   # default: no clipping
        total = hist.sum(1)
        csum = hist.cumsum(1)
        start = int(n.clamp(min=1).min())
        n_max = int(n.max())
        j = torch.arange(nb, device=dev)
        for i in range(start, nb, self.stride):
            active = (n > 0) & (n <= i) & (total > 0)
            if not bool(active.any()):
                continue
            kept = hist[:, :i]
            p = kept.clone()
            p[:, i - 1] += total - csum[:, i - 1]
            # bin j of the kept part belongs to level floor(j * n / i)
            level = (j[None, :i] * n[:, None]) // i                      # (C, i)
            nz = (kept > 0).float()
            level_mass = torch.zeros(c, n_max, device=dev).scatter_add_(1, level, kept)
            level_nz = torch.zeros(c, n_max, device=dev).scatter_add_(1, level, nz)
            per_bin = level_mass.gather(1, level) / level_nz.gather(1, level).clamp(min=1)
            q = per_bin * nz
            p = _smooth(p / p.sum(1, keepdim=True).clamp(min=1e-30))
            q = _smooth(q / q.sum(1, keepdim=True).clamp(min=1e-30))
            kl = torch.where(p > 0, p * torch.log(p / q.clamp(min=1e-30)), torch.zeros_like(p)).sum(1)
            better = active & (kl < best_kl)
            best_kl = torch.where(better, kl, best_kl)
            best_i = torch.where(better, torch.full_like(best_i, i), best_i)
        return self.hist_lo + best_i.float() * width

    def _range(self, bits: Bits, scheme: str) -> tuple[Tensor, Tensor]:
        t = self.thresholds(bits, scheme)  # type: ignore[arg-type]
        if scheme == "symmetric":
            return -t, t
        if scheme == "unsigned":
            return torch.zeros_like(t), t
        # The |x| threshold clips both sides; keep lo <= hi when the data lies entirely beyond it.
        hi = torch.minimum(self.max_val, t)
        return torch.minimum(torch.maximum(self.min_val, -t), hi), hi

    def extra_repr(self) -> str:
        return f"axis={self.axis}, bins={self.bins}, stride={self.stride}"


class ACIQObserver(Observer):
    """ACIQ analytic clipping (Banner et al., "Post training 4-bit quantization of convolutional
    networks for rapid-deployment"; Distiller's GAUSS / LAPLACE clip modes).

    Tracks count, mean, standard deviation (exact, float64 sums) and the Laplace scale
    ``b = mean |x - mean|`` (each batch uses its own mean; for i.i.d. batches this matches the
    two-pass estimate). Symmetric: ``[-(|mean| + alpha), |mean| + alpha]``; asymmetric / unsigned:
    ``lo = max(min, mean - alpha)``, ``hi = lo + 2 alpha`` (``lo + alpha`` with ``half_range``).
    """

    def __init__(self, axis: int | None = None, dist: Literal["laplace", "gauss"] = "laplace",
                 half_range: bool = False) -> None:
        super().__init__(axis)
        _aciq_table(dist, half_range)
        self.dist = dist
        self.half_range = half_range
        for name in ("count", "sum", "sumsq", "abs_dev"):
            self.register_buffer(name, torch.empty(0, dtype=torch.float64))

    def _update(self, flat: Tensor, new_min: Tensor, new_max: Tensor) -> None:
        f = flat.double()
        n = torch.full((f.shape[0],), float(f.shape[1]), dtype=torch.float64, device=f.device)
        s, ss = f.sum(1), (f * f).sum(1)
        dev = (f - f.mean(1, keepdim=True)).abs().sum(1)
        if self.count.numel() == 0:
            self.count, self.sum, self.sumsq, self.abs_dev = n, s, ss, dev
        else:
            self.count, self.sum = self.count + n, self.sum + s
            self.sumsq, self.abs_dev = self.sumsq + ss, self.abs_dev + dev

    @property
    def mean(self) -> Tensor:
        return self._shape(self.sum / self.count)

    @property
    def std(self) -> Tensor:
        m = self.sum / self.count
        return self._shape((self.sumsq / self.count - m * m).clamp(min=0).sqrt())

    @property
    def laplace_b(self) -> Tensor:
        return self._shape(self.abs_dev / self.count)

    def _range(self, bits: Bits, scheme: str) -> tuple[Tensor, Tensor]:
        mult = _aciq_multiplier(bits, self.dist, self.half_range, device=self.sum.device)
        spread = self.laplace_b if self.dist == "laplace" else self.std
        alpha = mult * spread.reshape(-1)
        mean = self.mean.reshape(-1)
        if scheme == "symmetric":
            clip = (mean.abs() + alpha).float()
            return -clip, clip
        lo = torch.maximum(self.min_val.double(), mean - alpha)
        hi = lo + (alpha if self.half_range else 2 * alpha)
        return lo.float(), hi.float()

    def extra_repr(self) -> str:
        return f"axis={self.axis}, dist={self.dist}, half_range={self.half_range}"


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "avg": AvgMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "aciq": ACIQObserver,
    "kl": KLObserver,
}


def make_observer(method: str, axis: int | None = None, **options: Any) -> Observer:
    """Build an observer by name (``minmax``, ``moving_average``, ``avg``, ``percentile``, ``mse``,
    ``aciq``, ``kl``); ``options`` go to its constructor."""
    cls = OBSERVERS.get(method)
    if cls is None:
        raise NumericsError(f"unknown observer {method!r}; valid: {', '.join(sorted(OBSERVERS))}")
    try:
        return cls(axis=axis, **options)
    except TypeError as e:
        raise NumericsError(f"bad options for observer {method!r}: {e}") from None
