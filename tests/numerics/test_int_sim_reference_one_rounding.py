"""The oracle's one-floor gemmlowp requantization (``gemmlowp_one_rounding``) equals the two-step
int64 definition SRDHM then RDBPOT, per channel, with bias, shift and left shifts, up to the edge
of its 2^53 bound (and refuses beyond it); the oracle's lookup tables equal ``table[q − in_qmin]``;
narrow code statistics are exact over the dtype's whole span (with reused buffers too); the
depthwise (torch float32) and dense (im2col) convolutions are exact up to the 2^24 bound."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpasses.algorithms import int_sim_reference_kernels as kern
from qpasses.algorithms.int_sim_compare import Scratch, fake_quant_codes
from qpasses.algorithms.int_sim_reference_lut import lut_ref


def _definition(v: np.ndarray, m31: np.ndarray, t: np.ndarray, zp: int, lo: int,
                hi: int) -> np.ndarray:
    """SRDHM ``floor((v·m31 + 2^30) / 2^31)`` then RDBPOT (half away from zero) by ``2^t``, in
    Python integers."""
    out = np.empty(v.shape, dtype=np.int64)
    vb, mb, tb = np.broadcast_arrays(v, m31, t)
    for i in np.ndindex(v.shape):
        h = (int(vb[i]) * int(mb[i]) + (1 << 30)) >> 31
        s = int(tb[i])
        if s:
            q, r = h >> s, h & ((1 << s) - 1)
            half = 1 << (s - 1)
            h = q + (r > half or (r == half and h >= 0))
        out[i] = min(max(h + zp, lo), hi)
    return out


def _bound(m31max: int, tmax: int, bmax: int) -> int:
    """The largest ``amax`` the one-floor path accepts."""
    return (2 ** 53 - 1 - 2 ** 31 - 2 ** (30 + tmax)) // max(m31max, 1) - bmax


@settings(deadline=None, max_examples=60, derandomize=True)
@given(st.integers(0, 10 ** 6), st.integers(0, 21), st.booleans(), st.integers(0, 10),
       st.sampled_from(["small", "edge", "ties"]), st.sampled_from([5, 64, 1 << 15]),
       st.sampled_from([np.int64, np.float32, np.float64]))
def test_one_floor_gemmlowp_equals_srdhm_then_rdbpot(seed, tmax, with_bias, shift, kind, block,
                                                     dtype):
    rng = np.random.default_rng(seed)
    c = 5
    m31 = rng.integers(2 ** 30, 2 ** 31, size=c, dtype=np.int64)
    t = rng.integers(0, tmax + 1, size=c, dtype=np.int64)
    t[0] = 0                                                   # a channel without RDBPOT
    if kind == "ties":
        m31[:] = 2 ** 30                            # SRDHM halves v exactly: h = v / 2, v even
        shift, with_bias = 0, False
    bias = rng.integers(-2 ** 12, 2 ** 12, size=c).astype(np.float64) if with_bias else None
    bmax = 0 if bias is None else int(np.abs(bias).max())
    limit = _bound(int(m31.max()), int(t.max()), bmax)
    if kind == "small":
        amax = min(2 ** 20, limit)
    else:
        amax = limit                                           # the edge of the bound
    top = max(1, (amax - bmax) >> shift)                       # |x·2^shift + bias| <= amax
    if dtype is np.float32:
        top = min(top, 2 ** 24)
    x = rng.integers(-top, top + 1, size=(3, c, 6), dtype=np.int64)
    x[0, :, 0], x[0, :, 1] = top, -top
    if kind == "ties":              # v = 2·(k·2^t + 2^(t−1)): RDBPOT of h = v / 2 is a tie
        for ch_i in range(c):
            s_ = int(t[ch_i])
            kk = max(0, (top >> (s_ + 1)) - 1)
            x[1, ch_i] = rng.integers(-kk, kk + 1, size=6) * 2 ** (s_ + 1) + 2 ** s_
    v = x * (1 << shift) + (0 if bias is None else bias.astype(np.int64)[None, :, None])
    amax_v = int(np.abs(v).max())
    ch = (1, c, 1)
    for zp, lo, hi in ((3, -128, 127), (0, -(2 ** 62), 2 ** 62), (300, -128, 127)):
        want = _definition(v, m31.reshape(ch), t.reshape(ch), zp, lo, hi)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kern, "BLOCK", block)
            got = kern.gemmlowp_one_rounding(
                x.astype(dtype), m31.reshape(ch), t.reshape(ch), amax_v, zp, lo, hi,
                None if bias is None else bias.reshape(ch), shift)
        assert got is not None
        assert np.array_equal(got.astype(np.int64), want)


def test_one_floor_gemmlowp_refuses_beyond_its_bound():
    m31, t = np.array(2 ** 31 - 1), np.array(7)
    limit = _bound(2 ** 31 - 1, 7, 0)
    x = np.array([limit, -limit], dtype=np.int64)
    assert kern.gemmlowp_one_rounding(x, m31, t, limit, 0, -128, 127) is not None
    assert kern.gemmlowp_one_rounding(x, m31, t, limit + 1, 0, -128, 127) is None
    # the oracle's requantization still answers (two-step float64 path or int64)
    got = kern.requant_f64(x, np.array(2 ** 31 - 1), np.array(-7), "gemmlowp", 31, limit + 1,
                           0, -128, 127)
    assert got is None or np.array_equal(got, _definition(x, m31, t, 0, -128, 127))


class _Lut(torch.nn.Module):
    def __init__(self, table, in_qmin, fn=None):
        super().__init__()
        self.register_buffer("table", torch.as_tensor(table, dtype=torch.int64))
        self.in_qmin, self.fn_name = in_qmin, "t"
        self.in_scale, self.in_zero_point = 0.05, 3
        self.out_scale, self.out_zero_point, self.out_qmin, self.out_qmax = 1 / 64, -2, -128, 127
        if fn is not None:
            self.fn = fn


@settings(deadline=None, max_examples=25, derandomize=True)
@given(st.sampled_from([np.int8, np.uint8, np.int16, np.int32, np.int64]),
       st.sampled_from([(-128, 256), (0, 256), (-32767, 65535), (-5, 40)]),
       st.booleans(), st.integers(0, 10 ** 6))
def test_lut_equals_indexing_and_refuses_codes_outside_the_table(dtype, grid, with_fn, seed):
    in_qmin, size = grid
    rng = np.random.default_rng(seed)
    table = rng.integers(-128, 128, size=size)
    mod = _Lut(table, in_qmin, torch.sigmoid if with_fn else None)
    info = np.iinfo(dtype)
    lo, hi = max(in_qmin, int(info.min)), min(in_qmin + size - 1, int(info.max))
    if lo > hi:
        return
    q = rng.integers(lo, hi + 1, size=(2, 3, 7)).astype(dtype)
    q[0, 0, :2] = lo, hi
    if with_fn:                                   # the table rebuilt from fn: its definition
        codes = np.arange(in_qmin, in_qmin + size)
        xhat = (codes - 3).astype(np.float32) * np.float32(0.05)
        v = torch.sigmoid(torch.from_numpy(xhat)).numpy()
        table = np.clip(np.rint(v * np.float32(64.0)).astype(np.int64) - 2, -128, 127)
    for _ in range(2):                            # the second call reads the memoized table
        got = lut_ref(mod, q)
        assert np.array_equal(got.astype(np.int64), table[q.astype(np.int64) - in_qmin])
    if lo > info.min:
        bad = q.copy()
        bad[1, 2, 3] = lo - 1
        with pytest.raises(ValueError, match="outside"):
            lut_ref(mod, bad)


@settings(deadline=None, max_examples=25, derandomize=True)
@given(st.sampled_from([torch.int8, torch.uint8, torch.int16]), st.integers(0, 10 ** 6),
       st.booleans(), st.booleans())
def test_narrow_code_statistics_reach_the_dtype_extremes(dtype, seed, channels_last, wide):
    """``code_diff``'s unsigned ``max − min`` is exact up to the full span of the dtype."""
    from qpasses.algorithms.int_sim_compare import code_diff
    gen = torch.Generator().manual_seed(seed)
    info = torch.iinfo(dtype)
    a = torch.randint(info.min, info.max + 1, (2, 3, 5, 4), generator=gen, dtype=torch.int64)
    step = torch.randint(-2, 3, a.shape, generator=gen) * (info.max if wide else 1)
    b = (a + step).clamp(info.min, info.max)
    a[0, 0, 0, :2] = torch.tensor([info.min, info.max])
    b[0, 0, 0, :2] = torch.tensor([info.max, info.min])          # |a − b| = the full span
    d = (a - b).abs()
    want = ((int((d == 1).sum()), int((d > 1).sum())), int(d.max()))
    a, b = a.to(dtype), b.to(dtype)
    if channels_last:
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    assert code_diff(a, b) == want
    assert code_diff(a, a) == ((0, 0), 0)
    scratch = Scratch()                       # reused buffers: the same answers, twice
    for _ in range(2):
        assert code_diff(a, b, scratch) == want
        assert code_diff(b[:1], a[:1], scratch) == code_diff(b[:1], a[:1])


