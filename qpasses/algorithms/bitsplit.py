"""Bit-split and stitching (Wang et al., "Towards Accurate Post-training Network Quantization via
Bit-split and Stitching", ICML 2020; docs/algorithms.md, "Bit-split"): pure tensor math.

Problem, per layer with weight ``W`` (M output channels x N = fan-in), calibration inputs
``X`` (K x N, im2col'd for convs) and targets ``Y`` (K x M, the float outputs minus the bias)::

    min_{alpha, Q}  || Y - X (diag(alpha) Q)^T ||_F^2,   Q[j] in [-(2^(B_j-1) - 1), 2^(B_j-1) - 1]

The objective only needs the sufficient statistics ``A = X^T X`` (N x N), ``C = Y^T X`` (M x N) and
``yy = ||Y_j||^2`` (M), so callers can accumulate them batch by batch and never hold ``X``:
``||Y_j - alpha_j X q_j||^2 = yy_j - 2 alpha_j <C_j, q_j> + alpha_j^2 q_j A q_j^T``.

Bookkeeping (MSB first, as the official code): with B bits there are ``P = B - 1`` ternary planes
``P_m in {-1, 0, 1}^(M x N)``, ``m = 0..B-2``, and ``Q = sum_m 2^(B-2-m) P_m`` (sign-magnitude, so
``|Q| <= 2^(B-1) - 1``: the symmetric *narrow* range; stitching never leaves it). Plane ``m``'s
scale is ``s_m = alpha * 2^(B-2-m)``.

One iteration = (a) the closed-form scale ``alpha_j = <C_j, q_j> / (q_j A q_j^T)`` (per channel, or
one scalar per layer: ``sum_j`` of numerators over ``sum_j`` of denominators; a zero denominator
keeps the previous alpha), then (b) for every plane, exact coordinate descent over the input index
``n`` (all channels in parallel): ``T = C - (alpha * Q_other) A``, set ``P_m[:, n] = 0``,
``g = 2 (s_m * (P_m A[:, n]) - T[:, n])``, ``P_m[j, n] = -sign(s_m g)`` iff ``|g| >= |s_m| A_nn``.
Every step is an exact minimiser, so the objective never increases. ``G_m = P_m A`` is kept current
per plane, so ``T`` needs no GEMM, and the coordinate loop runs speculatively in blocks with
row-restricted GEMM updates (:func:`_plane_sweep`; the sequential order and the result are exactly
those of the plain loop). Dense work per iteration: one ``Q A`` GEMM for the scale.

Initialisation: round-to-nearest at the best MSE clip of the weights (:func:`rtn_mse_clip`; the
official code starts from an FWA fit refined by a weight-only bit-split). Starting from this
baseline makes the result never worse than it. As a final safeguard against float round-off, channels
whose objective ended above their initial value (never in exact arithmetic) keep the initial
solution, so ``bitsplit`` is per channel never worse than its initialisation.

Per-kernel bits: channels are grouped by bit-width (a loop over the <= 32 distinct widths, not
over channels); 0-bit channels are all-zero codes with scale 1; 1-bit channels cannot be split
(ternary planes need B >= 2) and raise :class:`NumericsError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qpasses.errors import NumericsError

__all__ = ["BitSplitResult", "split_planes", "stitch_planes", "qmax_for", "rtn_mse_clip",
           "gram_stats", "channel_error", "bitsplit_solve", "bitsplit"]


@dataclass
class BitSplitResult:
    """``q``: integer codes (M x N, int64, each row inside its channel's narrow range);
    ``alpha``: positive per-channel scales (M,); ``init_error`` / ``error``: per-channel objective
    ``||Y_j - alpha_j X q_j||^2`` of the initialisation and of the result (``yy`` included when it
    was given, else up to that constant)."""
    q: Tensor
    alpha: Tensor
    init_error: Tensor
    error: Tensor

    @property
    def weight(self) -> Tensor:
        return self.alpha[:, None] * self.q.to(self.alpha.dtype)


def _bits_vector(bits: Any, m: int) -> Tensor:
    b = torch.as_tensor(bits, dtype=torch.int64).reshape(-1)
    if b.numel() == 1:
        b = b.expand(m)
    if b.numel() != m:
        raise NumericsError(f"bits has {b.numel()} entries for {m} output channels")
    if bool((b < 0).any()) or bool((b > 32).any()):
        raise NumericsError(f"bits must lie in 0..32, got {b.tolist()}")
    return b.clone()


def qmax_for(bits: Tensor) -> Tensor:
    """Largest code of the symmetric narrow range per channel (0 for 0-bit channels)."""
    b = bits.to(torch.int64)
    return torch.where(b > 0, (torch.ones_like(b) << (b - 1).clamp(min=0)) - 1, torch.zeros_like(b))


def split_planes(q: Tensor, bits: int) -> Tensor:
    """Split integer codes (|q| <= 2^(bits-1) - 1) into ``bits - 1`` ternary planes, MSB first:
    ``(bits-1, *q.shape)`` with values in {-1, 0, 1}; e.g. 4 bits: -5 -> (-1, 0, -1)."""
    if bits < 2:
        raise NumericsError(f"bit-split needs at least 2 bits (one ternary plane), got {bits}")
    q = q.to(torch.int64)
    lim = (1 << (bits - 1)) - 1
    if bool((q.abs() > lim).any()):
        raise NumericsError(f"codes outside +-{lim} cannot be split into {bits - 1} planes")
    sign, mag = torch.sign(q), q.abs()
    planes = []
    for _ in range(bits - 1):
        planes.append(sign * (mag & 1))
        mag = mag >> 1
    return torch.stack(planes[::-1])


def stitch_planes(planes: Tensor) -> Tensor:
    """Inverse of :func:`split_planes`: ``sum_m 2^(P-1-m) planes[m]`` (MSB first)."""
    p = planes.shape[0]
    w = torch.tensor([float(1 << (p - 1 - m)) for m in range(p)], dtype=torch.float64)
    out = (planes.to(torch.float64) * w.reshape(-1, *([1] * (planes.dim() - 1)))).sum(0)
    return out.round().to(torch.int64)


def rtn_mse_clip(w: Tensor, bits: Any, grid: int = 20, refine: int = 10,
                 max_elements: int = 1 << 24) -> tuple[Tensor, Tensor]:
    """Round-to-nearest at the best MSE clip, per output channel (the baseline and the init).

    For clip ratios ``r``: ``alpha_j = r max|w_j| / qmax_j``, ``q = clamp(rne(w / alpha), +-qmax_j)``,
    keep the ``r`` minimising ``||w_j - alpha_j q_j||^2`` (ties: the widest clip). The search is
    coarse to fine: ``r = k/grid`` (k = 1..grid), then ``refine`` steps of ``1/(grid*refine)`` on
    each side of the best coarse ratio (per channel), i.e. a ``1/(grid*refine)`` = 0.005 grid
    around the optimum at 41 evaluations instead of 200. ``w``: (M, ...) weights, flattened to
    (M, N). Returns int64 codes (M, N) and scales (M,) in ``w``'s float dtype (0-bit channels:
    codes 0, scale 1).
    """
    w2 = w.detach().reshape(w.shape[0], -1)
    m, n = w2.shape
    b = _bits_vector(bits, m).to(w2.device)
    qmax = qmax_for(b).to(w2.dtype)
    amax = w2.abs().amax(1)
    safe_q = torch.where(qmax > 0, qmax, torch.ones_like(qmax))
    base = torch.where((amax > 0) & (qmax > 0), amax / safe_q, torch.ones_like(amax))
    best_err = torch.full((m,), float("inf"), dtype=w2.dtype, device=w2.device)
    best_r = torch.ones(m, dtype=w2.dtype, device=w2.device)
    chunk = max(1, max_elements // max(1, m * n))

    def search(ratios: Tensor) -> None:  # ratios (R, M), widest first
        nonlocal best_err, best_r
        for start in range(0, ratios.shape[0], chunk):
            r = ratios[start:start + chunk]
            alpha = r * base[None, :]                                             # (R, M)
            q = torch.round(w2[None] / alpha[:, :, None])
            q = torch.maximum(torch.minimum(q, qmax[None, :, None]), -qmax[None, :, None])
            err = ((w2[None] - alpha[:, :, None] * q) ** 2).sum(-1)               # (R, M)
            e_min, i_min = err.min(0)
            better = e_min < best_err
            best_err = torch.where(better, e_min, best_err)
            best_r = torch.where(better, r.gather(0, i_min[None])[0], best_r)

    coarse = torch.arange(grid, 0, -1, dtype=w2.dtype, device=w2.device) / grid
    search(coarse[:, None].expand(grid, m))
    if refine > 0:
        step = torch.arange(refine, -refine - 1, -1, dtype=w2.dtype,
                            device=w2.device) / (grid * refine)
        fine = (best_r[None, :] + step[:, None]).clamp(min=1.0 / (grid * refine), max=1.0)
        search(fine)
    alpha = best_r * base
    q = torch.round(w2 / alpha[:, None])
    q = torch.maximum(torch.minimum(q, qmax[:, None]), -qmax[:, None])
    return q.to(torch.int64), alpha


def gram_stats(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(A, C, yy) = (X^T X, Y^T X, ||Y_j||^2)`` for X (K, N) and Y (K, M), in float64."""
    x, y = x.double(), y.double()
    return x.T @ x, y.T @ x, (y * y).sum(0)


