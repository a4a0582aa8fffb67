"""Exact outputs of an :class:`IntAffine` for channels whose input is a constant: a channel fed by an
all-zero (0-bit) kernel through quantizers, clamps, max pools and concatenations (DenseNet: a pruned
layer's channel through the next BatchNorm). ``prune-zero-bit-channels`` folds such a channel's
fake-quant constant into the next layer; giving the integer op that same constant (by nudging the
channel's integer bias, a few 2^-k input steps) keeps pruned and unpruned graphs bit-identical after
lowering, as ``exact-zero-kernel-constants`` does for the layers themselves."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from qpasses.ir import ops
from qpasses.ir.fx import node_arg, node_shape
from qpasses.modules.fake_quant import ActFakeQuant
from qpasses.modules.fake_quant_layers import is_fake_quant_layer
from qpasses.modules.int_sim import Requantize
from qpasses.modules.int_sim_affine import IntAffine
from qpasses.modules.int_sim_ops import IntAvgPoolSum, IntClamp, IntMaxPool
from qpasses.algorithms.lowering.config import INT32_MAX, QType

__all__ = ["ExactAffineChains", "ExactAffineConstants", "exact_affine_chains"]

Node = torch.fx.Node
_SEARCH = 64          # candidate bias offsets on each side (2^-k input steps)


class ExactAffineConstants:
    """Mixed into :class:`~qpasses.algorithms.lowering.builder.GraphLowering`."""

    def constant_channels(self, node: Any, depth: int = 0) -> Tensor | None:
        """Per channel (dim 1) of a fake-quant value: its constant real value where the channel
        is constant whatever the input (NaN elsewhere), None when nothing is known."""
        if not isinstance(node, Node) or depth > 64:
            return None
        shape = node_shape(node)
        if shape is None or len(shape) < 2:
            return None
        m = self.module_of(node)
        if node.op == "call_module":
            # the builder's module table already maps lowered layers to their integer layers:
            # read the fake-quant layer from the graph module (swapped only after the walk)
            m = self.gm.get_submodule(str(node.target))
        if m is not None and is_fake_quant_layer(m):
            if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                return None
            with torch.no_grad():
                w = m.weight_fake_quant(m.weight).detach()
            zero = (w == 0).flatten(1).all(1)
            if not bool(zero.any()):
                return None
            b = m.bias.detach().float() if m.bias is not None else torch.zeros(w.shape[0])
            return torch.where(zero, b, torch.full_like(b, float("nan")))
        if n_cat(node):
            seq = node_arg(node, 0, "tensors", ())
            dim = node_arg(node, 1, "dim", 0)
            if not isinstance(seq, (list, tuple)) or int(dim) % len(shape) != 1:
                return None
            parts = []
            for a in seq:
                s = node_shape(a)
                if s is None:
                    return None
                v = self.constant_channels(a, depth + 1)
                parts.append(v if v is not None else torch.full((s[1],), float("nan")))
            out = torch.cat(parts)
            return None if bool(torch.isnan(out).all()) else out
        if not node.args or not isinstance(node.args[0], Node):
            return None
        clamp = self.clamp_bounds(node, m)
        # a constant stays constant through max pools, and through average pools without
        # padding whose window is a power of two (a float32 mean of 2^j equal values is exact)
        moves = isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d) + ops.EVAL_IDENTITY_MODULES) \
            or (node.op == "call_function" and node.target in ops.MAX_POOL_FUNCTIONS) \
            or (isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)) and _exact_avg(m))
        if not (isinstance(m, ActFakeQuant) or clamp is not None or moves):
            return None                          # decided before walking further up
        cache = self.__dict__.setdefault("_const_channels", {})
        if node.name in cache:
            return cache[node.name]
        v = self.constant_channels(node.args[0], depth + 1)
        if v is not None:
            with torch.no_grad():
                if isinstance(m, ActFakeQuant):
                    v = _keep_nan(v, m(v.nan_to_num().reshape(1, -1, 1)).reshape(-1))
                elif clamp is not None:
                    v = _keep_nan(v, torch.clamp(v.nan_to_num(), *clamp))
        cache[node.name] = v
        return v

    def exact_constant_channels(self, mod: IntAffine, x_node: Node, n: Node, qt: QType,
                                target: QType, fq: ActFakeQuant | None) -> int:
        """Nudge the integer bias of ``mod``'s constant-input channels so that each outputs the
        fake-quant graph's code for its constant (``n`` run in float32 on it, the clamps, the
        quantizer ``fq``); returns the number of channels changed. Codes inputs only, integer
        contracts (float-rne's float bias is left as it is)."""
        if fq is None or qt.per_channel or mod.axis != 1 or mod.rq.rounding == "float-rne":
            return 0
        v = self.constant_channels(x_node)
        c = mod.sign.numel()
        if v is None or v.numel() != c:
            return 0
        known = ~torch.isnan(v)
        shape = node_shape(n)
        if shape is None:
            return 0
        # the fake-quant value: the op itself (a module or a function) on the constant
        with torch.no_grad():
            x = v.nan_to_num().reshape(1, c, *[1] * (len(shape) - 2))
            m = self.module_of(n)
            if m is not None:
                y = m(x)
            else:
                args = [x if a is x_node else (self.const_value(a) if isinstance(a, Node) else a)
                        for a in n.args]
                if any(a is None for a in args):
                    return 0
                y = n.target(*args) if n.op == "call_function" else \
                    getattr(args[0], str(n.target))(*args[1:])
            found = self.affine_target(n)
            if found is not None and (found[1] is not None or found[2] is not None):
                y = torch.clamp(y, found[1], found[2])
            want = torch.round(fq(y).reshape(-1) * (1.0 / torch.tensor(target.scale[0],
                                                                          dtype=torch.float32)))
        want = want.to(torch.int64) + target.zero_point
        q0 = torch.round(v.nan_to_num() / qt.scale[0]).to(torch.int64) + qt.zero_point
        q0 = q0.clamp(qt.qmin, qt.qmax).reshape(1, c, *[1] * (len(shape) - 2))
        got = mod.rq.reference(mod.accumulate(q0)).reshape(-1)
        bad = known & (got != want)
        if not bool(bad.any()):
            return 0
        base = mod.bias_q.clone()

        def run(bias: Tensor) -> Tensor:
            mod.bias_q.copy_(bias)
            return mod.rq.reference(mod.accumulate_with_bias(q0)).reshape(-1)
        best = _nudge_biases(mod, run, base, bad, want)
        if mod.acc_max > INT32_MAX:            # cannot happen for offsets of <= 64 steps, but
            mod.bias_q.copy_(base)             # never leave an unproven accumulator behind
            mod.refresh()
            return 0
        return int((best != base).sum())


def _nudge_biases(mod: IntAffine, run: Callable[[Tensor], Tensor], base: Tensor, bad: Tensor,
                  want: Tensor) -> Tensor:
    """Per channel in ``bad``, the integer bias nearest ``base`` (within ±_SEARCH) for which
    ``run(bias)`` (per-channel codes) gives ``want``; installs the result in ``mod``."""
    best, fixed = base.clone(), torch.zeros_like(bad)
    for d in sorted(range(-_SEARCH, _SEARCH + 1), key=abs):
        hit = bad & ~fixed & (run(base + d) == want)
        best = torch.where(hit, base + d, best)
        fixed |= hit
        if bool(fixed[bad].all()):
            break
    mod.bias_q.copy_(best)
    mod.refresh()
    return best


def _exact_avg(m: nn.Module) -> bool:
    k = m.kernel_size if isinstance(m.kernel_size, (tuple, list)) else (m.kernel_size,)
    p = m.padding if isinstance(m.padding, (tuple, list)) else (m.padding,)
    n = 1
    for v in k:
        n *= int(v)
    return all(int(v) == 0 for v in p) and n & (n - 1) == 0 and \
        getattr(m, "divisor_override", None) is None


def n_cat(node: Node) -> bool:
    return node.op == "call_function" and node.target in ops.CAT_FUNCTIONS


def _keep_nan(v: Tensor, out: Tensor) -> Tensor:
    return torch.where(torch.isnan(v), v, out.to(v.dtype))


_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                 nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.Flatten)


