"""Canonicalization rules: rewrite equivalent operator spellings to one canonical form.

Rule-table style (tinygrad's PatternMatcher, kept simple): ``RULES`` is a tuple of
:class:`Rule`; each rule's ``match(cx, node)`` returns a rewrite thunk or None and never mutates
(``cx`` is a :class:`RewriteContext`: the GraphModule, its submodules by name, a memo).
:func:`rewrite_to_fixpoint` applies the first matching rule per node, sweeping the graph until
nothing matches; :func:`check_canonical` (the ``canonical`` property's checker) runs the same
matchers and lists any node that still matches, so "canonical" means exactly "no rule applies".

Canonical forms are ``call_function`` nodes on public torch callables (see the ``canonicalize``
pass, :mod:`qpasses.passes.canonicalize`). Rewrites change a node in place (op, target, args), so
its name, position, users and ``node.meta`` (``tensor_meta`` included) stay; removed no-ops hand
their users to their input.
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

from passes_registry import PassFailure

from qpasses.ir import ops
from qpasses.ir.activation_forms import ActivationForm, activation_form
from qpasses.ir.attention_rules import attention_rule
from qpasses.ir.einsum_rules import einsum_rule
from qpasses.ir.swin_rules import patch_merging_rule, position_bias_rule, window_attention_rule
from qpasses.ir.fx import bind, dtype_of, node_shape

__all__ = ["MAX_SWEEPS", "RULES", "RewriteContext", "Rule", "check_canonical", "find_rewrites",
           "rewrite_to_fixpoint", "rule_stat_key"]

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

    def activation_form(self, node: Node) -> ActivationForm | None:
        if node not in self._forms:
            self._forms[node] = activation_form(self.modules, node)
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
    shape = node_shape(node)
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
    in_shape, out_shape = node_shape(x), node_shape(node)
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
    shape = node_shape(x)
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

_DROPOUT_F_NAMES = ("input", "p", "training", "inplace")


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
        if type(mod) in ops.DROPOUT_MODULES and not mod.training:
            x = node.args[0]
    elif node.op == "call_function" and node.target in ops.DROPOUT_FUNCTIONS:
        # F.dropout's training flag defaults to True: only an explicit False is a no-op.
        a = bind(node, _DROPOUT_F_NAMES, {"p": 0.5, "training": True, "inplace": False})
        if a is not None and a["training"] is False:
            x = a["input"]
    elif node.op == "call_function" and node.target in ops.DROPOUT_TORCH_FUNCTIONS:
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
    Rule("multihead-attention", "nn.MultiheadAttention (no masks, eval) -> q/k/v/out_proj "
                                "nn.Linear, matmul, softmax (qpasses.ir.attention_rules)",
         attention_rule),
    Rule("swin-window-attention", "torchvision shifted_window_attention -> pad/roll/window "
                                  "reshapes, q/k/v/proj nn.Linear, matmul, softmax "
                                  "(qpasses.ir.swin_rules)", window_attention_rule),
    Rule("swin-position-bias", "torchvision _get_relative_position_bias -> table[index] "
                               "reshape/permute (a constant subgraph)", position_bias_rule),
    Rule("swin-patch-merging", "torchvision _patch_merging_pad -> pad, strided slices, cat",
         patch_merging_rule),
    Rule("einsum", "two-operand torch.einsum matrix product -> permute/flatten, torch.matmul, "
                   "unflatten/permute (qpasses.ir.einsum_rules)", einsum_rule),
)


def rule_stat_key(rule: str) -> str:
    """The statistic that counts a rule's hits: ``num_<rule>`` (``-`` as ``_``)."""
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
    cx = RewriteContext(gm)  # the attention rule refreshes cx.modules after adding modules
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


def check_canonical(gm: torch.fx.GraphModule) -> list[str]:
    """Checker of ``canonical``: every node a canonicalization rule would still rewrite."""
    return [f"node '{node.name}' is not canonical (rule '{rule.name}': {rule.doc})"
            for node, rule, _ in find_rewrites(gm)]
