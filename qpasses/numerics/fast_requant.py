"""The fast integer-simulation backend's arithmetic: exact requantization and code tables.

Pure tensor math (no graph code), used by the ``fast`` backend of the integer-simulation modules
(``qpasses.modules.int_sim``) and by :mod:`qpasses.numerics.int_conv_fast`:

* :class:`PreparedRequant` / :func:`requantize_prepared` / :func:`requantize_fast` — the integer
  requantization contracts (``gemmlowp``, ``single``, ``hawq``; docs/int-sim.md, "Integer
  arithmetic") in a few int64 tensor passes; :func:`requantize_float_fast` for float scales;
* :func:`code_dtype` (the narrowest dtype of a code range), :class:`RequantPlan` (exact
  requantization of int32 / exact-float accumulators in a few float passes, see its docstring for
  the proofs), :class:`AffineFloor` (a float32 requantization of narrow codes, verified on every
  code), :func:`lut_gather` / :func:`lut_gather2` (tables indexed by one or two narrow code
  tensors), :func:`max_pool_codes`, and :func:`workspace` (reused scratch buffers).
"""
from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from qpasses.errors import NumericsError
from qpasses.numerics.layout import memory_order_dims
from qpasses.numerics.requant_window import requant_window

__all__ = ["AffineFloor", "CHUNK_ELEMS", "PreparedRequant", "RequantPlan", "code_dtype",
           "dense_flat", "lut_gather", "lut_gather2", "max_pool_codes", "requant_window",
           "requantize_fast", "requantize_float_fast", "requantize_prepared", "scratch_like",
           "workspace"]


class PreparedRequant:
    """Constants of :func:`requantize_prepared` for one (multiplier, shift, zero point) set,
    shaped to broadcast against the accumulators (computed once per module and shape)."""

    def __init__(self, multiplier: Tensor, shift: Tensor, zero_point: int, rounding: str,
                 multiplier_bits: int = 31) -> None:
        if rounding not in ("gemmlowp", "single", "hawq"):
            raise NumericsError(f"requantize_fast handles the integer contracts, not "
                                f"{rounding!r}")
        bits = multiplier_bits
        self.rounding, self.zero_point = rounding, int(zero_point)
        one = torch.ones_like(shift)
        if rounding == "gemmlowp":
            left = shift.clamp(min=0)
            right = (-shift).clamp(min=0)
            self.left = left if bool((left > 0).any()) else None
            self.m = multiplier << (31 - bits)
            self.right = right
            self.any_right = bool((right > 0).any())
            self.all_right = bool((right > 0).all())
            self.right_pos = right > 0
            # the output zero point folds into the rounding nudge: (h + ν + z·2^r) >> r
            self.nudge = (torch.bitwise_left_shift(one, right) >> 1) + \
                torch.bitwise_left_shift(one * self.zero_point, right)
        else:
            t = bits - shift
            self.neg_t = (-t).clamp(min=0) if bool((t < 0).any()) else None
            t = t.clamp(min=0)
            self.m, self.t = multiplier, t
            self.t_pos = t > 0
            self.half = torch.bitwise_left_shift(one, t) >> 1   # t may be 62: no z folded


def requantize_prepared(acc: Tensor, p: PreparedRequant, qmin: int, qmax: int,
                        inplace: bool = False) -> Tensor:
    """:func:`requantize_fast` with precomputed constants and in-place passes (``inplace``: the
    caller owns ``acc``, e.g. a fresh accumulator)."""
    if p.rounding == "gemmlowp":
        x = acc if p.left is None else torch.bitwise_left_shift(acc, p.left)
        h = x.mul_(p.m) if (inplace and p.left is None) else x * p.m
        h += 1 << 30
        h.bitwise_right_shift_(31)                              # SRDHM
        if p.any_right:
            neg = h < 0
            if not p.all_right:
                neg &= p.right_pos
            h += p.nudge
            h -= neg.to(h.dtype)
            h.bitwise_right_shift_(p.right)                     # RDBPOT (rha), + z folded in
        else:
            h += p.nudge
        return h.clamp_(qmin, qmax)
    q = acc.mul_(p.m) if inplace else acc * p.m
    if p.neg_t is not None:
        q = torch.bitwise_left_shift(q, p.neg_t)
    if p.rounding == "single":
        q += p.half
        q.bitwise_right_shift_(p.t)
    else:
        odd = torch.bitwise_right_shift(q, p.t) & 1
        odd &= p.t_pos
        q += p.half
        q -= p.t_pos.to(q.dtype)
        q += odd
        q.bitwise_right_shift_(p.t)
    if p.zero_point:
        q += p.zero_point
    return q.clamp_(qmin, qmax)


