"""Bias constants of the integer layers after the builder: fractional bias bits for layers whose
accumulator reaches its requantization through clamps, pools and shape ops
(:func:`shift_unfused_biases`), and exact outputs of all-zero kernels
(:func:`exact_zero_kernel_constants`). Shared arithmetic: :func:`choose_bias_frac_bits`,
:func:`round_bias`, :func:`scaled_bias`, :func:`zero_kernels`."""
from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.fx
from torch import Tensor

from qpasses.modules.int_sim import Requantize
from qpasses.modules.int_sim_layers import IntLayer
from qpasses.modules.int_sim_ops import IntAvgPoolSum, IntClamp, IntMaxPool
from qpasses.algorithms.lowering.config import INT32_MAX
from qpasses.ir.fx import node_shape
from qpasses.ir import ops
__all__ = ["choose_bias_frac_bits", "constant_chain", "exact_zero_kernel_constants", "pool_lcm",
           "remember_zero_kernels", "round_bias", "scaled_bias", "shift_unfused_biases",
           "zero_kernels"]

Node = torch.fx.Node


def choose_bias_frac_bits(layer: IntLayer, real: Tensor, rounding: str, want: int | None,
                          headroom: int = 1) -> int:
    """Fractional bits for the bias of a layer whose accumulator reaches its requantization with
    real multiplier ``real`` per accumulator unit: ``want``, or (None) just enough that rounding
    the bias costs at most 1/64 output LSB (``M·2^-(k+1) <= 2^-6``), capped so that
    ``((bound << k) + |b_q|) · headroom`` (pool sums) stays in int32. 0 where there is no bias or
    the contract is float-rne (fbgemm's float bias)."""
    if layer.bias_q is None or rounding == "float-rne" or getattr(layer, "bias", None) is None:
        return 0
    if not bool(layer.bias_base.any()):
        return 0    # only pruning folds (whole accumulator units), or a zero bias: nothing to keep
    # all-zero (0-bit) kernels only output their bias, set exactly by
    # exact_zero_kernel_constants; leaving them out also keeps k the same when
    # prune-zero-bit-channels removes them
    real = real.reshape(-1).expand(layer.w_q.shape[0])[~zero_kernels(layer)]
    m_max = float(real.max()) if real.numel() else 0.0
    k = want if want is not None else (max(0, math.ceil(math.log2(m_max)) + 5) if m_max > 0
                                       else 0)
    while k > 0:
        b = scaled_bias(layer, k)
        if ((layer.acc_bound << k) + int(b.abs().max())) * headroom <= INT32_MAX:
            break
        k -= 1
    return k


def round_bias(parts: tuple[Tensor, Tensor], acc_scale: Tensor) -> Tensor:
    """``b / acc_scale`` rounded, with a pruning fold (an integer number of accumulator units up
    to float error, see :func:`qpasses.ir.layers.bias_parts`) rounded on its own."""
    base, fold = parts
    return torch.round(base / acc_scale) + torch.round(fold / acc_scale)


def scaled_bias(layer: IntLayer, k: int) -> Tensor:
    return round_bias((layer.bias_base, layer.bias_fold), layer.acc_scale / 2.0 ** k).to(
        torch.int64)


# layer -> (key of the w_q / w_zp tensors it was computed for, mask): zero_kernels is asked for
# by three passes per layer; the builder already knows it (kernels with L1 norm 0)
_ZERO_KERNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _zero_key(layer: IntLayer) -> tuple[Any, ...]:
    return (weakref.ref(layer.w_q), layer.w_q._version, weakref.ref(layer.w_zp),
            layer.w_zp._version)


def _key_holds(key: tuple[Any, ...], layer: IntLayer) -> bool:
    wq, wq_v, wz, wz_v = key
    return (wq() is layer.w_q and wq_v == layer.w_q._version and wz() is layer.w_zp
            and wz_v == layer.w_zp._version)


def remember_zero_kernels(layer: IntLayer, mask: Tensor) -> None:
    """Record ``mask`` as :func:`zero_kernels` of ``layer`` (valid while its ``w_q`` and
    ``w_zp`` tensors stay the same, unmodified)."""
    _ZERO_KERNELS[layer] = (_zero_key(layer), mask)