@pytest.mark.parametrize("channels_last", [False, True])
def test_fake_quant_codes_with_a_scratch_buffer_equal_the_fresh_ones(channels_last):
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-128, 128, (2, 3, 5, 4), generator=gen)
    fv = (q - 3).to(torch.float32) * 0.0123
    like = q.to(torch.int8)
    if channels_last:
        fv, like = (t.contiguous(memory_format=torch.channels_last) for t in (fv, like))
    scratch = Scratch()
    first = fake_quant_codes(fv, 0.0123, 3, like, scratch)
    second = fake_quant_codes(fv * 2, 0.0123, 3, None, scratch)       # reuses the buffer
    assert torch.equal(first, fake_quant_codes(fv, 0.0123, 3, like))
    assert first.stride() == like.stride() and torch.equal(first.to(torch.int64), q)
    assert torch.equal(second, fake_quant_codes(fv * 2, 0.0123, 3, None))


@settings(deadline=None, max_examples=30, derandomize=True)
@given(st.integers(0, 10 ** 6), st.integers(1, 8), st.booleans(), st.booleans())
def test_one_floor_gemmlowp_with_left_shifts_equals_the_definition(seed, lmax, with_bias, edge):
    """Multipliers above one (``e > 0``: a left shift before SRDHM) beside ones below it."""
    rng = np.random.default_rng(seed)
    c = 6
    e = rng.integers(-12, lmax + 1, size=c)
    e[0], e[1] = lmax, -3
    m31 = rng.integers(2 ** 30, 2 ** 31, size=c, dtype=np.int64)
    left, t = np.maximum(e, 0), np.maximum(-e, 0)
    bias = rng.integers(-300, 300, size=c).astype(np.float64) if with_bias else None
    bmax = 0 if bias is None else int(np.abs(bias).max())
    limit = min(2 ** 31 >> lmax, _bound(int(m31.max()) << lmax, int(t.max()), bmax))
    top = limit - bmax if edge else min(limit - bmax, 5000)
    x = rng.integers(-top, top + 1, size=(2, c, 5), dtype=np.int64)
    x[0, :, 0], x[0, :, 1] = top, -top
    v = x + (0 if bias is None else bias.astype(np.int64)[None, :, None])
    ch = (1, c, 1)
    want = _definition(v * 2 ** left.reshape(ch), m31.reshape(ch), t.reshape(ch), -4, -128, 127)
    got = kern.requant_f64(x, m31.reshape(ch), e.reshape(ch), "gemmlowp", 31,
                           int(np.abs(v).max()), -4, -128, 127,
                           bias=None if bias is None else bias.reshape(ch))
    assert got is not None and np.array_equal(got.astype(np.int64), want)


