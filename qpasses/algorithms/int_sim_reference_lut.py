"""The oracle's lookup tables (:mod:`qpasses.algorithms.int_sim_reference`): ``table[q − in_qmin]``
of an :class:`IntLUT`, the table rebuilt from the module's float function where it has one.

* the table: every input code ``c`` of the grid maps to ``clamp(rint(fn((c − z_in)·s_in) / s_out)
  + z_out)`` (float32, docs/int-sim.md "Integer arithmetic"), computed over the whole input grid
  at once (the same array as the lowering's, so an elementwise function's vectorized and scalar
  paths see every code where they saw it there). It depends only on ``fn`` and the grids: it is
  memoized per module (weakly: gone with the module) under those, ``fn`` compared by identity —
  the cost, a float function over up to 2^16 codes, is otherwise paid on every run of the oracle;
* the lookup: narrow codes (8/16-bit) index, through their unsigned view, a table over every code
  of their dtype (entry ``u`` holds the value of the code whose bits are ``u``): one gather, no
  int64 copy of the codes (:func:`gather`: 1-byte codes into a 1-byte table map the codes'
  bytes through the table with ``bytearray.translate``, wider ones go through ``np.take`` a
  cache-sized block at a time). Codes the module's table does not cover are an error (two
  reductions check it, only when the table does not cover the whole dtype).
"""
from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch

from qpasses.algorithms.int_sim_reference_kernels import code_dtype
from qpasses.numerics.layout import axes_in_memory_order

__all__ = ["gather", "lut_ref"]

_I64 = np.int64
_MEMO: "weakref.WeakKeyDictionary[Any, tuple[tuple, np.ndarray, dict]]" = \
    weakref.WeakKeyDictionary()
_NARROW = {np.dtype(np.int8): np.uint8, np.dtype(np.uint8): np.uint8,
           np.dtype(np.int16): np.uint16, np.dtype(np.uint16): np.uint16}


def _build(mod: Any, fn: Any) -> np.ndarray:
    """The module's table in the narrowest integer type holding its values."""
    table = mod.table.numpy()
    if fn is not None:
        codes = np.arange(mod.in_qmin, mod.in_qmin + table.size, dtype=_I64)
        xhat = (codes - mod.in_zero_point).astype(np.float32) * np.float32(mod.in_scale)
        with torch.no_grad():
            v = fn(torch.from_numpy(xhat)).numpy().astype(np.float32)
        t = np.rint(v * (np.float32(1.0) / np.float32(mod.out_scale))).astype(_I64) \
            + mod.out_zero_point
        table = np.clip(t, mod.out_qmin, mod.out_qmax)
    if table.size:
        table = table.astype(code_dtype(int(table.min()), int(table.max())))
    return table


def _table(mod: Any) -> tuple[np.ndarray, dict]:
    """``(table, {dtype: full table over that dtype's codes})``, memoized for a module with a
    float function (key: the function's identity and the grids); a module without one reads its
    own buffer every time."""
    fn = getattr(mod, "fn", None)
    if fn is None:
        return _build(mod, None), {}
    key = (mod.in_qmin, int(mod.table.numel()), mod.in_zero_point, mod.in_scale,
           mod.out_scale, mod.out_zero_point, mod.out_qmin, mod.out_qmax)
    hit = _MEMO.get(mod)
    if hit is not None and hit[0][0] is fn and hit[0][1] == key:
        return hit[1], hit[2]
    table = _build(mod, fn)
    _MEMO[mod] = ((fn, key), table, {})
    return table, _MEMO[mod][2]


def _full(table: np.ndarray, in_qmin: int, dtype: np.dtype) -> np.ndarray:
    """Entry ``u`` (an unsigned code pattern of ``dtype``) = ``table[code(u) − in_qmin]``; codes
    outside the table hold 0 (never read: the caller checks the codes' range first)."""
    udt = _NARROW[dtype]
    n = 1 << (8 * np.dtype(udt).itemsize)
    codes = np.arange(n, dtype=_I64).astype(udt).view(dtype).astype(_I64) - in_qmin
    inside = (codes >= 0) & (codes < table.size)
    full = np.zeros(n, dtype=table.dtype)
    full[inside] = table[codes[inside]]
    return full


def lut_ref(mod: Any, q: np.ndarray) -> np.ndarray:
    """``table[q − in_qmin]`` (module docstring)."""
    table, fulls = _table(mod)
    lo_t, hi_t = mod.in_qmin, mod.in_qmin + table.size - 1
    narrow = q.dtype in _NARROW and table.size
    info = np.iinfo(q.dtype) if q.dtype.kind in "iu" else None
    if q.size and (info is None or info.min < lo_t or info.max > hi_t):
        lo, hi = int(q.min()), int(q.max())
        if lo < lo_t or hi > hi_t:
            raise ValueError(f"lookup table '{getattr(mod, 'fn_name', '?')}': input codes "
                             f"[{lo}, {hi}] outside [{lo_t}, {hi_t}]")
    if not narrow:
        return table[q.astype(_I64) - mod.in_qmin]
    full = fulls.get(q.dtype)
    if full is None:
        full = fulls[q.dtype] = _full(table, mod.in_qmin, q.dtype)
    return gather(full, q)


GATHER_BLOCK = 1 << 15


def gather(full: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``full[q.view(unsigned)]`` (``full``: a table over every code of ``q``'s 8/16-bit dtype),
    with ``q``'s shape and memory layout, walking ``q`` in its memory order. 1-byte codes into a
    1-byte table: the bytes mapped through the 256-byte table by ``bytearray.translate`` (a
    byte-for-byte lookup, several times faster than ``np.take``, which first widens every index
    to intp); else ``np.take`` on blocks of :data:`GATHER_BLOCK` indices widened into one
    reused buffer (in cache; about twice as fast as one whole-array ``np.take``)."""
    order = axes_in_memory_order(q.strides)
    src = q.transpose(order)                        # q's axes in memory order (a view)
    if not src.flags.c_contiguous:
        src = np.ascontiguousarray(src)
    flat = src.reshape(-1).view(_NARROW[q.dtype])
    if full.itemsize == 1 and q.itemsize == 1:
        out = np.frombuffer(bytearray(flat.data).translate(full.tobytes()), dtype=full.dtype)
    else:
        out = np.empty(flat.size, dtype=full.dtype)
        idx = np.empty(min(flat.size, GATHER_BLOCK), dtype=np.intp)
        for i in range(0, flat.size, GATHER_BLOCK):
            part = flat[i:i + GATHER_BLOCK]
            ix = idx[:part.size]
            ix[...] = part
            # every unsigned code indexes the full table: "clip" never clips (and, unlike
            # "raise", writes straight into ``out``)
            np.take(full, ix, out=out[i:i + part.size], mode="clip")
    return out.reshape(src.shape).transpose(np.argsort(order))
