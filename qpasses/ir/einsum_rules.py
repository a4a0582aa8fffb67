"""Canonicalization of two-operand ``torch.einsum`` matrix products (the ``einsum`` rule).

A ``torch.einsum(equation, a, b)`` (or ``torch.einsum(equation, [a, b])``) is a *(batched) matrix
product* when every index of its equation is one of

- a **batch** index: in ``a``, in ``b`` and in the output;
- a **contracted** index: in ``a`` and in ``b``, not in the output (at least one is required);
- a **free** index of ``a`` (in ``a`` and the output, not in ``b``) or of ``b`` (in ``b`` and the
  output, not in ``a``),

no index repeats within one operand or the output, and batch and contracted indices have the same
size in both operands (from the traced shapes). Such an einsum is rewritten to::

    lhs = a.permute(batch, free_a, contracted)   -> flatten free_a and contracted to one dim each
    rhs = b.permute(batch, contracted, free_b)   -> flatten contracted and free_b to one dim each
    out = torch.matmul(lhs, rhs)                 # (batch..., prod(free_a), prod(free_b))
          -> reshape(batch..., free_a..., free_b...) -> permute to the equation's output order

so both operands become an ordinary act x act product (:mod:`qpasses.ir.act_products`). An empty
free group is an ``unsqueeze`` of the operand; identity permutes, one-dim flattens and a reshape
that changes nothing (one free index on each side) are not emitted, a permute that swaps two dims
is a ``transpose``. Only ops the integer lowering passes through are used (no ``unflatten``). The
reshape reads the batch sizes with ``out.size(i)`` and gives the first free size as ``-1``, so a
dynamic batch (a batch index, or a free index that carries the model's batch) is not baked in.
The einsum node itself becomes the last op of the chain, so its name, users and ``tensor_meta``
stay; new nodes get theirs from the op run on meta tensors.

Index letters may be any case and be separated by spaces; the output may be implicit (the indices
seen once, in ASCII order, ellipsis first). An ellipsis counts as one index per dim it covers
(aligned to the right); it must cover as many dims in both operands when both have one.

Left alone (:func:`einsum_reason` says why; ``annotate-bitwidths`` reports it as a float island):
one or three or more operands, the sublist form, an index repeated in one term (a trace or a
diagonal), an index in one operand only and not in the output (a sum over one operand), no
contracted index (an outer or elementwise product), sizes that differ between the operands
(broadcasting), ellipses of different lengths, and operands without traced shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx

from qpasses.ir import ops
from qpasses.ir.fx import MetaEmitter, node_shape

__all__ = ["EinsumProduct", "einsum_island_reason", "einsum_product", "einsum_reason",
           "einsum_rule", "parse_einsum"]

Node = torch.fx.Node


def _einsum_args(node: Node) -> tuple[Any, list[Any]] | None:
    """(equation, operands) of a ``torch.einsum`` call node, or None for any other node."""
    if node.op != "call_function" or node.target not in ops.EINSUM_FUNCTIONS or node.kwargs:
        return None
    if not node.args:
        return None
    eq, rest = node.args[0], list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    return eq, rest


def _term(text: str, rank: int, tag: str) -> list[str] | str:
    """The index tokens of one term for a tensor of ``rank`` dims (an ellipsis becomes tokens
    ``...0``, ``...1``, ... aligned right), or a reason string."""
    if text.count("...") > 1:
        return f"{tag} has more than one ellipsis"
    head, ell, tail = text.partition("...")
    for ch in head + tail:
        if not ch.isalpha():
            return f"{tag} has the index character {ch!r}"
    n_ell = rank - len(head) - len(tail)
    if (ell and n_ell < 0) or (not ell and n_ell != 0):
        return f"{tag} '{text}' does not match the operand's rank {rank}"
    return list(head) + [f"...{i}" for i in range(n_ell if ell else 0)] + list(tail)


def parse_einsum(equation: str, shapes: list[tuple[int, ...]]
                 ) -> tuple[list[list[str]], list[str]] | str:
    """(index tokens of each operand, of the output) of ``equation`` for operands of ``shapes``,
    or a reason string when it cannot be read."""
    eq = equation.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        return f"it names {len(terms)} operand(s) for {len(shapes)} tensor(s)"
    toks: list[list[str]] = []
    for i, (t, s) in enumerate(zip(terms, shapes)):
        r = _term(t, len(s), f"operand {i}")
        if isinstance(r, str):
            return r
        toks.append(r)
    n_ell = {sum(tok.startswith("...") for tok in t)
             for t, term in zip(toks, terms) if "..." in term}
    if len(n_ell) > 1:
        return "its ellipses cover different numbers of dims (broadcasting)"
    ell = [f"...{i}" for i in range(max(n_ell, default=0))]
    if arrow:
        head, has_ell, tail = out.partition("...")
        if out.count("...") > 1 or any(not ch.isalpha() for ch in head + tail):
            return f"its output '{out}' is malformed"
        out_toks = list(head) + (ell if has_ell else []) + list(tail)
    else:
        seen = [tok for t in toks for tok in t if not tok.startswith("...")]
        out_toks = ell + sorted(ch for ch in set(seen) if seen.count(ch) == 1)
    return toks, out_toks


@dataclass(frozen=True)
class EinsumProduct:
    """The matmul form of an einsum: index groups and the operands' permutations."""
    a: Node
    b: Node
    batch: tuple[str, ...]
    free_a: tuple[str, ...]
    contracted: tuple[str, ...]
    free_b: tuple[str, ...]
    a_perm: tuple[int, ...]
    b_perm: tuple[int, ...]
    free_a_sizes: tuple[int, ...]
    free_b_sizes: tuple[int, ...]
    out_perm: tuple[int, ...]