def channel_error(A: Tensor, C: Tensor, w_hat: Tensor, yy: Tensor | None = None) -> Tensor:
    """Per-channel ``||Y_j - X w_hat_j||^2`` from the statistics (without ``yy``: up to it)."""
    w_hat = w_hat.to(A.dtype).reshape(C.shape)
    e = ((w_hat @ A) * w_hat).sum(1) - 2 * (C * w_hat).sum(1)
    return e if yy is None else e + yy.to(e.dtype)


def _plane_sweep(p: Tensor, g_m: Tensor, t: Tensor, s: Tensor, diag: Tensor, A: Tensor,
                 block: int) -> int:
    """Exact sequential coordinate descent over the columns of one plane, all channels at once, in
    place. ``g_m = p @ A`` is kept current: after each block of columns, one GEMM restricted to
    the channels that changed (``G[rows] += D[rows] @ A[block, :]``), so converged channels and
    blocks cost nothing. Inside a block the columns are evaluated *speculatively*: decisions for
    all remaining columns are computed from the current state (block-start ``G`` plus the pending
    in-block changes ``D @ A[block, block]``); up to the first column where some channel changes
    they equal the sequential ones (nothing changed before them), that column's change is
    recorded and the scan resumes right after it. Returns the number of changed columns.
    """
    n = p.shape[1]
    s_col, s_abs = s[:, None], s.abs()[:, None]
    changes = 0
    for n0 in range(0, n, block):
        n1 = min(n, n0 + block)
        p_old = p[:, n0:n1].clone()
        a_blk = A[n0:n1, n0:n1]
        dg = diag[n0:n1]
        base, t_blk = g_m[:, n0:n1], t[:, n0:n1]
        d = torch.zeros_like(p_old)
        i, any_change, width = 0, False, 8
        nb = n1 - n0
        while i < nb:
            j = min(nb, i + width)
            p_cur = p_old[:, i:j] + d[:, i:j]
            gpa = base[:, i:j] + (d @ a_blk[:, i:j] if any_change else 0.0) - p_cur * dg[i:j]
            g = 2.0 * (s_col * gpa - t_blk[:, i:j])
            keep = (g.abs() >= s_abs * dg[i:j]) & (dg[i:j] > 0)
            pn = torch.where(keep, -torch.sign(s_col * g), torch.zeros_like(g))
            hit = torch.nonzero((pn != p_cur).any(0))
            if hit.numel() == 0:       # no change in the window: skip it, look further next time
                i, width = j, width * 2
                continue
            k = int(hit[0, 0])
            d[:, i + k] = pn[:, k] - p_old[:, i + k]
            any_change = True
            changes += 1
            i += k + 1
            width = max(1, 2 * (k + 1))  # dense changes: short windows (cheap evaluations)
        if any_change:
            p[:, n0:n1] = p_old + d
            rows = torch.nonzero(d.any(1))[:, 0]
            g_m[rows] += d[rows] @ A[n0:n1]
    return changes