def requantize_fast(acc: Tensor, multiplier: Tensor, shift: Tensor, zero_point: int, qmin: int,
                    qmax: int, rounding: str, multiplier_bits: int = 31) -> Tensor:
    """:func:`fixed_point.requantize` for the integer contracts in a few fused int64 ops.

    Same integers bit for bit, without the runtime checks: the caller must have *proven* that
    ``acc`` lies in int32 and, for ``gemmlowp``, that ``acc·2^max(shift, 0)`` does too (the
    lowering proves both from the accumulator bound). ``multiplier``/``shift`` are int64 scalars or
    tensors already shaped to broadcast against ``acc``. Formulas (t = bits − shift):

    * ``single``: ``(acc·m + ⌊2^t/2⌋) >> t`` (round half up);
    * ``hawq``: ``(acc·m + 2^(t−1) − 1 + ((acc·m >> t) & 1)) >> t`` (round half to even);
    * ``gemmlowp``: ``h = (acc·2^l · m·2^(31−bits) + 2^30) >> 31`` (SRDHM), then
      ``(h + ⌊2^r/2⌋ − [h < 0 ∧ r > 0]) >> r`` (round half away from zero), ``l``/``r`` the left/right
      parts of the shift.

    For gemmlowp the output zero point is added before the final shift (``+ z·2^r``, exact and
    within int64 since r <= 31).
    """
    return requantize_prepared(acc, PreparedRequant(multiplier, shift, zero_point, rounding,
                                                    multiplier_bits), qmin, qmax)


def requantize_float_fast(acc: Tensor, scale: Tensor, zero_point: int, qmin: int, qmax: int,
                          bias: Tensor | None = None) -> Tensor:
    """:func:`fixed_point.requantize_float` (fbgemm float-rne) without the runtime checks, same
    operations and order: ``clamp(rne(float32(acc) [+ bias]) · scale) + z)``; ``scale``/``bias``
    float32, shaped to broadcast against ``acc``."""
    xf = acc.to(torch.float32)
    if bias is not None:
        xf = xf + bias
    y = torch.round(xf * scale).clamp_(-2.0 ** 40, 2.0 ** 40).to(torch.int64)
    y += zero_point
    return y.clamp_(qmin, qmax)


# ------------------------------------------------------------------------------------------------
# the fast backend: narrow code dtypes, exact float requantization, tables

_CODE_DTYPES = ((torch.uint8, 0, 255), (torch.int8, -128, 127),
                (torch.int16, -2 ** 15, 2 ** 15 - 1), (torch.int32, -2 ** 31, 2 ** 31 - 1))

# Elements per pass of RequantPlan.apply and per GEMM block: the float64 scratch (2 MiB) stays in
# cache between passes.
CHUNK_ELEMS = 2 ** 18
_F64_EXACT = 2 ** 53


_WORKSPACE = threading.local()


