"""Canonicalization of torchvision's Swin functions into traced ops (the ``swin-*`` rules).

torchvision ``torch.fx.wrap``s three functions, so a symbolic trace keeps each as one opaque
``call_function`` whose weights arrive as ``get_attr`` arguments (nothing inside is quantized):

- ``shifted_window_attention`` (``swin-window-attention``) becomes, with the traced input shape
  ``(B, H, W, C)`` specializing the function's Python shape logic exactly as it runs::

      x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))             # only when H or W is not a multiple
      x = torch.roll(x, (-s0, -s1), (1, 2))                # only when the shift is kept
      x = x.reshape(-1, Hp/w0, w0, Wp/w1, w1, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, N, C)
      q/k/v = qkv.q(x) / qkv.k(x) / qkv.v(x)  -> reshape(-1, N, h, d) -> transpose(1, 2)
      attn = torch.matmul(q, k.transpose(-2, -1)) + relative_position_bias
      attn = (attn.reshape(-1, nW, h, N, N) + shift_mask).reshape(-1, h, N, N)   # shifted
      attn = torch.softmax(attn, -1)
      x = proj(torch.matmul(attn, v).transpose(1, 2).reshape(-1, N, C))
      x = x.reshape(-1, Hp/w0, Wp/w1, w0, w1, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, Hp, Wp, C)
      x = torch.roll(x, (s0, s1), (1, 2))                  # shifted
      x = x[:, :H, :W, :]                                  # padded

  (``N = w0·w1`` tokens per window, ``nW`` windows per image; a shift is set to 0 where the window
  covers the padded input, like the function does). The module whose ``.weight``/``.bias`` the
  call reads as ``qkv_weight`` (``...attn.qkv``, an ``nn.Linear``; a plain container of the two
  tensors in a traced GraphModule) is replaced, in the graph's own module tree, by a container of
  three plain ``nn.Linear`` ``q``/``k``/``v`` (its row blocks, copies) with **the softmax scale
  ``d^-0.5`` folded into ``q``**, and ``proj`` by a plain ``nn.Linear`` copy. The shift mask (0
  within a region, -100 across regions) depends only on shapes: it is computed now and stored as
  a buffer
  ``shift_mask`` on the calling module. Swin V2's cosine attention (``logit_scale`` given) becomes
  ``F.normalize(q, dim=-1)``, ``F.normalize(k, dim=-1)``, their matmul, times
  ``torch.clamp(logit_scale, max=log 100).exp()`` (a constant subgraph); the key bias block is
  zeroed in the ``k`` copy, as the function does.
- ``_get_relative_position_bias`` (``swin-position-bias``) becomes
  ``table[index].reshape(N, N, -1).permute(2, 0, 1).unsqueeze(0)``: a constant subgraph (the
  lowering evaluates it once).
- ``_patch_merging_pad`` (``swin-patch-merging``) becomes ``F.pad`` (odd sizes only), four strided
  slices and ``torch.cat(..., -1)``.

The batch dimension stays dynamic (``-1`` in every reshape). Left alone (and reported as float
islands by the lowering): calls without a traced 4-d (3-d for the patch merging) input shape,
training mode with non-zero dropout, weights not read as ``<linear>.weight``/``.bias`` of an
``nn.Linear`` or read elsewhere too, non-constant window/shift/head arguments.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from qpasses.ir.fx import MetaEmitter, bind, dtype_of, graph_device, node_shape

__all__ = ["SWIN_ATTENTION_ARGS", "patch_merging_rule", "position_bias_rule",
           "window_attention_rule", "window_attention_reason"]

Node = torch.fx.Node
SWIN_ATTENTION_ARGS = ("input", "qkv_weight", "proj_weight", "relative_position_bias",
                       "window_size", "num_heads", "shift_size", "attention_dropout", "dropout",
                       "qkv_bias", "proj_bias", "logit_scale", "training")
_DEFAULTS = {"attention_dropout": 0.0, "dropout": 0.0, "qkv_bias": None, "proj_bias": None,
             "logit_scale": None, "training": True}


def _tv_function(node: Node, name: str) -> bool:
    t = node.target
    return node.op == "call_function" and getattr(t, "__name__", None) == name and \
        getattr(t, "__module__", "") == "torchvision.models.swin_transformer"


# --------------------------------------------------------------------------------------------
# Emitting nodes with shapes


# --------------------------------------------------------------------------------------------
# shifted_window_attention


def _linear_path(gm: torch.fx.GraphModule, w: Any, b: Any) -> str | None:
    """The module path ``P`` when the get_attr nodes ``w``/``b`` read ``P.weight`` (2-d) and
    ``P.bias`` (or ``b`` is None). ``P`` is an ``nn.Linear`` in the user's model; in a traced
    GraphModule it may be a plain container holding the two tensors."""
    if not (isinstance(w, Node) and w.op == "get_attr" and str(w.target).endswith(".weight")):
        return None
    path = str(w.target)[:-len(".weight")]
    try:
        owner = gm.get_submodule(path)
    except AttributeError:
        return None
    weight = getattr(owner, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if b is None:
        return path
    if isinstance(b, Node) and b.op == "get_attr" and str(b.target) == f"{path}.bias" and \
            isinstance(getattr(owner, "bias", None), torch.Tensor):
        return path
    return None


def _linear_of(owner: nn.Module, bias: bool, rows: slice | None = None, scale: float = 1.0,
               zero_bias: bool = False) -> nn.Linear:
    """A plain nn.Linear copying ``owner.weight[rows]`` (times ``scale``) and its bias."""
    w = owner.weight if rows is None else owner.weight[rows]
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.detach() * scale)
        if bias:
            b = owner.bias if rows is None else owner.bias[rows]
            lin.bias.copy_(torch.zeros_like(b) if zero_bias else b.detach() * scale)
    lin.weight.requires_grad_(owner.weight.requires_grad)
    if bias:
        lin.bias.requires_grad_(owner.bias.requires_grad)
    return lin.train(False)


def _reason(gm: torch.fx.GraphModule, node: Node) -> tuple[str | None, dict[str, Any] | None]:
    a = bind(node, SWIN_ATTENTION_ARGS, _DEFAULTS)
    if a is None:
        return "its call does not fit shifted_window_attention's signature", None
    shape = node_shape(a["input"])
    if not isinstance(a["input"], Node) or shape is None or len(shape) != 4:
        return "its input is not a 4-d tensor with a traced shape", a
    ws, ss, h = a["window_size"], a["shift_size"], a["num_heads"]
    if not (isinstance(ws, (list, tuple)) and isinstance(ss, (list, tuple)) and len(ws) == 2
            and len(ss) == 2 and all(isinstance(v, int) for v in (*ws, *ss))
            and isinstance(h, int) and shape[3] % h == 0):
        return "window_size/shift_size/num_heads are not constant ints", a
    if a["training"] is not False and (a["attention_dropout"] or a["dropout"]):
        return "training mode with dropout (call .eval())", a
    if not isinstance(a["relative_position_bias"], Node) or \
            node_shape(a["relative_position_bias"]) is None:
        return "its relative position bias has no traced shape", a
    paths = (_linear_path(gm, a["qkv_weight"], a["qkv_bias"]),
             _linear_path(gm, a["proj_weight"], a["proj_bias"]))
    if None in paths:
        return "its weights are not the .weight/.bias of nn.Linear modules", a
    if paths[0].rpartition(".")[0] != paths[1].rpartition(".")[0]:
        return "its qkv and proj linears are not owned by one module", a
    ls = a["logit_scale"]
    if ls is not None and (not isinstance(ls, Node) or ls.op != "get_attr"):
        return "its logit_scale is not a parameter", a
    if paths[0] == paths[1]:
        return "its qkv and proj weights are the same module's", a
    for n in gm.graph.nodes:
        for p in paths:
            if n.op in ("get_attr", "call_module") and (str(n.target) + ".").startswith(p + ".") \
                    and (n.op == "call_module" or any(u is not node for u in n.users)):
                return f"the module '{p}' is also read by '{n.name}'", a
    return None, a


def window_attention_reason(gm: torch.fx.GraphModule, node: Node) -> str | None:
    """Why ``swin-window-attention`` leaves this call alone (None when it would rewrite it or when
    ``node`` is not a call of torchvision's ``shifted_window_attention``)."""
    if not _tv_function(node, "shifted_window_attention"):
        return None
    return _reason(gm, node)[0]


def _qkv_box(owner: nn.Module, bias: bool, heads: int, cosine: bool) -> nn.Module:
    e = owner.weight.shape[0] // 3
    scale = 1.0 if cosine else (e // heads) ** -0.5
    box = nn.Module()
    box.q = _linear_of(owner, bias, slice(0, e), scale)
    box.k = _linear_of(owner, bias, slice(e, 2 * e), zero_bias=cosine)
    box.v = _linear_of(owner, bias, slice(2 * e, 3 * e))
    return box.train(False)


def _shift_mask(hp: int, wp: int, ws: tuple[int, int], ss: tuple[int, int]) -> torch.Tensor:
    """(1, nW, 1, N, N) mask, as shifted_window_attention builds it."""
    m = torch.zeros(hp, wp)
    count = 0
    for h0, h1 in ((0, -ws[0]), (-ws[0], -ss[0]), (-ss[0], None)):
        for w0, w1 in ((0, -ws[1]), (-ws[1], -ss[1]), (-ss[1], None)):
            m[h0:h1, w0:w1] = count
            count += 1
    nw = (hp // ws[0]) * (wp // ws[1])
    m = m.view(hp // ws[0], ws[0], wp // ws[1], ws[1]).permute(0, 2, 1, 3).reshape(nw, -1)
    d = m.unsqueeze(1) - m.unsqueeze(2)
    d = d.masked_fill(d != 0, -100.0).masked_fill(d == 0, 0.0)
    return d.unsqueeze(1).unsqueeze(0)


def _rewrite_attention(gm: torch.fx.GraphModule, node: Node, a: dict[str, Any]) -> None:
    qkv_path = str(a["qkv_weight"].target)[:-len(".weight")]
    proj_path = str(a["proj_weight"].target)[:-len(".weight")]
    owner_path = qkv_path.rpartition(".")[0]
    b_, hh, ww, c = node_shape(a["input"])
    ws, heads = tuple(a["window_size"]), a["num_heads"]
    ss = list(a["shift_size"])
    cosine = a["logit_scale"] is not None
    pad_r = (ws[1] - ww % ws[1]) % ws[1]
    pad_b = (ws[0] - hh % ws[0]) % ws[0]
    hp, wp = hh + pad_b, ww + pad_r
    if ws[0] >= hp:
        ss[0] = 0
    if ws[1] >= wp:
        ss[1] = 0
    shifted = sum(ss) > 0
    n_tok, n_win, d = ws[0] * ws[1], (hp // ws[0]) * (wp // ws[1]), c // heads

    gm.set_submodule(qkv_path, _qkv_box(gm.get_submodule(qkv_path), a["qkv_bias"] is not None,
                                        heads, cosine))
    gm.set_submodule(proj_path, _linear_of(gm.get_submodule(proj_path), a["proj_bias"] is not None))
    em = MetaEmitter(gm, node)
    base = node.name
    x = a["input"]
    if pad_r or pad_b:
        x = em.emit("call_function", F.pad, (x, (0, 0, 0, pad_r, 0, pad_b)), f"{base}_pad")
    if shifted:
        x = em.emit("call_function", torch.roll, (x, (-ss[0], -ss[1]), (1, 2)), f"{base}_shift")
    x = em.method("reshape", x, -1, hp // ws[0], ws[0], wp // ws[1], ws[1], c)
    x = em.method("permute", x, 0, 1, 3, 2, 4, 5)
    x = em.emit("call_method", "reshape", (x, -1, n_tok, c), f"{base}_windows")

    def head(key: str) -> Node:
        p = em.linear(f"{qkv_path}.{key}", x, f"{base}_{key}_proj")
        r = em.emit("call_method", "reshape", (p, -1, n_tok, heads, d), f"{base}_{key}_heads")
        return em.emit("call_method", "transpose", (r, 1, 2), f"{base}_{key}")

    q, k, v = head("q"), head("k"), head("v")
    if cosine:
        q = em.emit("call_function", F.normalize, (q,), f"{base}_q_norm", {"dim": -1})
        k = em.emit("call_function", F.normalize, (k,), f"{base}_k_norm", {"dim": -1})
    kt = em.emit("call_method", "transpose", (k, -2, -1), f"{base}_kt")
    attn = em.emit("call_function", torch.matmul, (q, kt), f"{base}_scores")
    if cosine:
        ls = em.emit("call_function", torch.clamp, (a["logit_scale"],), f"{base}_logit_clamp",
                     {"max": math.log(100.0)})
        ls = em.emit("call_method", "exp", (ls,), f"{base}_logit_scale")
        attn = em.emit("call_function", operator.mul, (attn, ls), f"{base}_scaled")
    attn = em.emit("call_function", operator.add, (attn, a["relative_position_bias"]),
                   f"{base}_biased")
    if shifted:
        owner = gm.get_submodule(owner_path) if owner_path else gm
        mask = _shift_mask(hp, wp, ws, (ss[0], ss[1])).to(dtype_of(a["input"]) or torch.float32)
        name, i = "shift_mask", 0
        while hasattr(owner, name):
            i += 1
            name = f"shift_mask_{i}"
        owner.register_buffer(name, mask.to(graph_device(gm)))
        m = em.emit("get_attr", f"{owner_path}.{name}" if owner_path else name, (),
                    f"{base}_shift_mask")
        attn = em.emit("call_method", "reshape", (attn, -1, n_win, heads, n_tok, n_tok),
                       f"{base}_per_window")
        attn = em.emit("call_function", operator.add, (attn, m), f"{base}_masked")
        attn = em.emit("call_method", "reshape", (attn, -1, heads, n_tok, n_tok),
                       f"{base}_unmasked")
    attn = em.emit("call_function", torch.softmax, (attn, -1), f"{base}_attn")
    ctx = em.emit("call_function", torch.matmul, (attn, v), f"{base}_context")
    ctx = em.emit("call_method", "transpose", (ctx, 1, 2), f"{base}_context_t")
    ctx = em.emit("call_method", "reshape", (ctx, -1, n_tok, c), f"{base}_merged")
    out = em.linear(proj_path, ctx, f"{base}_proj")
    out = em.method("reshape", out, -1, hp // ws[0], wp // ws[1], ws[0], ws[1], c)
    out = em.method("permute", out, 0, 1, 3, 2, 4, 5)
    out = em.emit("call_method", "reshape", (out, -1, hp, wp, c), f"{base}_unwindowed")
    if shifted:
        out = em.emit("call_function", torch.roll, (out, (ss[0], ss[1]), (1, 2)),
                      f"{base}_unshift")
    if pad_r or pad_b:
        idx = (slice(None), slice(None, hh), slice(None, ww), slice(None))
        out = em.emit("call_function", operator.getitem, (out, idx), f"{base}_unpad")
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    for key in ("qkv_weight", "qkv_bias", "proj_weight", "proj_bias"):
        g = a[key]
        if isinstance(g, Node) and not g.users:
            gm.graph.erase_node(g)


def window_attention_rule(cx: Any, node: Node) -> Callable[[], None] | None:
    """Matcher of ``swin-window-attention`` (``cx``: the canonicalization's RewriteContext)."""
    if not _tv_function(node, "shifted_window_attention"):
        return None
    why, a = _reason(cx.gm, node)
    if why is not None or a is None:
        return None

    def rewrite() -> None:
        _rewrite_attention(cx.gm, node, a)
        cx.modules = dict(cx.gm.named_modules())
    return rewrite


# --------------------------------------------------------------------------------------------
# _get_relative_position_bias and _patch_merging_pad


def position_bias_rule(cx: Any, node: Node) -> Callable[[], None] | None:
    """Matcher of ``swin-position-bias``."""
    if not _tv_function(node, "_get_relative_position_bias") or node.kwargs or len(node.args) != 3:
        return None
    table, index, ws = node.args
    if not (isinstance(table, Node) and isinstance(index, Node) and isinstance(ws, (list, tuple))
            and len(ws) == 2 and all(isinstance(v, int) for v in ws)):
        return None
    if node_shape(table) is None and table.op != "get_attr":
        return None

    def rewrite() -> None:
        em = MetaEmitter(cx.gm, node)
        n_tok = ws[0] * ws[1]
        g = em.emit("call_function", operator.getitem, (table, index), f"{node.name}_gather")
        r = em.emit("call_method", "reshape", (g, n_tok, n_tok, -1), f"{node.name}_pairs")
        p = em.emit("call_method", "permute", (r, 2, 0, 1), f"{node.name}_heads")
        out = em.emit("call_method", "unsqueeze", (p, 0), f"{node.name}_bias")
        node.replace_all_uses_with(out)
        cx.gm.graph.erase_node(node)
    return rewrite


def patch_merging_rule(cx: Any, node: Node) -> Callable[[], None] | None:
    """Matcher of ``swin-patch-merging``."""
    if not _tv_function(node, "_patch_merging_pad") or node.kwargs or len(node.args) != 1:
        return None
    x = node.args[0]
    shape = node_shape(x)
    if not isinstance(x, Node) or shape is None or len(shape) < 3:
        return None

    def rewrite() -> None:
        em = MetaEmitter(cx.gm, node)
        hh, ww = shape[-3], shape[-2]
        y = x
        if hh % 2 or ww % 2:
            y = em.emit("call_function", F.pad, (y, (0, 0, 0, ww % 2, 0, hh % 2)),
                        f"{node.name}_pad")
        parts = []
        for i, (r, c) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
            idx = (Ellipsis, slice(r, None, 2), slice(c, None, 2), slice(None))
            parts.append(em.emit("call_function", operator.getitem, (y, idx),
                                 f"{node.name}_x{i}"))
        out = em.emit("call_function", torch.cat, (parts, len(shape) - 1), f"{node.name}_cat")
        node.replace_all_uses_with(out)
        cx.gm.graph.erase_node(node)
    return rewrite