def _alpha_update(A: Tensor, C: Tensor, q: Tensor, alpha: Tensor, per_channel: bool) -> Tensor:
    qa = q @ A  # (one GEMM per iteration; the plane sweeps need none)
    den = (qa * q).sum(1)
    num = (C * q).sum(1)
    if per_channel:
        ok = den > 0
        return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), alpha)
    d, nm = den.sum(), num.sum()
    if float(d) > 0:
        return torch.full_like(alpha, float(nm / d))
    return alpha


def bitsplit_solve(A: Tensor, C: Tensor, bits: Any, *, iters: int = 20, per_channel: bool = True,
                   init: tuple[Tensor, Tensor] | None = None, w: Tensor | None = None,
                   yy: Tensor | None = None, block: int = 64,
                   dtype: torch.dtype = torch.float64,
                   num_threads: int | None = 1) -> BitSplitResult:
    """Bit-split response reconstruction from the statistics ``A`` (N x N), ``C`` (M x N).

    ``bits``: one int or one per output channel (>= 2, or 0 for pruned channels). ``init``:
    ``(q, alpha)`` to start from; else round-to-nearest at the best MSE clip of ``w`` (required
    then). ``per_channel=False``: one scale shared by all channels. ``iters``: alpha + plane
    sweeps (the official code runs 100). Vectorised over output channels; loops run over bit-width
    groups, planes and coordinate blocks only. ``num_threads``: torch threads while solving (1 by
    default: the sequential coordinate steps are tiny ops that only lose to thread contention on
    a shared machine; None keeps the current setting).
    """
    if num_threads is None:
        return _solve(A, C, bits, iters, per_channel, init, w, yy, block, dtype)
    saved = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return _solve(A, C, bits, iters, per_channel, init, w, yy, block, dtype)
    finally:
        torch.set_num_threads(saved)


