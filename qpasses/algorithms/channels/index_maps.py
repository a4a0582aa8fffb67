"""Walk rules for the nodes that only move channels around: concat, split, tuple indexing,
reshape/view, transpose/permute, reductions over other dims and pooling.

Each rule takes the walker and the node, and returns the node's channel state (or makes the
node opaque through ``w.opaque``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx

from qpasses.algorithms.channels.state import (TensorState, TupleState, has_node, normalize_dim,
                                               reshape_mapping, target_name, tuple_shapes)
from qpasses.ir.fx import node_arg, node_shape

if TYPE_CHECKING:
    from qpasses.algorithms.channels.walker import ChannelWalker

__all__ = ["cat", "split", "getitem", "reshape", "permute", "reduce", "pool"]


def cat(w: ChannelWalker, node: torch.fx.Node) -> Any:
    """Concat along the channel dim: offset ranges; along another dim: operands coupled."""
    xs = node_arg(node, 0, "tensors")
    if not isinstance(xs, (list, tuple)) or not xs:
        return w.opaque(node, "cat of a non-list")
    out_shape = node_shape(node)
    if out_shape is None:
        return w.opaque(node, "no shape information")
    d = normalize_dim(node_arg(node, 1, "dim", 0), len(out_shape))
    if d is None:
        return w.opaque(node, "cat with a non-constant dim")
    sts = []
    for x in xs:
        st = w.t(x)
        if st is None and w.is_tensor_attr(x):
            st = w.const_state(x)
        if st is None:
            return w.opaque(node, f"cat of an untracked value '{x}'")
        sts.append(st)
    if any(st.m != 1 or st.rank != len(out_shape) for st in sts):
        return w.opaque(node, "cat of a channel dim split by a view")
    dims = {st.dim for st in sts}
    if dims == {d}:
        w.kinds[node.name] = "cat"
        atoms = np.concatenate([st.atoms for st in sts])
        return TensorState(d, atoms, len(out_shape), tuple(x.name for x in xs),
                           np.arange(atoms.size, dtype=np.int64))
    if len(dims) == 1 and len({st.size for st in sts}) == 1:
        w.kinds[node.name] = "cat-other"
        for st in sts[1:]:
            w.atoms.union_arrays(sts[0].atoms, st.atoms)
        return TensorState(sts[0].dim, sts[0].atoms, len(out_shape))
    return w.opaque(node, "cat of operands with different channel dims")


def split(w: ChannelWalker, node: torch.fx.Node) -> Any:
    """split/chunk along the channel dim: offset ranges; along another dim: every piece keeps
    the channels."""
    x = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("tensor"))
    st = w.t(x)
    shapes = tuple_shapes(node)
    in_shape = node_shape(x)
    if st is None or shapes is None or in_shape is None or any(s is None for s in shapes):
        return w.opaque(node, "split of an untracked tensor")
    if has_node((node.args[1:], node.kwargs)):
        return w.opaque(node, "split with tensor arguments")
    d = normalize_dim(node_arg(node, 2, "dim", 0), len(in_shape))
    if d is None:
        return w.opaque(node, "split with a non-constant dim")
    if st.m != 1:
        return w.opaque(node, "split of a channel dim split by a view")
    if d == st.dim:
        w.kinds[node.name] = "split"
        items: list[TensorState | None] = []
        offsets = []
        off = 0
        for s in shapes:
            n = s[d]
            items.append(TensorState(d, st.atoms[off:off + n], st.rank, (x.name,),
                                     np.arange(off, off + n, dtype=np.int64)))
            offsets.append(off)
            off += n
        return TupleState(items, x.name, offsets)
    w.kinds[node.name] = "split-other"
    return TupleState([TensorState(st.dim, st.atoms, st.rank, (x.name,),
                                   np.arange(st.size, dtype=np.int64))
                       for _ in shapes], x.name, None)


def getitem(w: ChannelWalker, node: torch.fx.Node) -> Any:
    """An item of a split (indexing or slicing a tensor is opaque)."""
    src, idx = node.args[0], node.args[1]
    sst = w.state.get(src.name) if isinstance(src, torch.fx.Node) else None
    if isinstance(sst, TupleState) and isinstance(idx, int):
        w.kinds[node.name] = "getitem"
        it = sst.items[idx]
        if it is None:
            return None
        return TensorState(it.dim, it.atoms, it.rank, it.sources, it.gather)
    return w.opaque(node, "indexing/slicing a tensor")


def reshape(w: ChannelWalker, node: torch.fx.Node, x: Any, st: TensorState | None) -> Any:
    """view/reshape/flatten/squeeze/unsqueeze: the row-major mapping of ``reshape_mapping``."""
    in_shape, out_shape = node_shape(x), node_shape(node)
    if st is None or in_shape is None or out_shape is None:
        return w.opaque(node, "reshape of an untracked tensor or without shapes")
    mp = reshape_mapping(in_shape, st.dim, tuple(st.atoms.shape), out_shape)
    if mp is None:
        return w.opaque(node, f"reshape {list(in_shape)} -> {list(out_shape)} mixes the "
                        "channel dim with others")
    d2, block, gather = mp
    atoms = st.atoms.reshape(-1)[gather].reshape(block)
    if len(block) > 1:
        # a view splitting the channel dim: keep pruning rectangular (whole slices along the
        # last axis), so the view's size arguments stay valid after pruning
        flat = atoms.reshape(-1, block[-1])
        for col in range(block[-1]):
            first = int(flat[0, col])
            for a in flat[1:, col].tolist():
                w.atoms.union(first, a)
    w.kinds[node.name] = "reshape"
    return TensorState(d2, atoms, len(out_shape), (x.name,), gather)


def permute(w: ChannelWalker, node: torch.fx.Node) -> Any:
    """transpose/permute: moves (and permutes) the channel block."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    st = w.t(x)
    out_shape = node_shape(node)
    if st is None or out_shape is None:
        return w.opaque(node, "permute of an untracked tensor")
    r = st.rank
    name = target_name(node.target)
    if name in ("transpose", "swapaxes", "swapdims"):
        a0 = normalize_dim(node_arg(node, 1, "dim0"), r)
        a1 = normalize_dim(node_arg(node, 2, "dim1"), r)
        if a0 is None or a1 is None:
            return w.opaque(node, "transpose with non-constant dims")
        perm = list(range(r))
        perm[a0], perm[a1] = perm[a1], perm[a0]
    else:
        dims = node.args[1:] if node.op == "call_method" else (node_arg(node, 1, "dims"),)
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = tuple(dims[0])
        perm = [normalize_dim(d, r) for d in dims]
        if None in perm or sorted(perm) != list(range(r)):
            return w.opaque(node, "permute with non-constant dims")
    block_dims = list(range(st.dim, st.dim + st.m))
    newpos = [perm.index(d) for d in block_dims]
    lo = min(newpos)
    if sorted(newpos) != list(range(lo, lo + st.m)):
        return w.opaque(node, "permute splits the channel dims apart")
    order = [block_dims.index(perm[p]) for p in range(lo, lo + st.m)]
    atoms = st.atoms.transpose(order)
    gather = np.arange(st.size, dtype=np.int64).reshape(st.atoms.shape).transpose(order)
    w.kinds[node.name] = "permute"
    return TensorState(lo, np.ascontiguousarray(atoms), r, (x.name,), gather.reshape(-1))