@settings(deadline=None, max_examples=20, derandomize=True)
@given(st.sampled_from([(6, 6), (4, 8), (1, 5)]), st.integers(1, 2), st.integers(1, 2),
       st.booleans(), st.integers(-3, 3), st.integers(0, 10 ** 6))
def test_depthwise_on_torch_and_dense_im2col_are_exact_at_the_float32_edge(gc, s, d, edge, zp,
                                                                           seed):
    """groups = channels runs on torch's float32 convolution, a dense 3x3 kernel as one im2col
    matmul: both equal the int64 definition up to a bound just below 2^24 (and beyond it the
    float64 path takes over)."""
    from .conv_definition import conv_int64
    groups, c = gc
    o = c if groups == c else 4
    cg = c // groups
    rng = np.random.default_rng(seed)
    k_total = 9 * cg
    hi = int(np.sqrt((2 ** 24 - 1) / k_total)) if edge else 20        # 9·cg·X·W < 2^24
    x = rng.integers(-hi, hi + 1, size=(2, c, 9, 8), dtype=np.int64) + zp
    wz = rng.integers(-hi, hi + 1, size=(o, cg, 3, 3), dtype=np.int64)
    x[0, :, :3, :3], wz[:, :, 0, 0] = hi + zp, hi                     # reach the bound
    out = [(9 - d * 2 - 1) // s + 1, (8 - d * 2 - 1) // s + 1]
    want = conv_int64(x - zp, wz, (s, s), (d, d), out, groups)
    got = kern.conv_exact(x, wz, (s, s), (d, d), out, groups, keep_float=True, x_zp=zp)
    assert got.dtype == (np.float32 if k_total * hi * hi < 2 ** 24 else np.float64)
    assert np.array_equal(got.astype(np.int64), want)