def _classify(node: Node) -> EinsumProduct | str:
    """The product form of an einsum node, or why it is not one."""
    got = _einsum_args(node)
    if got is None:
        return "not a torch.einsum call"
    eq, operands = got
    if not isinstance(eq, str):
        return "its equation is not a constant string (sublist form)"
    if len(operands) != 2:
        return f"it has {len(operands)} operand(s), not 2"
    a, b = operands
    if not (isinstance(a, Node) and isinstance(b, Node)):
        return "an operand is not a tensor computed by the graph"
    sa, sb = node_shape(a), node_shape(b)
    if sa is None or sb is None or node_shape(node) is None:
        return "an operand has no traced shape"
    parsed = parse_einsum(eq, [sa, sb])
    if isinstance(parsed, str):
        return parsed
    (ta, tb), to = parsed
    for tag, t in (("operand 0", ta), ("operand 1", tb), ("the output", to)):
        dup = sorted({x for x in t if t.count(x) > 1})
        if dup:
            return f"{tag} repeats index {dup[0]!r} (a trace or diagonal)"
    for x in to:
        if x not in ta and x not in tb:
            return f"output index {x!r} is in no operand"
    for x in ta + tb:
        if x not in to and (x not in ta or x not in tb):
            return (f"index {x!r} is in one operand only and not in the output "
                    f"(a sum over one operand)")
    size = {}
    for t, s in ((ta, sa), (tb, sb)):
        for x, n in zip(t, s):
            if size.setdefault(x, n) != n:
                return f"index {x!r} has sizes {size[x]} and {n} (broadcasting)"
    batch = tuple(x for x in to if x in ta and x in tb)
    free_a = tuple(x for x in to if x in ta and x not in tb)
    free_b = tuple(x for x in to if x in tb and x not in ta)
    contracted = tuple(x for x in ta if x in tb and x not in to)
    if not contracted:
        return "it contracts no index (an outer or elementwise product)"
    res = batch + free_a + free_b
    return EinsumProduct(
        a=a, b=b, batch=batch, free_a=free_a, contracted=contracted, free_b=free_b,
        a_perm=tuple(ta.index(x) for x in batch + free_a + contracted),
        b_perm=tuple(tb.index(x) for x in batch + contracted + free_b),
        free_a_sizes=tuple(size[x] for x in free_a), free_b_sizes=tuple(size[x] for x in free_b),
        out_perm=tuple(res.index(x) for x in to))


def einsum_product(node: Node) -> EinsumProduct | None:
    """The matmul form of a two-operand einsum matrix product; None for any other node."""
    got = _classify(node)
    return got if isinstance(got, EinsumProduct) else None


def einsum_reason(node: Node) -> str | None:
    """Why the ``einsum`` rule leaves this ``torch.einsum`` node alone (None when it rewrites
    it, or when ``node`` is no einsum)."""
    if _einsum_args(node) is None:
        return None
    got = _classify(node)
    return None if isinstance(got, EinsumProduct) else got