def reduce(w: ChannelWalker, node: torch.fx.Node, how: str) -> Any:
    """mean/sum/amax/amin over dims other than the channel dim."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    st = w.t(x)
    if st is None or st.m != 1:
        return w.opaque(node, f"{how} of an untracked tensor")
    dims = node_arg(node, 1, "dim")
    keep = node_arg(node, 2, "keepdim", False)
    if dims is None or has_node((dims, keep)) or not isinstance(keep, bool):
        return w.opaque(node, f"{how} over all dims")
    dims = [dims] if isinstance(dims, int) else list(dims)
    nd = [normalize_dim(d, st.rank) for d in dims]
    if None in nd or st.dim in nd:
        return w.opaque(node, f"{how} over the channel dim")
    if set(node.kwargs) - {"dim", "keepdim", "input"} or len(node.args) > 3:
        return w.opaque(node, f"{how} with extra arguments")
    w.kinds[node.name] = "reduce"
    new_dim = st.dim if keep else st.dim - sum(d < st.dim for d in nd)
    return TensorState(new_dim, st.atoms, st.rank if keep else st.rank - len(set(nd)))


def pool(w: ChannelWalker, node: torch.fx.Node, st: TensorState, nd: int) -> Any:
    """Pooling over the trailing ``nd`` spatial dims: pass-through."""
    out_shape = node_shape(node)
    if st.m != 1 or st.dim != st.rank - nd - 1 or out_shape is None \
            or len(out_shape) != st.rank:
        return w.opaque(node, "pooling over the channel dim")
    w.kinds[node.name] = "pool"
    return TensorState(st.dim, st.atoms, st.rank)