class ExactAffineChains:
    """The no-quantizer case: an affine value reaching its quantizer through a pool (DenseNet's
    last BatchNorm → ReLU → global pool). At lowering (:meth:`plan_exact_chain`) the fake-quant
    code of each constant channel at that quantizer is computed by running the fake-quant ops on
    the constant; after the integer graph is built (:func:`exact_affine_chains`) the channel's
    integer bias is nudged until the integer chain gives that code."""

    def plan_exact_chain(self, mod: IntAffine, x_node: Node, n: Node, qt: QType) -> None:
        if qt.per_channel or mod.axis != 1 or mod.rq.rounding == "float-rne":
            return
        shape = node_shape(n)
        v = self.constant_channels(x_node)
        c = mod.sign.numel()
        if shape is None or v is None or v.numel() != c or shape[1] != c:
            return
        chain, cur = [], n
        for _ in range(32):
            users = [u for u in cur.users]
            if len(users) != 1 or not users[0].args or users[0].args[0] is not cur:
                return
            u = users[0]
            m = self.module_of(u)
            if isinstance(m, ActFakeQuant):
                break
            ok = self.clamp_bounds(u, m) is not None or isinstance(m, _POOL_MODULES) or \
                (u.op == "call_function" and (u.target in ops.PASSTHROUGH_FUNCTIONS
                                              or u.target in ops.POOL_FUNCTIONS)) or \
                (u.op == "call_method" and u.target in ops.PASSTHROUGH_METHODS)
            if not ok or any(isinstance(a, Node) for a in list(u.args[1:]) + list(u.kwargs.values())):
                return
            chain.append(u)
            cur = u
        else:
            return
        fq = self.module_of(next(iter(cur.users)))
        spatial = tuple(shape[2:])
        known = ~torch.isnan(v)
        with torch.no_grad():
            x = v.nan_to_num().reshape(1, c, *[1] * len(spatial)).expand(1, c, *spatial)
            y = self.module_of(n)(x.contiguous()) if self.module_of(n) is not None else None
            if y is None:
                return
            y = fq(_replay(y, [(u, self.module_of(u)) for u in chain]))
        if y.numel() % c or y.shape[0] != 1 or y.dim() < 2 or y.shape[1] != c:
            return
        s, z = fq.qparams()
        want = torch.round(y.reshape(1, c, -1)[0, :, 0] * (1.0 / s.reshape(-1)[0].float()))
        q0 = (torch.round(x / qt.scale[0]).to(torch.int64) + qt.zero_point).clamp(qt.qmin,
                                                                                  qt.qmax)
        mod.exact_plan = (known, q0, want.to(torch.int64) + int(z.reshape(-1)[0]))