def _solve(A: Tensor, C: Tensor, bits: Any, iters: int, per_channel: bool,
           init: tuple[Tensor, Tensor] | None, w: Tensor | None, yy: Tensor | None, block: int,
           dtype: torch.dtype) -> BitSplitResult:
    if iters < 0:
        raise NumericsError(f"iters must be >= 0, got {iters}")
    A = A.to(dtype)
    C = C.to(dtype)
    m, n = C.shape
    if A.shape != (n, n):
        raise NumericsError(f"A must be {n}x{n} to match C {tuple(C.shape)}, got {tuple(A.shape)}")
    b = _bits_vector(bits, m)
    if bool((b == 1).any()):
        raise NumericsError("bit-split needs at least 2 bits per kernel (ternary planes); got "
                            f"1-bit kernels at output channels {torch.nonzero(b == 1)[:5, 0].tolist()}")
    if init is None:
        if w is None:
            raise NumericsError("bitsplit_solve needs init=(q, alpha) or the float weight w")
        q0, a0 = rtn_mse_clip(w.reshape(m, -1).to(dtype), b)
    else:
        q0, a0 = init
    q0 = q0.reshape(m, n).to(torch.int64)
    a0 = a0.reshape(-1).to(dtype).expand(m).clone()
    if not per_channel:
        a0 = torch.full_like(a0, float(a0[b > 0].mean()) if bool((b > 0).any()) else 1.0)
    qmax = qmax_for(b)
    if bool((q0.abs() > qmax[:, None]).any()):
        raise NumericsError("init codes outside the channels' symmetric narrow ranges")
    alpha = a0.clone()
    init_err = channel_error(A, C, alpha[:, None] * q0.to(dtype), yy)
    groups = [(int(v), torch.nonzero(b == v)[:, 0]) for v in torch.unique(b).tolist() if v >= 2]
    planes = {bv: split_planes(q0[idx], bv).to(dtype) for bv, idx in groups}
    q = q0.to(dtype)
    diag = torch.diagonal(A).clone()
    pweights = {bv: torch.tensor([float(1 << (bv - 2 - k)) for k in range(bv - 1)],
                                 dtype=dtype).reshape(-1, 1, 1) for bv, _ in groups}
    gmats = {bv: planes[bv] @ A for bv, _ in groups} if iters > 0 else {}  # (P, Mg, N) = P_m A
    for _ in range(iters):
        alpha = _alpha_update(A, C, q, alpha, per_channel)
        for bv, idx in groups:
            pl, gm_, wv = planes[bv], gmats[bv], pweights[bv]
            a_g, c_g = alpha[idx], C[idx]
            for mi in range(bv - 1):
                wgt = float(wv[mi])
                qa_other = (gm_ * wv).sum(0) - wgt * gm_[mi]          # Q_other A
                t = c_g - a_g[:, None] * qa_other
                _plane_sweep(pl[mi], gm_[mi], t, a_g * wgt, diag, A, block)
            q[idx] = (pl * wv).sum(0)
    if iters > 0:  # the planes changed after the last scale update: refit it
        alpha = _alpha_update(A, C, q, alpha, per_channel)
    q_int = q.round().to(torch.int64)
    # positive scales (flip the codes with the sign), dead channels keep their init scale
    neg = alpha < 0
    q_int = torch.where(neg[:, None], -q_int, q_int)
    alpha = alpha.abs()
    dead = ~(alpha > 0) | ~torch.isfinite(alpha)
    alpha = torch.where(dead, a0.abs().clamp(min=1e-12), alpha)
    q_int = torch.where(dead[:, None], torch.zeros_like(q_int), q_int)
    zero = b == 0
    q_int[zero] = 0
    alpha = torch.where(zero, torch.ones_like(alpha), alpha)
    err = channel_error(A, C, alpha[:, None] * q_int.to(dtype), yy)
    worse = err > init_err   # float round-off safeguard (exact arithmetic never gets here)
    if not per_channel:      # one shared scale: all channels or none
        worse = torch.full_like(worse, bool(err.sum() > init_err.sum()))
    if bool(worse.any()):
        q_int = torch.where(worse[:, None], q0, q_int)
        alpha = torch.where(worse, a0, alpha)
        err = torch.where(worse, init_err, err)
    return BitSplitResult(q_int, alpha, init_err, err)


def bitsplit(x: Tensor, y: Tensor, w: Tensor, bits: Any, **kwargs: Any) -> BitSplitResult:
    """Convenience: :func:`bitsplit_solve` from raw samples ``x`` (K, N) and targets ``y`` (K, M),
    initialised from round-to-nearest at the best MSE clip of ``w`` (M, N)."""
    A, C, yy = gram_stats(x, y)
    return bitsplit_solve(A, C, bits, w=w.reshape(w.shape[0], -1).double(), yy=yy, **kwargs)