def zero_kernels(layer: IntLayer) -> Tensor:
    """Output channels whose integer kernel is all zero (``w_q == w_zp``): 0-bit kernels."""
    hit = _ZERO_KERNELS.get(layer)
    if hit is not None and _key_holds(hit[0], layer):
        return hit[1]
    wz = layer.w_zp.reshape(-1, *[1] * (layer.w_q.dim() - 1)) if layer.w_zp.numel() > 1 \
        else layer.w_zp
    mask = (layer.w_q == wz).flatten(1).all(1)
    _ZERO_KERNELS[layer] = (_zero_key(layer), mask)
    return mask


def constant_chain(gm: torch.fx.GraphModule, node: Node, layer: IntLayer
                   ) -> tuple[list[Node], Requantize] | None:
    """The ops from a layer's output to the requantization that puts it on a grid, when every op
    maps a per-channel constant to a constant (clamp, pools, shape ops): (ops, requantization).
    A layer with a fused requantization is its own chain."""
    if layer.requant is not None:
        return [], layer.requant
    chain, cur = [], node
    while len(cur.users) == 1:
        cur = next(iter(cur.users))
        mod = gm.get_submodule(str(cur.target)) if cur.op == "call_module" else None
        if isinstance(mod, Requantize):
            return chain, mod
        if not (isinstance(mod, (IntClamp, IntMaxPool, IntAvgPoolSum))
                or (cur.op == "call_function" and cur.target in ops.PASSTHROUGH_FUNCTIONS)
                or (cur.op == "call_method" and cur.target in ops.PASSTHROUGH_METHODS)):
            return None
        chain.append(cur)
    return None


def pool_lcm(gm: torch.fx.GraphModule, chain: list[Node]) -> int:
    """Product of the average pools' ``L`` along ``chain`` (a pool sum is at scale ``s/L``)."""
    mods = [gm.get_submodule(str(n.target)) for n in chain if n.op == "call_module"]
    return math.prod(m.lcm for m in mods if isinstance(m, IntAvgPoolSum))


def shift_unfused_biases(gm: torch.fx.GraphModule, bias_frac_bits: int | None) -> int:
    """Fractional bias bits (as :func:`~qpasses.algorithms.lowering.fusion.fuse_requant` gives
    fused layers) for a layer whose
    accumulator reaches its requantization through clamps, pools and shape ops: the accumulator,
    the clamp bounds and the declared ranges along the way scale by ``2^k`` and the requantization
    divides by it. Without this a coarse accumulator grid (multiplier > 1) rounds the bias by up
    to half an output LSB. Returns the number of layers shifted."""
    shifted = 0
    for node in list(gm.graph.nodes):
        layer = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not isinstance(layer, IntLayer) or layer.requant is not None or layer.acc_shift:
            continue
        found = constant_chain(gm, node, layer)
        if found is None:
            continue
        chain, rq = found
        lcm = pool_lcm(gm, chain)
        if rq.in_zero_point or rq.real.numel() not in (1, layer.w_q.shape[0]):
            continue
        k = choose_bias_frac_bits(layer, rq.real * lcm, rq.rounding, bias_frac_bits,
                                  headroom=lcm)
        if not k:
            continue
        layer.set_acc_shift(k, scaled_bias(layer, k))
        # declared ranges along the chain, re-derived from the shifted accumulator: the bias
        # re-rounded on the finer grid can exceed the old bias << k (by up to 2^(k-1))
        lo, hi = -layer.acc_max, layer.acc_max
        for n in chain:
            mod = gm.get_submodule(str(n.target)) if n.op == "call_module" else None
            if isinstance(mod, IntClamp):
                mod.lo.mul_(2 ** k)
                mod.hi.mul_(2 ** k)
                lo, hi = max(lo, int(mod.lo.min())), min(hi, int(mod.hi.max()))
            elif isinstance(mod, IntAvgPoolSum):
                lo, hi = lo * mod.lcm, hi * mod.lcm
            if isinstance(mod, (IntClamp, IntMaxPool, IntAvgPoolSum)):
                mod.qmin, mod.qmax = lo, hi
        new = Requantize(rq.real / 2.0 ** k, in_zero_point=0, out_zero_point=rq.out_zero_point,
                         qmin=rq.qmin, qmax=rq.qmax, rounding=rq.rounding,
                         multiplier_bits=rq.multiplier_bits, axis=rq.axis)
        new.prove(max(abs(lo), abs(hi)))
        new.set_backend(rq.backend)
        rq_node = next(iter((chain[-1] if chain else node).users))
        gm.set_submodule(str(rq_node.target), new)
        shifted += 1
    return shifted


