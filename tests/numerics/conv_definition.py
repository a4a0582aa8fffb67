"""The integer convolution by its definition (test oracle for the oracles): int64 sums over
channels and kernel offsets, one strided slice at a time."""
from __future__ import annotations

import itertools

import numpy as np


def conv_int64(xs, wz, s, d, out, groups):
    """``Σ_{c,i,j} xs[:, c, i·d + s·y, j·d + s·x] · wz[o, c, i, j]`` per group, as int64."""
    n, c = xs.shape[:2]
    o = wz.shape[0]
    cg, og = c // groups, o // groups
    acc = np.zeros((n, o) + tuple(out), dtype=np.int64)
    for g, oo, ci, i, j in itertools.product(range(groups), range(og), range(cg),
                                             range(wz.shape[2]), range(wz.shape[3])):
        sl = xs[:, g * cg + ci, i * d[0]: i * d[0] + s[0] * (out[0] - 1) + 1: s[0],
                j * d[1]: j * d[1] + s[1] * (out[1] - 1) + 1: s[1]]
        acc[:, g * og + oo] += sl * wz[g * og + oo, ci, i, j]
    return acc
