"""The requantization window of the fast backend: per channel, the accumulator range outside
which a monotone requantization saturates (:func:`requant_window`), found by a vectorised
k-ary search on the reference contract itself. Pure tensor math; used by
:class:`qpasses.numerics.fast_requant.RequantPlan`."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["requant_window"]


def _last_at_most(f: Callable[[Tensor], Tensor], targets: Sequence[int], lo: Tensor,
                  hi: Tensor, guess: tuple[Tensor, Tensor] | None = None,
                  ways: int = 8) -> tuple[Tensor, Tensor]:
    """Per channel ``c`` and target ``t``, the largest ``A`` in ``[lo[c], hi[c]]`` with
    ``f(A) <= t`` (``f`` monotone non-decreasing per channel) and whether one exists; both
    ``(C, T)``. A vectorised ``ways``-ary search: each round evaluates ``f`` once on ``ways − 1``
    points per channel and target, so a 2^32 range takes ~11 rounds, not the ~32 of bisection
    (a call costs a fixed ~0.6 ms plus its elements: 8 ways measured fastest). ``guess``
    (optional): float ``(C, T)`` bounds ``(low, high)`` of where each answer probably is; used
    where ``f`` confirms they bracket it (then a few rounds finish), the whole range elsewhere,
    so a wrong guess costs time, never exactness."""
    c, nt = lo.numel(), len(targets)
    tgt = torch.tensor(list(targets), dtype=torch.int64).view(1, nt, 1)

    def below(points: Tensor) -> Tensor:   # (C, T, K) -> f(points) <= target, per target
        k = points.shape[-1]
        return f(points.reshape(c, nt * k)).reshape(c, nt, k) <= tgt

    a = lo.view(c, 1).expand(c, nt).clone()
    b = hi.view(c, 1).expand(c, nt).clone()
    if guess is None:
        ends = below(torch.stack([a, b], dim=-1))
    else:
        fa, fb = a.to(torch.float64), b.to(torch.float64)
        ga, gb = (torch.minimum(torch.maximum(g.reshape(c, nt).nan_to_num(0.0), fa), fb)
                  for g in guess)
        ga, gb = ga.floor().to(torch.int64), gb.ceil().to(torch.int64)
        ends = below(torch.stack([a, b, ga, gb], dim=-1))
        brackets = ends[..., 2] & ~ends[..., 3]          # f(ga) <= target < f(gb)
        a, b = torch.where(brackets, ga, a), torch.where(brackets, gb, b)
    found, top = ends[..., 0], ends[..., 1]
    steps = torch.arange(1, ways, dtype=torch.int64)
    while True:                      # invariant where active: f(a) <= target < f(b)
        active = found & ~top & (b - a > 1)
        if not bool(active.any()):
            break
        # points a < p_1 <= ... <= p_{ways-1} < b; ok is True on a prefix (f is monotone)
        pts = a.unsqueeze(-1) + ((b - a).unsqueeze(-1) * steps) // ways
        ok = below(pts)
        n_ok = ok.sum(-1, keepdim=True)
        new_a = torch.where(n_ok > 0, pts.gather(-1, (n_ok - 1).clamp(min=0)),
                            a.unsqueeze(-1)).squeeze(-1)
        new_b = torch.where(n_ok < ways - 1, pts.gather(-1, n_ok.clamp(max=ways - 2)),
                            b.unsqueeze(-1)).squeeze(-1)
        a = torch.where(active, new_a, a)
        b = torch.where(active, new_b, b)
    return torch.where(top, hi.view(c, 1), a), found


def requant_window(f: Callable[[Tensor], Tensor], qmin: int, qmax: int, bound: int,
                   channels: int, slope: Tensor | None = None, offset: Tensor | None = None,
                   spread: Tensor | float = 1.0) -> tuple[Tensor, Tensor, bool]:
    """``(lo, hi, clamp)``: per-channel accumulator bounds such that for every ``|A| <= bound``
    ``clamp(f(A), qmin, qmax) == f(clamp(A, lo, hi))``, clamped again to ``[qmin, qmax]`` only if
    ``clamp`` (a monotone ``f`` that jumps over ``qmin`` or ``qmax``, i.e. a multiplier > 1).
    ``f`` maps accumulators of shape ``(channels, K)`` (channel ``c`` in row ``c``) to their
    requantized values; ``slope``/``offset``/``spread`` (per channel, optional) say
    ``f(A) = round(slope·A + offset + e)`` with ``|e| <= spread`` (the contract's rounding of
    an intermediate, in output units), which only speeds the search up: a right claim leaves a
    bracket of a few accumulator units around each answer, a wrong one costs time, never
    exactness.

    ``lo`` is the largest ``A`` with ``f(A) <= qmin`` (every smaller ``A`` saturates alike), ``hi``
    the smallest with ``f(A) >= qmax``. The window is what makes float arithmetic exact: inside it
    ``|A|`` is at most about ``(qmax − qmin + 2)/M``, whatever the accumulator bound.
    """
    lo_b = torch.full((channels,), -int(bound), dtype=torch.int64)
    hi_b = torch.full((channels,), int(bound), dtype=torch.int64)
    guess = None
    if slope is not None:
        sl = slope.to(torch.float64).reshape(-1).expand(channels)
        off = torch.zeros(()) if offset is None else torch.as_tensor(offset).to(torch.float64)
        want = torch.tensor([qmin + 0.5, qmax - 0.5], dtype=torch.float64)
        at = (want.view(1, 2) - off.reshape(-1, 1)) / sl.view(-1, 1)
        # e moves a crossing by up to spread/slope; then a few units and float64's rounding
        sp = torch.as_tensor(spread, dtype=torch.float64).reshape(-1, 1)
        slack = 3.0 + (sp + 2.0 ** -30) / sl.abs().view(-1, 1) + at.abs() * 2.0 ** -40
        guess = ((at - slack).clamp(-2.0 ** 62, 2.0 ** 62),
                 (at + slack).clamp(-2.0 ** 62, 2.0 ** 62))
    last, found = _last_at_most(f, (qmin, qmax - 1), lo_b, hi_b, guess)
    lo = torch.where(found[:, 0], last[:, 0], lo_b)
    hi = torch.where(found[:, 1], torch.minimum(last[:, 1] + 1, hi_b), lo_b)
    lo = torch.minimum(lo, hi)
    ends = f(torch.stack([lo, hi], dim=1))
    clamp = bool((ends[:, 0] < qmin).any()) or bool((ends[:, 1] > qmax).any())
    return lo, hi, clamp
