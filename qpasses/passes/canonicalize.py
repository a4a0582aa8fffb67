"""canonicalize: rewrite equivalent operator spellings to one canonical form per operation.

Rule-table style (tinygrad's PatternMatcher, kept simple): ``RULES`` is a tuple of
:class:`Rule`; each rule's ``match(cx, node)`` returns a rewrite thunk or None and never mutates
(``cx`` is a :class:`RewriteContext`: the GraphModule, its submodules by name, a memo).
The pass applies the first matching rule per node, sweeping the graph until nothing matches; the
``canonical`` property's checker runs the same matchers and lists any node that still matches, so
"canonical" means exactly "no rule applies".

Canonical forms are ``call_function`` nodes on public torch callables (see the pass docstring).
Rewrites change a node in place (op, target, args), so its name, position, users and
``node.meta`` (``tensor_meta`` included) stay; removed no-ops hand their users to their input.
"""
from __future__ import annotations

import builtins
import math
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from passes_registry import Pass, PassFailure, PassResult, PreservedAnalyses, register_pass

from qpasses.ir.fx import bind, dtype_of, shape_of

Node = torch.fx.Node
Thunk = Callable[[], None]
MAX_SWEEPS = 16


@dataclass(frozen=True)
class Rule:
    """One rewrite: ``match(cx, node)`` returns a thunk that performs it, or None."""
    name: str
    doc: str
    match: Callable[[RewriteContext, Node], Thunk | None]