def einsum_island_reason(node: Node) -> str | None:
    """The float-island reason of a ``torch.einsum`` node (None for any other node)."""
    got = _einsum_args(node)
    if got is None:
        return None
    eq = got[0] if isinstance(got[0], str) else "<sublist>"
    why = einsum_reason(node)
    if why is None:
        return (f"torch.einsum '{eq}' is a matrix product but was not rewritten: run canonicalize "
                f"first (it becomes torch.matmul)")
    return f"torch.einsum '{eq}' is not a two-operand matrix product ({why}): no integer kernel"


# --------------------------------------------------------------------------------------------
# The rewrite


def _permute_step(perm: tuple[int, ...]) -> tuple[str, tuple] | None:
    if perm == tuple(range(len(perm))):
        return None
    moved = [i for i, p in enumerate(perm) if p != i]
    if len(moved) == 2:
        return "transpose", tuple(moved)
    return "permute", perm


def _steps(p: EinsumProduct) -> tuple[list[tuple[str, tuple]], list[tuple[str, tuple]],
                                       list[tuple[str, tuple]]]:
    """(steps on a, steps on b, steps on the matmul's result): ``(method, extra args)``."""
    nb, m, k, n = len(p.batch), len(p.free_a), len(p.contracted), len(p.free_b)
    sa: list[tuple[str, tuple]] = []
    sb: list[tuple[str, tuple]] = []
    sr: list[tuple[str, tuple]] = []
    for steps, perm in ((sa, p.a_perm), (sb, p.b_perm)):
        step = _permute_step(perm)
        if step is not None:
            steps.append(step)
    if k > 1:  # a: (batch, free_a, contracted), b: (batch, contracted, free_b)
        sa.append(("flatten", (nb + m, nb + m + k - 1)))
    if m > 1:
        sa.append(("flatten", (nb, nb + m - 1)))
    elif m == 0:
        sa.append(("unsqueeze", (nb,)))
    if n > 1:
        sb.append(("flatten", (nb + k, nb + k + n - 1)))
    if k > 1:
        sb.append(("flatten", (nb, nb + k - 1)))
    if n == 0:
        sb.append(("unsqueeze", (-1,)))
    if (m, n) != (1, 1):  # result: (batch, prod(free_a), prod(free_b)) -> (batch, free_a, free_b)
        free = p.free_a_sizes + p.free_b_sizes
        sr.append(("reshape", (-1, *free[1:]) if free else ()))  # batch sizes: _rewrite
    step = _permute_step(p.out_perm)
    if step is not None:
        sr.append(step)
    return sa, sb, sr


def _rewrite(gm: torch.fx.GraphModule, node: Node, p: EinsumProduct) -> None:
    sa, sb, sr = _steps(p)
    base = node.name
    emit = MetaEmitter(gm, node).emit

    def chain(x: Node, steps: list[tuple[str, tuple]], tag: str) -> Node:
        for i, (method, extra) in enumerate(steps):
            x = emit("call_method", method, (x, *extra), f"{base}_{tag}{i if i else ''}")
        return x

    lhs = chain(p.a, sa, "lhs")
    rhs = chain(p.b, sb, "rhs")
    if not sr:  # the einsum node becomes the matmul
        node.op, node.target, node.args, node.kwargs = "call_function", torch.matmul, (lhs, rhs), {}
        return
    x = emit("call_function", torch.matmul, (lhs, rhs), f"{base}_matmul")
    if sr[0][0] == "reshape":  # the batch sizes, read from the matmul's result
        sizes = tuple(emit("call_method", "size", (x, i), f"{base}_b{i}")
                      for i in range(len(p.batch)))
        sr[0] = ("reshape", sizes + sr[0][1] or ((),))  # () : a 0-d result
    x = chain(x, sr[:-1], "out")
    method, extra = sr[-1]
    node.op, node.target, node.args, node.kwargs = "call_method", method, (x, *extra), {}


def einsum_rule(cx: Any, node: Node) -> Callable[[], None] | None:
    """Matcher of the ``einsum`` canonicalization rule (``cx``: the canonicalization's
    RewriteContext)."""
    p = einsum_product(node) if _einsum_args(node) is not None else None
    if p is None:
        return None
    return lambda: _rewrite(cx.gm, node, p)