def workspace(name: str, numel: int, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> Tensor:
    """A reused 1-D scratch buffer of at least ``numel`` elements (one per name, dtype, device and
    thread; contents undefined). Large fresh tensors cost page faults on every allocation, which
    on CPU is slower than the arithmetic done in them; the fast backend's temporaries live here."""
    bufs = _WORKSPACE.__dict__.setdefault("bufs", {})
    key = (name, dtype, str(device))
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(max(numel, 1), dtype=dtype, device=device)
    return buf[:numel]


def scratch_like(name: str, like: Tensor, dtype: torch.dtype) -> Tensor:
    """A :func:`workspace` tensor with ``like``'s shape and (for a dense ``like``) memory order."""
    perm = memory_order_dims(like)
    buf = workspace(name, like.numel(), dtype, like.device)
    return buf.view([like.shape[d] for d in perm]).permute([perm.index(d)
                                                           for d in range(like.dim())])


def code_dtype(qmin: int, qmax: int) -> torch.dtype:
    """The narrowest integer dtype holding every code of ``[qmin, qmax]`` (uint8 .. int64)."""
    for dt, lo, hi in _CODE_DTYPES:
        if lo <= qmin and qmax <= hi:
            return dt
    return torch.int64


def _vec(t: Tensor | None, n: int, dtype: torch.dtype) -> Tensor | None:
    if t is None:
        return None
    t = torch.as_tensor(t).reshape(-1).to(dtype)
    return t.expand(n).clone() if t.numel() == 1 else t


class RequantPlan:
    """Exact requantization of accumulators in a few fast passes: for ``A = acc·2^pre_shift +
    pre_add[c]`` (``acc`` int32, or float holding exact integers; ``pre_add`` int64 per channel),
    ``out = clamp(z + contract(A), qmin, qmax)`` bit for bit as ``fixed_point.requantize`` /
    ``requantize_float``, for every ``|A| <= bound`` (the caller's proof).

    How it stays exact:

    1. ``A`` is first clamped to the window of :func:`requant_window` (found by binary search on
       the reference contract itself), which changes no output and bounds ``|A|`` by about
       ``(qmax − qmin + 2)/M``.
    2. ``float-rne`` *is* float32 arithmetic: ``float32(A)`` (one rounding of the exact integer),
       ``+ bias``, ``· scale``, ``round`` — the reference's operations in its order.
    3. Integer contracts in float64, each a single ``floor`` / ``round`` of a sum of exact terms.
       With ``l``/``r`` the left/right parts of the shift, ``M0`` the Q31 multiplier and
       ``S = M0·2^(l−31−r)``, gemmlowp's SRDHM then RoundingDivideByPOT equals
       ``floor(A·S + 1/2 + [r>0]·2^-(r+1) − [A<0]·[r>0]·2^-r) + z`` (the two floors merge because
       ``floor(floor(u)/2^r + c) = floor((u + c·2^r)/2^r)`` for integer ``c·2^r``; SRDHM's result is
       negative exactly when ``A < 0``, or it is 0, where both branches give 0). ``single`` is
       ``floor(A·m·2^-t + 1/2) + z`` and ``hawq`` ``round(A·m·2^-t) + z`` (t = bits − shift).
       Every term is a multiple of ``2^-(31+r)`` (``2^-t``) below ``2^53`` of those units on the
       window (with ``z`` and the −128 of a uint8 store folded in) — checked per layer — so every
       float64 operation is exact. Where the check fails (multipliers below ~2^-14) the plan runs
       the int64 formulas.
    4. ``A`` itself is formed in int32 in place when ``acc`` is an int32 tensor the caller hands
       over and ``pre_add`` fits int32 (the sum is the true accumulator, inside int32 by the
       bound, so the int32 addition cannot wrap), else exactly in float64 (|A| < 2^53).
    """

    def __init__(self, rounding: str, *, multiplier: Tensor, shift: Tensor, zero_point: int,
                 qmin: int, qmax: int, bound: int, multiplier_bits: int = 31,
                 scale_f32: Tensor | None = None, bias_f: Tensor | None = None,
                 pre_shift: int = 0, pre_add: Tensor | int | None = None) -> None:
        from qpasses.numerics.fixed_point import INT32_MAX, INT32_MIN, requantize, requantize_float
        if rounding not in ("gemmlowp", "single", "hawq", "float-rne"):
            raise NumericsError(f"RequantPlan: unknown rounding contract {rounding!r}")
        n = max(t.numel() for t in (multiplier, shift, scale_f32, bias_f,
                                    None if not isinstance(pre_add, Tensor) else pre_add)
                if t is not None)
        self.rounding, self.channels = rounding, n
        self.zero_point, self.qmin, self.qmax = int(zero_point), int(qmin), int(qmax)
        self.bits, self.bound = int(multiplier_bits), int(bound)
        m = _vec(multiplier, n, torch.int64)
        s = _vec(shift, n, torch.int64)
        sf = _vec(scale_f32, n, torch.float32) if scale_f32 is not None else None
        bf = _vec(bias_f, n, torch.float32)
        z = self.zero_point
        if rounding == "float-rne":
            if sf is None:
                raise NumericsError("RequantPlan: float-rne needs scale_f32")

            def f(a: Tensor) -> Tensor:
                return requantize_float(a, sf, z, INT32_MIN, INT32_MAX, axis=0, bias=bf)
        else:
            def f(a: Tensor) -> Tensor:
                return requantize(a, m, s, z, INT32_MIN, INT32_MAX, rounding, axis=0,
                                  multiplier_bits=multiplier_bits)
        # f(A) = round(slope·A + offset + e): a guess for the window search. gemmlowp's first
        # rounding (SRDHM) moves the value by up to 2^-(r+1) before the rounding shift by r;
        # single/hawq round once (hawq's ties to even: within the search's slack); float-rne
        # rounds A to float32 and the product once, far below 2^-10 of an output unit here
        if rounding == "float-rne":
            slope = sf.to(torch.float64)
            offset = z + (0.0 if bf is None else bf.to(torch.float64) * slope)
            spread = torch.full((n,), 2.0 ** -10, dtype=torch.float64)
        else:
            slope, offset = torch.ldexp(m.to(torch.float64), s - self.bits), torch.tensor(z)
            spread = torch.ldexp(torch.ones(n, dtype=torch.float64), -(-s).clamp(min=0) - 1) \
                if rounding == "gemmlowp" else torch.zeros(n, dtype=torch.float64)
        lo, hi, self.clamp = requant_window(f, self.qmin, self.qmax, self.bound, n, slope,
                                            offset, spread)
        add = _vec(pre_add, n, torch.int64) if pre_add is not None else None
        self.pre_shift, self.window = int(pre_shift), (lo, hi, add)   # int64 (A-space) window
        vecs: dict[str, Tensor] = {"lo": lo.to(torch.float64), "hi": hi.to(torch.float64)}
        if add is not None and bool((add != 0).any()):
            vecs["add"] = add.to(torch.float64)
        self.int32_ok = self.pre_shift == 0 and (add is None or bool(
            ((add >= INT32_MIN) & (add <= INT32_MAX)).all()))
        if self.int32_ok:
            vecs["lo32"], vecs["hi32"] = lo.to(torch.int32), hi.to(torch.int32)
            if "add" in vecs:
                vecs["add32"] = add.to(torch.int32)  # type: ignore[union-attr]
        self.neg = False
        aw = torch.maximum(lo.abs(), hi.abs()).tolist()
        if rounding == "float-rne":
            self.mode = "float32"
            vecs["scale"] = sf
            if bf is not None:
                vecs["bias"] = bf
        elif rounding == "gemmlowp":
            left, right = s.clamp(min=0), (-s).clamp(min=0)
            m0 = m << (31 - self.bits)
            # + the output zero point and the −128 of a uint8 store (see _chunk)
            exact = all(a * mm * 2 ** li + (abs(z) + 130) * 2 ** (31 + ri) < _F64_EXACT
                        for a, mm, li, ri in zip(aw, m0.tolist(), left.tolist(), right.tolist()))
            vecs["S"] = torch.ldexp(m0.to(torch.float64), left - 31 - right)
            pos = right > 0
            vecs["C"] = 0.5 + z + torch.where(pos, torch.ldexp(torch.ones(n, dtype=torch.float64),
                                                               -right - 1), 0.0)
            vecs["R"] = torch.where(pos, torch.ldexp(torch.ones(n, dtype=torch.float64), -right),
                                    0.0)
            self.neg = bool((pos & (lo < 0)).any())
            self.mode = "float64" if exact else "int64"
        else:
            t = self.bits - s
            lt, rt = (-t).clamp(min=0).tolist(), t.clamp(min=0).tolist()
            extra = (abs(z) + 129) if rounding == "single" else 0
            exact = all(a * mm * 2 ** li + extra * 2 ** ri < _F64_EXACT
                        for a, mm, li, ri in zip(aw, m.tolist(), lt, rt))
            vecs["S"] = torch.ldexp(m.to(torch.float64), -t)
            if rounding == "single":
                vecs["C"] = torch.full((n,), 0.5 + z, dtype=torch.float64)
            self.mode = "float64" if exact else "int64"
        if self.mode == "int64":
            self._ms = (m, s)
            if add is not None:
                vecs["add64"] = add
        self.vecs = vecs
        self._views: dict[tuple[int, int], dict[str, Tensor | float | int]] = {}

    def _shaped(self, dim: int, axis: int) -> dict[str, Tensor | float | int]:
        """The per-channel vectors shaped to broadcast along ``axis`` of a ``dim``-d tensor
        (Python numbers when they are the same for every channel: cheaper to dispatch)."""
        key = (dim, axis % dim if dim else 0)
        views = self._views.get(key)
        if views is None:
            views = {}
            shape = [1] * dim
            if dim:
                shape[key[1]] = self.channels
            uniform = {k: bool((v == v[0]).all()) for k, v in self.vecs.items()}
            for a, b in (("lo", "hi"), ("lo32", "hi32")):   # clamp takes two numbers or tensors
                if a in uniform:
                    uniform[a] = uniform[b] = uniform[a] and uniform[b]
            for name, v in self.vecs.items():
                views[name] = v[0].item() if uniform[name] else v.reshape(shape)
            if "C" in views:
                views["Cu"] = views["C"] - 128
            if self.mode == "int64":
                m, s = self._ms
                views["prep"] = PreparedRequant(m.reshape(shape), s.reshape(shape),
                                                self.zero_point, self.rounding, self.bits)
            self._views[key] = views
        return views

    def apply(self, acc: Tensor, out: Tensor, *, axis: int = -1, owned: bool = False) -> Tensor:
        """Write the requantized ``acc`` (channels along ``axis``) into ``out`` (same shape, an
        integer dtype holding ``[qmin, qmax]``), in chunks along dim 0; ``owned``: ``acc`` may be
        overwritten (an int32 accumulator the caller just computed)."""
        if acc.shape != out.shape:
            raise NumericsError(f"RequantPlan: acc {tuple(acc.shape)} vs out {tuple(out.shape)}")
        if self.channels > 1 and acc.shape[axis] != self.channels:
            raise NumericsError(f"RequantPlan: {self.channels} channels, acc dim {axis} has "
                                f"{acc.shape[axis]}")
        v = self._shaped(acc.dim(), axis)
        if acc.dim() == 0 or (axis % acc.dim() == 0 and self.channels > 1):
            self._chunk(acc, out, v, owned)
            return out
        step = max(1, CHUNK_ELEMS // max(1, acc[0].numel()))
        for i in range(0, acc.shape[0], step):
            self._chunk(acc[i:i + step], out[i:i + step], v, owned)
        return out

    def _chunk(self, a: Tensor, o: Tensor, v: dict[str, Any], owned: bool) -> None:
        if self.mode == "int64":
            x = a.round().to(torch.int64) if a.is_floating_point() else \
                a.to(torch.int64, copy=not owned)
            if self.pre_shift:
                x = x << self.pre_shift
            if "add64" in v:
                x += v["add64"]
            o.copy_(requantize_prepared(x, v["prep"], self.qmin, self.qmax, inplace=True))
            return
        if owned and a.dtype == torch.int32 and self.int32_ok:
            if "add32" in v:
                a.add_(v["add32"])
            a.clamp_(v["lo32"], v["hi32"])      # the exact window (1.)
            y = None
        else:
            y = scratch_like("requant-f64", a, torch.float64)
            y.copy_(a)
            if self.pre_shift:
                y.mul_(2.0 ** self.pre_shift)
            if "add" in v:
                y.add_(v["add"])
            y.clamp_(v["lo"], v["hi"])
        z = self.zero_point
        # uint8 codes are written as int8 (y − 128) and flipped back (torch converts float to
        # int8 ~3x faster than to uint8)
        off = 128 if o.dtype == torch.uint8 else 0
        if self.mode == "float32":             # (2.) fbgemm's float32 operations, in order
            y32 = scratch_like("requant-f32", a, torch.float32)
            y32.copy_(a if y is None else y)
            if "bias" in v:
                y32.add_(v["bias"])
            y32.mul_(v["scale"]).round_()
            if self.clamp:
                y32.clamp_(self.qmin - z, self.qmax - z)
            if z - off:
                y32.add_(z - off)
            self._store(y32, o, off)
            return
        if y is None:
            y = scratch_like("requant-f64", a, torch.float64)
            y.copy_(a)
        c = v.get("Cu") if off else v.get("C")
        if self.rounding == "gemmlowp":        # (3.) one floor of exact terms
            t = None
            if self.neg:                       # −[A<0]·2^-r, from clamp(A, −1, 0) ∈ {−1, 0}
                t = torch.clamp(y, -1, 0, out=scratch_like("requant-neg", a, torch.float64))
                t.mul_(v["R"])
            _mul_add(y, v["S"], c)
            if t is not None:
                y.add_(t)
            y.floor_()
        elif self.rounding == "single":
            _mul_add(y, v["S"], c).floor_()
        else:
            y.mul_(v["S"]).round_()
            if z - off:
                y.add_(z - off)
        if self.clamp:
            y.clamp_(self.qmin - off, self.qmax - off)
        self._store(y, o, off)

    @staticmethod
    def _store(y: Tensor, o: Tensor, off: int) -> None:
        if off:
            o.view(torch.int8).copy_(y)
            o.bitwise_xor_(off)
        else:
            o.copy_(y)


def _mul_add(y: Tensor, s: Tensor | float, c: Tensor | float) -> Tensor:
    """``y = y·s + c`` in place (one fused pass when the constants are per channel; exact here
    either way: the product and the sum are representable)."""
    if isinstance(s, Tensor) and isinstance(c, Tensor):
        return torch.addcmul(c, y, s, out=y)
    return y.mul_(s).add_(c)


def dense_flat(t: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """A 1-D view of ``t`` in memory order (a copy only if ``t`` is not a permutation of a
    contiguous tensor) and the function that puts a same-order result back into ``t``'s shape."""
    perm = memory_order_dims(t)
    tp = t.permute(perm)
    if not tp.is_contiguous():
        tp = tp.contiguous()
    inv = [perm.index(d) for d in range(t.dim())]
    shape = tp.shape
    return tp.reshape(-1), lambda r: r.view(shape).permute(inv)


def lut_gather(table: Tensor, q: Tensor, base: int) -> Tensor:
    """``table[q − base]`` for integer codes ``q`` of any dtype and layout (same layout out);
    an index outside the table raises :class:`NumericsError`."""
    idx = q.to(torch.int32, copy=True)
    if base:
        idx -= base
    return _gather(table, idx)


def lut_gather2(table: Tensor, a: Tensor, a_base: int, b: Tensor, b_base: int,
                width: int) -> Tensor:
    """``table[(a − a_base)·width + (b − b_base)]``: a function of two narrow code tensors."""
    idx = a.to(torch.int32, copy=True)
    idx -= a_base
    idx *= width
    idx += b.to(torch.int32)
    if b_base:
        idx -= b_base
    return _gather(table, idx)


def _gather(table: Tensor, idx: Tensor) -> Tensor:
    flat, back = dense_flat(idx)
    try:
        return back(torch.index_select(table, 0, flat))
    except (IndexError, RuntimeError) as e:
        raise NumericsError(f"lookup table of {table.numel()} entries: an input code lies "
                            f"outside the range it was built for ({e})") from None


class AffineFloor:
    """``clamp(floor(float32(q)·S + C), qmin, qmax)`` with float32 ``S``, ``C``: a requantization
    (or any monotone map) of integer codes in a few float32 passes.

    Exact by construction: :meth:`fit` accepts ``(S, C)`` only after running :meth:`apply` itself
    — the same float32 operations in the same order — on every code of the domain and comparing
    with the exact table. (IEEE float32 multiplication and addition are correctly rounded, so the
    result for a code does not depend on the tensor it sits in.)
    """

    def __init__(self, s: float, c: float, qmin: int, qmax: int) -> None:
        self.s, self.c, self.qmin, self.qmax = float(s), float(c), int(qmin), int(qmax)

    def apply(self, q: Tensor, out: Tensor) -> Tensor:
        off = 128 if out.dtype == torch.uint8 else 0
        y = scratch_like("affine-f32", q, torch.float32)
        y.copy_(q)
        y.mul_(self.s).add_(self.c - off if off else self.c).floor_()
        y.clamp_(self.qmin - off, self.qmax - off)
        RequantPlan._store(y, out, off)
        return out

    @classmethod
    def fit(cls, codes: Tensor, table: Tensor, slope: float, qmin: int, qmax: int,
            out_dtype: torch.dtype, tries: int = 16) -> "AffineFloor | None":
        """An exact form of ``table`` (int64, one entry per int64 code) or None. ``slope`` is a
        guess of ``S`` (the real multiplier); its neighbouring float32 values are tried too."""
        s0 = torch.tensor(slope, dtype=torch.float32)
        if not bool(torch.isfinite(s0)) or codes.numel() == 0:
            return None
        t = table.to(torch.float64)
        q = codes.to(torch.float64)
        below, above = t < qmax, t > qmin          # constraints floor(v) >= t / <= t
        cands = [s0]
        up, down = s0, s0
        for _ in range(tries):
            up = torch.nextafter(up, torch.tensor(float("inf")))
            down = torch.nextafter(down, torch.tensor(-float("inf")))
            cands += [up, down]
        out = torch.empty(codes.shape, dtype=out_dtype)
        for s in cands:
            qs = q * float(s)                      # exact: 24-bit S times a code below 2^24
            lo = float((t - qs)[above | ~below].max()) if bool((above | ~below).any()) \
                else -float("inf")
            hi = float((t + 1 - qs)[below | ~above].min()) if bool((below | ~above).any()) \
                else float("inf")
            if not lo < hi:
                continue
            mid = (lo + hi) / 2 if math.isfinite(lo) and math.isfinite(hi) else \
                (lo + 0.5 if math.isfinite(lo) else hi - 0.5)
            cand = cls(float(s), float(torch.tensor(mid, dtype=torch.float32)), qmin, qmax)
            if torch.equal(cand.apply(codes, out).to(torch.int64), table):
                return cand
        return None


def max_pool_codes(x: Tensor, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None,
                   padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
                   ceil_mode: bool = False) -> Tensor:
    """Max pooling of integer codes of any dtype as the running maximum of one strided slice per
    kernel offset, on the channels-last view (the result is channels-last in memory, same dtype).
    Padding is the dtype's minimum, which never changes a maximum; output sizes follow PyTorch
    (``ceil_mode`` windows must start inside the input or its left padding)."""
    nd = x.dim() - 2

    def tup(v: Any) -> tuple[int, ...]:
        return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * nd
    k, p, d = tup(kernel_size), tup(padding), tup(dilation)
    s = tup(stride if stride is not None and stride != [] else kernel_size)
    outs, extra = [], []
    for i in range(nd):
        size, span = x.shape[2 + i], d[i] * (k[i] - 1) + 1
        num = size + 2 * p[i] - span + ((s[i] - 1) if ceil_mode else 0)
        out = num // s[i] + 1
        if ceil_mode and (out - 1) * s[i] >= size + p[i]:
            out -= 1
        outs.append(out)
        extra.append(max(0, (out - 1) * s[i] + span - (size + 2 * p[i])))
    xl = x.permute(0, *range(2, 2 + nd), 1)
    pads: list[int] = [0, 0]
    for i in reversed(range(nd)):
        pads += [p[i], p[i] + extra[i]]
    if any(pads):
        xl = torch.nn.functional.pad(xl, pads, value=torch.iinfo(x.dtype).min)
    acc = None
    for off in itertools.product(*[range(kk) for kk in k]):
        idx = tuple(slice(off[i] * d[i], off[i] * d[i] + s[i] * (outs[i] - 1) + 1, s[i])
                    for i in range(nd))
        win = xl[(slice(None),) + idx]
        acc = win.clone(memory_format=torch.contiguous_format) if acc is None else \
            torch.maximum(acc, win, out=acc)
    assert acc is not None
    return acc.permute(0, nd + 1, *range(1, nd + 1))
