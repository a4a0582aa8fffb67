"""Canonicalization of ``nn.MultiheadAttention`` into traced ops (the ``multihead-attention`` rule).

A ``call_module`` on an exact ``nn.MultiheadAttention`` (and the ``getitem`` nodes reading its
``(output, weights)`` tuple) becomes, for batched 3-d inputs::

    q = q_proj(query)  ->  reshape(n, l, H, d)  ->  transpose(1, 2)          # (n, H, l, d)
    k = k_proj(key)    ->  reshape(n, s, H, d)  ->  transpose(1, 2)          # (n, H, s, d)
    v = v_proj(value)  ->  reshape(n, s, H, d)  ->  transpose(1, 2)          # (n, H, s, d)
    scores = torch.matmul(q, k.transpose(-2, -1))                            # (n, H, l, s)
    attn   = torch.softmax(scores, -1)
    out    = out_proj(torch.matmul(attn, v).transpose(1, 2).reshape(n, l, E))
    weights = attn.mean(dim=1)        (average_attn_weights)   or   attn (per head)

with ``n``, ``l``, ``s`` read by ``x.size(...)`` so the batch size stays dynamic. With
``batch_first=False`` the inputs are transposed to batch-first before the projections (so each
projection is a linear layer over ``(n, tokens, E)``, the layout the cost model counts per sample)
and the output is transposed back; the weights are ``(n, l, s)`` either way, like torch's.

The projections are three plain ``nn.Linear`` modules ``q_proj``, ``k_proj``, ``v_proj`` (rows of
``in_proj_weight``/``in_proj_bias``, or ``q/k/v_proj_weight`` when the key/value dims differ) and
``out_proj`` a plain ``nn.Linear`` (torch's NonDynamicallyQuantizableLinear swapped out), installed
in a fresh container at the module's own path (``...self_attention.q_proj``). Three separate
projections, not one ``3E`` linear and a chunk, so that each is one chain linear -> reshape ->
transpose -> quantizer. **The softmax scale 1/sqrt(head_dim) is folded into q_proj's weight
and bias** (``(x W^T + b)·c = x (c W)^T + c b``), so ``scores`` needs no extra multiply. The
weights are copies: the user's module is never written.

Left as a leaf (:func:`undecomposed_reason` says why; ``annotate-bitwidths`` reports it as a float
island): masks (``attn_mask``, ``key_padding_mask``, ``is_causal``), ``add_bias_kv``,
``add_zero_attn``, training mode with ``dropout > 0``, unbatched (2-d) inputs, non-constant
``need_weights``/``average_attn_weights``, a tuple read otherwise than by ``[0]``/``[1]``, the
weights read while ``need_weights=False``, subclasses of ``nn.MultiheadAttention``, and a module
also read by ``get_attr`` or called elsewhere with one of these.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.fx
from torch import nn

from qpasses.ir.fx import MetaEmitter, bind, node_shape, submodule_or_none

__all__ = ["MHA_ARGS", "attention_rule", "undecomposed_reason"]

Node = torch.fx.Node
MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
            "average_attn_weights", "is_causal")
_MHA_DEFAULTS = {"key_padding_mask": None, "need_weights": True, "attn_mask": None,
                 "average_attn_weights": True, "is_causal": False}


def _module_reason(mod: nn.MultiheadAttention) -> str | None:
    if type(mod) is not nn.MultiheadAttention:
        return f"{type(mod).__qualname__} subclasses nn.MultiheadAttention (its forward may differ)"
    if mod.bias_k is not None or mod.bias_v is not None:
        return "add_bias_kv=True is not decomposed"
    if mod.add_zero_attn:
        return "add_zero_attn=True is not decomposed"
    if mod.training and mod.dropout > 0:
        return f"training mode with dropout={mod.dropout} is not decomposed (call .eval())"
    return None


def _call_reason(node: Node) -> tuple[str | None, dict[str, Any] | None]:
    """(why this call cannot be decomposed or None, its bound arguments)."""
    a = bind(node, MHA_ARGS, _MHA_DEFAULTS)
    if a is None:
        return "its call does not fit nn.MultiheadAttention.forward's signature", None
    for mask in ("attn_mask", "key_padding_mask"):
        if a[mask] is not None:
            return f"{mask} is given (masked attention is not decomposed)", a
    if a["is_causal"] is not False:
        return "is_causal is set (masked attention is not decomposed)", a
    for flag in ("need_weights", "average_attn_weights"):
        if not isinstance(a[flag], bool):
            return f"{flag} is not a constant bool", a
    for x in ("query", "key", "value"):
        shape = node_shape(a[x])
        if not isinstance(a[x], Node) or shape is None or len(shape) != 3:
            return f"{x} is not a batched 3-d tensor with a traced shape", a
    for u in node.users:
        if not (u.op == "call_function" and u.target is operator.getitem and len(u.args) == 2
                and u.args[1] in (0, 1) and not u.kwargs):
            return f"its result is read by '{u.name}', not as out[0] / out[1]", a
        if u.args[1] == 1 and u.users and not a["need_weights"]:
            return "its weights (out[1], None with need_weights=False) are read", a
    return None, a


def undecomposed_reason(gm: torch.fx.GraphModule, node: Node) -> str | None:
    """Why the ``multihead-attention`` rule leaves this call of an nn.MultiheadAttention alone
    (None when it would decompose it, or when ``node`` does not call one)."""
    if node.op != "call_module":
        return None
    mod = submodule_or_none(gm, str(node.target))
    if not isinstance(mod, nn.MultiheadAttention):
        return None
    why = _module_reason(mod)
    if why is None:
        why = _call_reason(node)[0]
    if why is None:
        why = _shared_reason(gm, node)
    return None if why is None else f"nn.MultiheadAttention not decomposed: {why}"


def _shared_reason(gm: torch.fx.GraphModule, node: Node) -> str | None:
    target = str(node.target)
    for n in gm.graph.nodes:
        if n.op == "get_attr" and (str(n.target) + ".").startswith(target + "."):
            return f"its parameters are also read by get_attr '{n.name}'"
        if n.op == "call_module" and n is not node and str(n.target) == target \
                and _call_reason(n)[0] is not None:
            return f"it is also called by '{n.name}', which cannot be decomposed"
    return None


# --------------------------------------------------------------------------------------------
# New modules


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, scale: float = 1.0) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight.detach() * scale)
        if bias is not None:
            lin.bias.copy_(bias.detach() * scale)
    lin.weight.requires_grad_(weight.requires_grad)
    if bias is not None:
        lin.bias.requires_grad_(bias.requires_grad)
    return lin.train(False)


def _projections(mod: nn.MultiheadAttention) -> nn.Module:
    """A container with plain nn.Linear q_proj/k_proj/v_proj/out_proj (copies of the weights;
    1/sqrt(head_dim) folded into q_proj)."""
    e = mod.embed_dim
    scale = 1.0 / math.sqrt(mod.head_dim)
    if mod._qkv_same_embed_dim:
        wq, wk, wv = mod.in_proj_weight.chunk(3, dim=0)
    else:
        wq, wk, wv = mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight
    b = mod.in_proj_bias
    bq, bk, bv = (b[:e], b[e:2 * e], b[2 * e:]) if b is not None else (None, None, None)
    box = nn.Module()
    box.q_proj = _linear(wq, bq, scale)
    box.k_proj = _linear(wk, bk)
    box.v_proj = _linear(wv, bv)
    box.out_proj = _linear(mod.out_proj.weight, mod.out_proj.bias)
    return box.train(False)


# --------------------------------------------------------------------------------------------
# Emitting nodes with shapes


def _decompose(gm: torch.fx.GraphModule, node: Node, a: dict[str, Any], mod: nn.MultiheadAttention,
               path: str) -> None:
    base = node.name
    shapes_known = all(node_shape(a[x]) is not None for x in ("query", "key", "value"))
    em = MetaEmitter(gm, node, shapes_known)
    h, d, e = mod.num_heads, mod.head_dim, mod.embed_dim

    def batch_first(x: Node, tag: str, done: dict[Node, Node]) -> Node:
        if mod.batch_first:
            return x
        if x not in done:
            done[x] = em.emit("call_method", "transpose", (x, 0, 1), f"{base}_{tag}_bf")
        return done[x]

    done: dict[Node, Node] = {}
    q_in = batch_first(a["query"], "query", done)
    k_in = batch_first(a["key"], "key", done)
    v_in = batch_first(a["value"], "value", done)
    n = em.emit("call_method", "size", (q_in, 0), f"{base}_n")
    ln = em.emit("call_method", "size", (q_in, 1), f"{base}_l")
    s = ln if k_in is q_in else em.emit("call_method", "size", (k_in, 1), f"{base}_s")

    def heads(x: Node, which: str, tokens: Node) -> Node:
        p = em.linear(f"{path}.{which}_proj", x, f"{base}_{which}_proj")
        r = em.emit("call_method", "reshape", (p, n, tokens, h, d), f"{base}_{which}_heads")
        return em.emit("call_method", "transpose", (r, 1, 2), f"{base}_{which}")

    q, k, v = heads(q_in, "q", ln), heads(k_in, "k", s), heads(v_in, "v", s)
    kt = em.emit("call_method", "transpose", (k, -2, -1), f"{base}_kt")
    scores = em.emit("call_function", torch.matmul, (q, kt), f"{base}_scores")
    attn = em.emit("call_function", torch.softmax, (scores, -1), f"{base}_attn")
    ctx = em.emit("call_function", torch.matmul, (attn, v), f"{base}_context")
    ctx_t = em.emit("call_method", "transpose", (ctx, 1, 2), f"{base}_context_t")
    merged = em.emit("call_method", "reshape", (ctx_t, n, ln, e), f"{base}_merged")
    out = em.linear(f"{path}.out_proj", merged, f"{base}_out_proj")
    if not mod.batch_first:
        out = em.emit("call_method", "transpose", (out, 0, 1), f"{base}_out")
    weights: Node | None = None
    for u in list(node.users):
        if u.args[1] == 0:
            u.replace_all_uses_with(out)
        elif u.users:  # need_weights=True (checked by the matcher)
            if weights is None:
                weights = (em.emit("call_method", "mean", (attn, 1), f"{base}_weights")
                           if a["average_attn_weights"] else attn)
            u.replace_all_uses_with(weights)
        gm.graph.erase_node(u)
    gm.graph.erase_node(node)


# --------------------------------------------------------------------------------------------
# The rule


def attention_rule(cx: Any, node: Node) -> Callable[[], None] | None:
    """Matcher of the ``multihead-attention`` canonicalization rule (``cx``: the
    canonicalization's RewriteContext)."""
    if node.op != "call_module":
        return None
    mod = cx.module(node)
    if not isinstance(mod, nn.MultiheadAttention) or _module_reason(mod) is not None:
        return None
    why, a = _call_reason(node)
    if why is not None or a is None or _shared_reason(cx.gm, node) is not None:
        return None
    path = str(node.target)

    def rewrite() -> None:
        gm = cx.gm
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == path]
        gm.set_submodule(path, _projections(mod))  # the graph's own container; mod is untouched
        for call in calls:
            _decompose(gm, call, _call_reason(call)[1], mod, path)
        cx.modules = dict(gm.named_modules())
    return rewrite