class RewriteContext:
    """What rules see: the GraphModule, its submodules by qualified name, and a memo of the
    activation form of each node (cleared by :meth:`changed` after every rewrite)."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self._forms: dict[Node, Any] = {}

    def module(self, node: Node) -> nn.Module | None:
        return self.modules.get(str(node.target)) if node.op == "call_module" else None

    def activation_form(self, node: Node) -> "_Form | None":
        if node not in self._forms:
            self._forms[node] = _activation_form(self, node)
        return self._forms[node]

    def changed(self) -> None:
        self._forms.clear()


# --------------------------------------------------------------------------------------------
# Node surgery


def _become(node: Node, target: Any, args: tuple, kwargs: dict | None = None) -> None:
    """Turn ``node`` into ``call_function target(*args, **kwargs)``; name, meta, users stay."""
    node.op = "call_function"
    node.target = target
    node.args = tuple(args)
    node.kwargs = dict(kwargs or {})


def _forward_to_input(node: Node, x: Any) -> None:
    """Remove a no-op ``node``: its users read ``x`` instead."""
    node.replace_all_uses_with(x)
    node.graph.erase_node(node)


def _erase_dead_helpers(nodes: list[Any]) -> None:
    """Erase shape-helper nodes (``x.size(0)``, ``x.shape[0]``) a rewrite left without users."""
    pending = [n for n in nodes if isinstance(n, Node)]
    while pending:
        n = pending.pop()
        if n.users or n.op not in ("call_method", "call_function"):
            continue
        if (n.op == "call_method" and n.target == "size") or \
                (n.op == "call_function" and n.target in (operator.getitem, builtins.getattr)):
            inputs = list(n.all_input_nodes)
            n.graph.erase_node(n)
            pending.extend(inputs)


# --------------------------------------------------------------------------------------------
# In-place safety: x.op_() -> op(x) only when no alias of x can observe the difference

_FRESH_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase,
                  nn.LayerNorm, nn.GroupNorm, nn.modules.pooling._MaxPoolNd,
                  nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                  nn.modules.pooling._AdaptiveMaxPoolNd, nn.ReLU, nn.ReLU6, nn.Hardtanh,
                  nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Hardswish, nn.SiLU, nn.GELU,
                  nn.LeakyReLU, nn.Softmax)
_FRESH_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.matmul,
    torch.add, torch.sub, torch.mul, torch.div, torch.matmul, torch.bmm, torch.cat,
    torch.relu, torch.sigmoid, torch.tanh, F.relu, F.relu6, F.hardtanh, F.hardsigmoid,
    F.hardswish, F.silu, F.gelu, F.leaky_relu, F.softmax, F.linear, F.conv1d, F.conv2d,
    F.conv3d, F.batch_norm, F.layer_norm, F.group_norm, F.avg_pool2d, F.max_pool2d,
    F.adaptive_avg_pool2d, torch.batch_norm,
}
_FRESH_METHODS = {"add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "matmul", "softmax"}


def _fresh(cx: RewriteContext, x: Any) -> bool:
    """True when ``x`` is a new tensor no other value aliases (output of a computing op)."""
    if not isinstance(x, Node):
        return False
    if x.kwargs.get("inplace") is True:
        return False
    form = cx.activation_form(x)
    if form is not None and form.inplace:  # also catches a positional inplace=True
        return False
    if x.op == "call_module":
        mod = cx.module(x)
        if mod is None or not type(mod).__module__.startswith("torch.nn."):
            return False  # stock torch.nn layers only: a subclass may return an alias
        return isinstance(mod, _FRESH_MODULES) and getattr(mod, "inplace", False) is not True
    if x.op == "call_function":
        return x.target in _FRESH_FUNCTIONS
    if x.op == "call_method":
        return x.target in _FRESH_METHODS
    return False


def _inplace_plan(cx: RewriteContext, node: Node, x: Any) -> list[Node] | None:
    """Users of ``x`` to redirect to ``node`` once ``node`` stops mutating ``x``; None if unsafe.

    Safe when ``x`` is a fresh tensor (not an input, attribute or view of anything) and every
    other user of ``x`` either runs after ``node`` (it saw the mutated value: it now reads
    ``node``) or runs before it and produces a fresh tensor (so holds no alias of ``x``).
    """
    if not _fresh(cx, x):
        return None
    later = []
    for u in x.users:
        if u is node:
            continue
        if u > node:
            later.append(u)
        elif not _fresh(cx, u):
            return None
    return later


def _redirect(x: Node, node: Node, later: list[Node]) -> None:
    for u in later:
        u.replace_input_with(x, node)


# --------------------------------------------------------------------------------------------
# Forms: what a node computes, as (rule, canonical target, input, extra args, kwargs, inplace)


@dataclass(frozen=True)
class _Form:
    rule: str
    target: Any
    x: Any
    extra: tuple = ()
    kwargs: tuple = ()           # sorted (key, value) pairs
    inplace: bool = False

    def is_node_canonical(self, node: Node) -> bool:
        return (node.op == "call_function" and node.target is self.target and not self.inplace
                and node.args == (self.x, *self.extra) and dict(node.kwargs) == dict(self.kwargs))


def _is_float(node: Any) -> bool:
    dt = dtype_of(node)
    return dt is not None and dt.is_floating_point


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _clamp_form(x: Any, lo: Any, hi: Any, inplace: bool) -> _Form | None:
    """clamp(x, 0) -> relu, clamp(x, 0, 6) -> relu6 (floating-point tensors only)."""
    if not _is_float(x) or _num(lo) != 0.0:
        return None
    if hi is None:
        return _Form("relu", torch.relu, x, inplace=inplace)
    if _num(hi) == 6.0:
        return _Form("relu6", F.relu6, x, inplace=inplace)
    return None


def _hardtanh_form(x: Any, lo: Any, hi: Any, inplace: bool) -> _Form | None:
    lo, hi = _num(lo), _num(hi)
    if lo is None or hi is None:
        return None
    if (lo, hi) == (0.0, 6.0):
        return _Form("relu6", F.relu6, x, inplace=inplace)
    return _Form("hardtanh", F.hardtanh, x, (lo, hi), inplace=inplace)


def _gelu_form(x: Any, approximate: Any) -> _Form | None:
    if approximate == "none":
        return _Form("gelu", F.gelu, x)
    if approximate == "tanh":
        return _Form("gelu", F.gelu, x, kwargs=(("approximate", "tanh"),))
    return None


def _module_activation(mod: nn.Module, x: Any) -> _Form | None:
    t = type(mod)
    inplace = getattr(mod, "inplace", False) is True
    if t is nn.ReLU:
        return _Form("relu", torch.relu, x, inplace=inplace)
    if t is nn.ReLU6 or t is nn.Hardtanh:
        return _hardtanh_form(x, mod.min_val, mod.max_val, inplace)
    if t is nn.Sigmoid:
        return _Form("sigmoid", torch.sigmoid, x)
    if t is nn.Tanh:
        return _Form("tanh", torch.tanh, x)
    if t is nn.Hardsigmoid:
        return _Form("hardsigmoid", F.hardsigmoid, x, inplace=inplace)
    if t is nn.Hardswish:
        return _Form("hardswish", F.hardswish, x, inplace=inplace)
    if t is nn.SiLU:
        return _Form("silu", F.silu, x, inplace=inplace)
    if t is nn.GELU:
        return _gelu_form(x, mod.approximate)
    if t is nn.LeakyReLU:
        return _Form("leaky-relu", F.leaky_relu, x, (float(mod.negative_slope),), inplace=inplace)
    return None


_IN = ("input",)
_IN_INPLACE = ("input", "inplace")
_NO_INPLACE = {"inplace": False}


def _function_activation(node: Node) -> _Form | None:
    t = node.target
    if t in (torch.relu, torch.relu_) or t is F.relu:
        a = bind(node, _IN_INPLACE, _NO_INPLACE) if t is F.relu else bind(node, _IN)
        if a is None:
            return None
        return _Form("relu", torch.relu, a["input"],
                     inplace=t is torch.relu_ or a.get("inplace") is True)
    if t is F.relu6:
        a = bind(node, _IN_INPLACE, _NO_INPLACE)
        return a and _Form("relu6", F.relu6, a["input"], inplace=a["inplace"] is True)
    if t in (F.hardtanh, F.hardtanh_):
        names = ("input", "min_val", "max_val", "inplace")
        a = bind(node, names, {"min_val": -1.0, "max_val": 1.0, "inplace": False})
        if a is None:
            return None
        return _hardtanh_form(a["input"], a["min_val"], a["max_val"],
                              t is F.hardtanh_ or a["inplace"] is True)
    for fns, rule, canon in (((torch.sigmoid, torch.sigmoid_, F.sigmoid), "sigmoid",
                              torch.sigmoid),
                             ((torch.tanh, torch.tanh_, F.tanh), "tanh", torch.tanh)):
        if t in fns:
            a = bind(node, _IN)
            return a and _Form(rule, canon, a["input"], inplace=t is fns[1])
    for fn, rule in ((F.hardsigmoid, "hardsigmoid"), (F.hardswish, "hardswish"),
                     (F.silu, "silu")):
        if t is fn:
            a = bind(node, _IN_INPLACE, _NO_INPLACE)
            return a and _Form(rule, fn, a["input"], inplace=a["inplace"] is True)
    if t is F.gelu:
        a = bind(node, ("input", "approximate"), {"approximate": "none"})
        return a and _gelu_form(a["input"], a["approximate"])
    if t in (F.leaky_relu, F.leaky_relu_):
        a = bind(node, ("input", "negative_slope", "inplace"),
                 {"negative_slope": 0.01, "inplace": False})
        if a is None or _num(a["negative_slope"]) is None:
            return None
        return _Form("leaky-relu", F.leaky_relu, a["input"], (_num(a["negative_slope"]),),
                     inplace=t is F.leaky_relu_ or a["inplace"] is True)
    if t in (torch.clamp, torch.clip, torch.clamp_, torch.clip_):
        a = bind(node, ("input", "min", "max"), {"min": None, "max": None})
        return a and _clamp_form(a["input"], a["min"], a["max"], t in (torch.clamp_, torch.clip_))
    if t in (torch.clamp_min, torch.clamp_min_):
        a = bind(node, ("input", "min"))
        return a and _clamp_form(a["input"], a["min"], None, t is torch.clamp_min_)
    return None


def _method_activation(node: Node) -> _Form | None:
    name = str(node.target)
    base, inplace = (name[:-1], True) if name.endswith("_") else (name, False)
    if base in ("relu", "sigmoid", "tanh"):
        a = bind(node, ("self",))
        canon = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[base]
        return a and _Form(base, canon, a["self"], inplace=inplace)
    if base in ("clamp", "clip"):
        a = bind(node, ("self", "min", "max"), {"min": None, "max": None})
        return a and _clamp_form(a["self"], a["min"], a["max"], inplace)
    if base == "clamp_min":
        a = bind(node, ("self", "min"))
        return a and _clamp_form(a["self"], a["min"], None, inplace)
    return None


def _activation_form(cx: RewriteContext, node: Node) -> _Form | None:
    if node.op == "call_module":
        if len(node.args) != 1 or node.kwargs:
            return None
        mod = cx.module(node)
        if mod is None:
            return None
        return _module_activation(mod, node.args[0])
    if node.op == "call_function":
        return _function_activation(node)
    if node.op == "call_method":
        return _method_activation(node)
    return None


def _activation_rule(rule: str) -> Callable[[RewriteContext, Node], Thunk | None]:
    def match(cx: RewriteContext, node: Node) -> Thunk | None:
        form = cx.activation_form(node)
        if form is None or form.rule != rule or form.is_node_canonical(node):
            return None
        later: list[Node] = []
        if form.inplace:
            plan = _inplace_plan(cx, node, form.x)
            if plan is None:
                return None
            later = plan

        def rewrite() -> None:
            _become(node, form.target, (form.x, *form.extra), dict(form.kwargs))
            _redirect(form.x, node, later)
        return rewrite
    return match


# -- binary arithmetic ---------------------------------------------------------------------

_BINARY = {  # rule -> (canonical operator, torch functions, methods, in-place operator)
    "add": (operator.add, (torch.add,), ("add",), operator.iadd),
    "sub": (operator.sub, (torch.sub, torch.subtract), ("sub", "subtract"), operator.isub),
    "mul": (operator.mul, (torch.mul, torch.multiply), ("mul", "multiply"), operator.imul),
    "div": (operator.truediv, (torch.div, torch.divide, torch.true_divide),
            ("div", "divide", "true_divide"), operator.itruediv),
}
_NEUTRAL_KWARGS = {"alpha": 1, "rounding_mode": None}


def _binary_rule(rule: str) -> Callable[[RewriteContext, Node], Thunk | None]:
    canon, functions, methods, iop = _BINARY[rule]

    def match(cx: RewriteContext, node: Node) -> Thunk | None:
        inplace = False
        if node.op == "call_function" and node.target in functions:
            pass
        elif node.op == "call_function" and node.target is iop:
            inplace = True
        elif node.op == "call_method" and node.target in methods:
            pass
        elif node.op == "call_method" and str(node.target)[:-1] in methods \
                and str(node.target).endswith("_"):
            inplace = True
        else:
            return None
        if len(node.args) != 2:
            return None
        for k, v in node.kwargs.items():  # alpha=1 / rounding_mode=None only
            if k not in _NEUTRAL_KWARGS or v != _NEUTRAL_KWARGS[k] or \
                    (k == "alpha" and rule not in ("add", "sub")) or \
                    (k == "rounding_mode" and rule != "div"):
                return None
        x, y = node.args
        later: list[Node] = []
        if inplace:
            # x.add_(y) keeps x's dtype; x + y may promote: only rewrite when they agree.
            if isinstance(y, Node) and (dtype_of(y) is None or dtype_of(y) != dtype_of(x)):
                return None
            plan = _inplace_plan(cx, node, x)
            if plan is None:
                return None
            later = plan

        def rewrite() -> None:
            _become(node, canon, (x, y))
            _redirect(x, node, later)
        return rewrite
    return match


# -- concatenation -------------------------------------------------------------------------


def _cat_rule(cx: RewriteContext, node: Node) -> Thunk | None:
    if node.op != "call_function" or node.target not in (torch.cat, torch.concat,
                                                         torch.concatenate):
        return None
    if node.target is torch.concatenate:
        a = bind(node, ("tensors", "axis"), {"axis": 0})
        dim = a and a["axis"]
    else:
        a = bind(node, ("tensors", "dim"), {"dim": 0})
        dim = a and a["dim"]
    if a is None or not isinstance(a["tensors"], (list, tuple)) or not isinstance(dim, int):
        return None
    shape = shape_of(node)
    if shape is not None and len(shape) > 0:
        dim = dim % len(shape)
    tensors = list(a["tensors"])
    if node.target is torch.cat and node.args == (tensors, dim) and not node.kwargs \
            and isinstance(node.args[0], list):
        return None
    return lambda: _become(node, torch.cat, (tensors, dim))


# -- flatten -------------------------------------------------------------------------------


def _is_size0_of(v: Any, x: Node) -> bool:
    """``v`` computes ``x.size(0)`` (``x.size(0)``, ``x.size()[0]``, ``x.shape[0]``)."""
    if not isinstance(v, Node):
        return False
    if v.op == "call_method" and v.target == "size":
        a = bind(v, ("self", "dim"), {"dim": None})
        return a is not None and a["self"] is x and a["dim"] == 0
    if v.op == "call_function" and v.target is operator.getitem and len(v.args) == 2 \
            and v.args[1] == 0 and isinstance(v.args[0], Node):
        src = v.args[0]
        if src.op == "call_method" and src.target == "size" and src.args == (x,) \
                and not src.kwargs:
            return True
        return (src.op == "call_function" and src.target is builtins.getattr
                and src.args == (x, "shape"))
    return False


def _flatten_form(cx: RewriteContext, node: Node) -> tuple[Any, int, int] | None:
    """(x, start_dim, end_dim) when ``node`` flattens ``x``."""
    if node.op == "call_module":
        mod = cx.module(node)
        if mod is None:
            return None
        if type(mod) is nn.Flatten and len(node.args) == 1 and not node.kwargs:
            return node.args[0], mod.start_dim, mod.end_dim
        return None
    if (node.op == "call_function" and node.target is torch.flatten) or \
            (node.op == "call_method" and node.target == "flatten"):
        first = "input" if node.op == "call_function" else "self"
        a = bind(node, (first, "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
        if a is None or not isinstance(a["start_dim"], int) or not isinstance(a["end_dim"], int):
            return None
        return a[first], a["start_dim"], a["end_dim"]
    # x.view(x.size(0), -1), x.reshape(-1, C*H*W), torch.reshape(x, (n, -1)) ...
    if node.op == "call_method" and node.target in ("view", "reshape") and node.args:
        x, sizes = node.args[0], node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = tuple(sizes[0])
    elif node.op == "call_function" and node.target is torch.reshape:
        a = bind(node, ("input", "shape"))
        if a is None or not isinstance(a["shape"], (list, tuple)):
            return None
        x, sizes = a["input"], tuple(a["shape"])
    else:
        return None
    if node.op == "call_method" and node.kwargs:
        return None
    in_shape, out_shape = shape_of(x), shape_of(node)
    if not isinstance(x, Node) or in_shape is None or len(in_shape) < 2 or len(sizes) != 2:
        return None
    rest = math.prod(in_shape[1:])
    first, second = sizes
    ok = (_is_size0_of(first, x) and (second == -1 or second == rest)) or \
         (first == -1 and isinstance(second, int) and second == rest and rest > 0)
    if not ok or (out_shape is not None and out_shape != (in_shape[0], rest)):
        return None
    return x, 1, -1


def _flatten_rule(cx: RewriteContext, node: Node) -> Thunk | None:
    form = _flatten_form(cx, node)
    if form is None:
        return None
    x, start, end = form
    shape = shape_of(x)
    if shape is not None:
        rank = len(shape)
        if rank == 0:
            return None
        start, end = start % rank, end % rank
        if start >= end:
            return None  # flattens nothing: not a flatten worth a canonical form
        args = (x, start) if end == rank - 1 else (x, start, end)
    else:
        args = (x, start) if end == -1 else (x, start, end)
    if node.op == "call_function" and node.target is torch.flatten and node.args == args \
            and not node.kwargs:
        return None
    old_inputs = list(node.all_input_nodes)

    def rewrite() -> None:
        _become(node, torch.flatten, args)
        _erase_dead_helpers(old_inputs)
    return rewrite


# -- no-ops: nn.Identity, dropout in eval mode -----------------------------------------------

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                      F.feature_alpha_dropout)
_DROPOUT_F_NAMES = ("input", "p", "training", "inplace")
_DROPOUT_TORCH = (torch.dropout, torch.alpha_dropout, torch.feature_dropout,
                  torch.feature_alpha_dropout)


def _identity_rule(cx: RewriteContext, node: Node) -> Thunk | None:
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    mod = cx.module(node)
    if mod is None:
        return None
    if type(mod) is not nn.Identity:
        return None
    return lambda: _forward_to_input(node, node.args[0])


def _dropout_rule(cx: RewriteContext, node: Node) -> Thunk | None:
    x = None
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        mod = cx.module(node)
        if mod is None:
            return None
        if type(mod) in _DROPOUT_MODULES and not mod.training:
            x = node.args[0]
    elif node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        # F.dropout's training flag defaults to True: only an explicit False is a no-op.
        a = bind(node, _DROPOUT_F_NAMES, {"p": 0.5, "training": True, "inplace": False})
        if a is not None and a["training"] is False:
            x = a["input"]
    elif node.op == "call_function" and node.target in _DROPOUT_TORCH:
        a = bind(node, ("input", "p", "train"))
        if a is not None and a["train"] is False:
            x = a["input"]
    if x is None:
        return None
    return lambda: _forward_to_input(node, x)


# --------------------------------------------------------------------------------------------

RULES: tuple[Rule, ...] = (
    Rule("identity", "nn.Identity() -> its input", _identity_rule),
    Rule("dropout", "nn.Dropout*/F.dropout*(training=False)/torch.dropout(train=False) in eval "
                    "mode -> its input", _dropout_rule),
    Rule("relu", "nn.ReLU, F.relu, x.relu(), relu_, inplace=True, clamp(min=0) -> torch.relu",
         _activation_rule("relu")),
    Rule("relu6", "nn.ReLU6, F.relu6, hardtanh(0, 6), clamp(0, 6) -> F.relu6",
         _activation_rule("relu6")),
    Rule("hardtanh", "nn.Hardtanh(a, b), F.hardtanh(..., inplace) -> F.hardtanh(x, a, b)",
         _activation_rule("hardtanh")),
    Rule("sigmoid", "nn.Sigmoid, F.sigmoid, x.sigmoid(), sigmoid_ -> torch.sigmoid",
         _activation_rule("sigmoid")),
    Rule("tanh", "nn.Tanh, F.tanh, x.tanh(), tanh_ -> torch.tanh", _activation_rule("tanh")),
    Rule("hardsigmoid", "nn.Hardsigmoid, F.hardsigmoid(inplace) -> F.hardsigmoid",
         _activation_rule("hardsigmoid")),
    Rule("hardswish", "nn.Hardswish, F.hardswish(inplace) -> F.hardswish",
         _activation_rule("hardswish")),
    Rule("silu", "nn.SiLU, F.silu(inplace) -> F.silu", _activation_rule("silu")),
    Rule("gelu", "nn.GELU(approximate) -> F.gelu(x[, approximate='tanh'])",
         _activation_rule("gelu")),
    Rule("leaky-relu", "nn.LeakyReLU(s), F.leaky_relu(inplace) -> F.leaky_relu(x, s)",
         _activation_rule("leaky-relu")),
    Rule("flatten", "nn.Flatten, x.flatten(), x.view(x.size(0), -1), x.reshape(-1, C*H*W) -> "
                    "torch.flatten(x, start[, end])", _flatten_rule),
    Rule("add", "torch.add, x.add(), x.add_(), operator.iadd -> operator.add", _binary_rule("add")),
    Rule("sub", "torch.sub, x.sub(), x.sub_(), operator.isub -> operator.sub", _binary_rule("sub")),
    Rule("mul", "torch.mul, x.mul(), x.mul_(), operator.imul -> operator.mul", _binary_rule("mul")),
    Rule("div", "torch.div, x.div(), x.div_(), operator.itruediv -> operator.truediv",
         _binary_rule("div")),
    Rule("cat", "torch.concat, torch.concatenate, cat(dim=...) -> torch.cat(list, dim >= 0)",
         _cat_rule),
)


def _stat_key(rule: str) -> str:
    return "num_" + rule.replace("-", "_")


def find_rewrites(gm: torch.fx.GraphModule,
                  rules: tuple[Rule, ...] = RULES) -> list[tuple[Node, Rule, Thunk]]:
    """Every (node, first matching rule, thunk) in graph order; mutates nothing."""
    out = []
    cx = RewriteContext(gm)
    for node in gm.graph.nodes:
        for rule in rules:
            thunk = rule.match(cx, node)
            if thunk is not None:
                out.append((node, rule, thunk))
                break
    return out


def rewrite_to_fixpoint(gm: torch.fx.GraphModule, rules: tuple[Rule, ...] = RULES,
                        max_sweeps: int = MAX_SWEEPS) -> Counter[str]:
    """Apply ``rules`` until none matches; returns hits per rule name."""
    hits: Counter[str] = Counter()
    cx = RewriteContext(gm)  # canonicalization adds and removes no submodule
    for _ in range(max_sweeps):
        changed = False
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or getattr(node, "_erased", False):
                continue
            for rule in rules:
                thunk = rule.match(cx, node)
                if thunk is not None:
                    thunk()
                    cx.changed()
                    hits[rule.name] += 1
                    changed = True
                    break
        if not changed:
            return hits
    raise PassFailure(f"canonicalization did not reach a fixpoint in {max_sweeps} sweeps "
                      f"(rule hits so far: {dict(hits)}); this is a bug in a rewrite rule")


@register_pass
class CanonicalizePass(Pass):
    """Rewrite equivalent operator spellings to one canonical form.

    Later pattern passes then match one form per operation. Canonical forms are ``call_function``
    nodes on public torch callables, never modules: they are stateless, carry their parameters
    visibly in ``args`` (hardtanh bounds, gelu approximation), need no submodule, and are what the
    functional spellings (``F.relu``, ``x + y``) already trace to. Out-of-place always:

    - activations: ``torch.relu``, ``F.relu6`` (also hardtanh(0, 6), clamp(0, 6)),
      ``F.hardtanh(x, lo, hi)``, ``torch.sigmoid``, ``torch.tanh``, ``F.hardsigmoid``,
      ``F.hardswish``, ``F.silu``, ``F.gelu(x[, approximate='tanh'])``,
      ``F.leaky_relu(x, slope)``; ``clamp(min=0)`` becomes ``torch.relu``;
    - ``torch.flatten(x, start[, end])`` with non-negative dims, from ``nn.Flatten``,
      ``x.flatten``, and ``x.view/reshape(x.size(0), -1)`` or ``(-1, C*H*W)`` where the traced
      shapes prove it is a flatten from dim 1;
    - ``operator.add/sub/mul/truediv`` from ``torch.add`` (alpha=1), ``x.add``, ``x.add_``,
      ``operator.iadd`` and the like;
    - ``torch.cat(list, dim)`` from ``torch.concat``/``torch.concatenate``/keyword forms;
    - ``nn.Identity`` and eval-mode dropout are removed.

    The rule table is ``RULES``; statistics count hits per rule (``num_relu``...) and in total
    (``num_rewrites``).

    Requires: -. Establishes: canonical. Preserves: nothing.

    Example: graph(canonicalize,fold-batch-norm,dce)

    Rationale:
    - An in-place op (``relu_``, ``inplace=True``, ``x += y`` as ``iadd``) becomes out-of-place
      only when its operand is a fresh tensor (made by a computing op, not an input, attribute
      or view) that no earlier user aliases; later readers of the operand are redirected to the
      result. Otherwise the mutation is observable elsewhere and the node is left as it is.
    - An in-place binary op is rewritten only when both operands have the same dtype: ``x + y``
      could promote where ``x.add_(y)`` keeps ``x``'s dtype.
    - ``clamp`` becomes relu/relu6 only on floating-point tensors.
    - ``view``/``reshape`` become flatten only when the traced shapes prove it; a constant
      batch size (``x.view(1, -1)``) is left alone because it is not a flatten for other batches.
    - Dropout is removed only in eval mode (module ``training`` False, or an explicit
      ``training=False``); ``F.dropout``'s default ``training=True`` keeps it.
    - Module subclasses are left alone (exact types only): their forward may differ.
    """
    name = "canonicalize"
    summary = "Rewrite equivalent operator spellings to one canonical form"
    establishes = frozenset({"canonical"})
    preserves = PreservedAnalyses.none()

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        hits = rewrite_to_fixpoint(gm)
        stats = {_stat_key(r.name): hits.get(r.name, 0) for r in RULES}
        stats["num_rewrites"] = sum(hits.values())
        return PassResult(modified=bool(hits), stats=stats)


def check_canonical(gm: torch.fx.GraphModule) -> list[str]:
    """Checker of ``canonical``: every node a canonicalization rule would still rewrite."""
    return [f"node '{node.name}' is not canonical (rule '{rule.name}': {rule.doc})"
            for node, rule, _ in find_rewrites(gm)]


__all__ = ["RULES", "CanonicalizePass", "Rule", "check_canonical", "find_rewrites",
           "rewrite_to_fixpoint"]