def _run_chain(gm: torch.fx.GraphModule, chain: list[Node], rq: Requantize, x: Tensor) -> Tensor:
    for n in chain:
        if n.op == "call_module":
            x = gm.get_submodule(str(n.target))(x)
        elif n.op == "call_function":
            x = n.target(x, *n.args[1:], **n.kwargs)
        else:
            x = getattr(x, n.target)(*n.args[1:], **n.kwargs)
    return rq(x)


def exact_zero_kernel_constants(gm: torch.fx.GraphModule) -> int:
    """Give every all-zero (0-bit) kernel the integer bias whose output, after the ops up to its
    requantization, equals the fake-quant graph's constant: the float bias, clamped, through the
    output quantizer (``clamp(rne(b · (1/s)) + z)`` in float32). Rounding the bias onto the
    accumulator grid and requantizing it afterwards can land one LSB off that, and
    ``prune-zero-bit-channels`` folds the fake-quant constant; with this, pruned and unpruned
    graphs lower to the same integers. Only biases within the layer's current ``max |b_q|`` are
    used, so every declared range stays valid. Returns the number of biases changed."""
    changed = 0
    for node in gm.graph.nodes:
        layer = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not isinstance(layer, IntLayer) or layer.bias_q is None or \
                getattr(layer, "bias", None) is None or layer.float_bias_fused:
            continue
        zero = zero_kernels(layer)
        found = constant_chain(gm, node, layer) if bool(zero.any()) else None
        shape = node_shape(node)
        if found is None or shape is None or len(shape) < 2:
            continue
        chain, rq = found
        c = layer.bias_q.numel()
        if rq.rounding == "float-rne" or rq.real.numel() not in (1, c) or shape[1] != c:
            continue
        # real value of one code entering rq, per code leaving the layer (pool sums scale by L)
        real = rq.real.reshape(-1).expand(c) * pool_lcm(gm, chain)
        acc_scale = layer.acc_scale.reshape(-1).expand(c) / 2.0 ** layer.acc_shift
        b = layer.bias.detach().double().reshape(-1)
        for n in chain:
            mod = gm.get_submodule(str(n.target)) if n.op == "call_module" else None
            if isinstance(mod, IntClamp):
                b = torch.minimum(torch.maximum(b, mod.lo.expand(c) * acc_scale),
                                  mod.hi.expand(c) * acc_scale)
        s32 = (acc_scale / real).to(torch.float32)
        z = rq.out_zero_point
        want = (torch.round(b.to(torch.float32) * (1.0 / s32)).to(torch.int64) + z).clamp(
            rq.qmin, rq.qmax)
        b_q = layer.bias_q
        # the integer inputs v with round(v·real) = want - z, nearest to the current bias
        lo = torch.ceil((want - z - 0.5).double() / real)
        hi = torch.floor((want - z + 0.5).double() / real)
        v = torch.minimum(torch.maximum(b_q.double(), lo), hi).to(torch.int64)
        cands = torch.cat([b_q.unsqueeze(0), v + torch.arange(-2, 3).unsqueeze(1)])
        x = cands.reshape(*cands.shape, *[1] * (len(shape) - 2)).expand(
            cands.shape[0], c, *shape[2:])
        with torch.no_grad():
            out = _run_chain(gm, chain, rq, x)     # a zero kernel's accumulator is its bias
        hit = (out.reshape(cands.shape[0], c, -1) == want.view(1, c, 1)).all(-1)
        hit &= cands.abs() <= int(b_q.abs().max())
        dist = torch.where(hit, (cands - b_q).abs(), torch.iinfo(torch.int64).max)
        best = cands.gather(0, dist.argmin(0, keepdim=True)).squeeze(0)
        new = torch.where(zero & hit.any(0), best, b_q)
        num = int((new != b_q).sum())
        if num:
            changed += num
            layer.set_acc_shift(layer.acc_shift, new)
    return changed