def exact_affine_chains(gm: torch.fx.GraphModule) -> int:
    """Apply the plans of :meth:`ExactAffineChains.plan_exact_chain` in the built integer graph;
    the number of channel biases changed."""
    mods = dict(gm.named_modules())
    changed = 0
    for node in gm.graph.nodes:
        mod = mods.get(str(node.target)) if node.op == "call_module" else None
        plan = getattr(mod, "exact_plan", None) if isinstance(mod, IntAffine) else None
        if plan is None:
            continue
        del mod.exact_plan
        known, q0, want = plan
        steps, cur, rq = [], node, None
        while len(cur.users) == 1:
            cur = next(iter(cur.users))
            m = mods.get(str(cur.target)) if cur.op == "call_module" else None
            if isinstance(m, Requantize):
                rq = m
                break
            if not (isinstance(m, (IntClamp, IntMaxPool, IntAvgPoolSum))
                    or (cur.op == "call_function" and cur.target in ops.PASSTHROUGH_FUNCTIONS)
                    or (cur.op == "call_method" and cur.target in ops.PASSTHROUGH_METHODS)):
                break
            steps.append((cur, m))
        if rq is None:
            continue

        def run(bias: Tensor) -> Tensor:
            mod.bias_q.copy_(bias)
            y = _replay(mod.rq.reference(mod.accumulate_with_bias(q0)), steps)
            return rq.reference(y).reshape(1, known.numel(), -1)[0, :, 0]
        base = mod.bias_q.clone()
        bad = known & (run(base) != want)
        if not bool(bad.any()):
            mod.bias_q.copy_(base)
            continue
        best = _nudge_biases(mod, run, base, bad, want)
        changed += int((best != base).sum())
    return changed


def _replay(y: Tensor, steps: list[tuple[Node, Any]]) -> Tensor:
    """``y`` through a chain of single-input nodes, each ``(node, its module or None)``: the
    module, the function or the method with the node's other (constant) arguments."""
    for u, m in steps:
        if m is not None:
            y = m(y)
        elif u.op == "call_function":
            y = u.target(y, *u.args[1:], **u.kwargs)
        else:
            y = getattr(y, str(u.target))(*u.args[1:], **u.kwargs)
    return y
