"""torch.fx helpers every pass uses: argument access, attribute resolution, node shapes and
dtypes, value metadata, containers for inserted modules, and inserting a module call into the
graph. One implementation each; passes never keep their own copies."""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Union

import torch
import torch.fx
from torch import nn

MISSING = object()  # returned by attribute lookups for an absent attribute


def bind(node: torch.fx.Node, names: tuple[str, ...], defaults: dict[str, Any] | None = None
         ) -> dict[str, Any] | None:
    """Map a call's positional and keyword arguments onto ``names``.

    Returns None when the call does not fit the signature (too many arguments, unknown keyword,
    a required argument missing): callers then leave the node alone.
    """
    defaults = defaults or {}
    if len(node.args) > len(names):
        return None
    out = dict(zip(names, node.args))
    for k, v in node.kwargs.items():
        if k not in names or k in out:
            return None
        out[k] = v
    for name in names:
        if name not in out:
            if name not in defaults:
                return None
            out[name] = defaults[name]
    return out


def set_arg(node: torch.fx.Node, names: tuple[str, ...], name: str, value: Any) -> None:
    """Set one argument of a call, positionally if it is given positionally, else as keyword."""
    i = names.index(name)
    if len(node.args) > i:
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[name] = value
        node.kwargs = kwargs


def node_arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given positionally at ``index`` or as a keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def node_shape(node: Any) -> tuple[int, ...] | None:
    """The traced shape of a node's value (``tensor_meta`` from ShapeProp, or ``val``), or None
    for anything that is not a node with one tensor value."""
    if not isinstance(node, torch.fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(int(s) for s in tm.shape)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


def dtype_of(node: Any) -> torch.dtype | None:
    if not isinstance(node, torch.fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "dtype"):
        return tm.dtype
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dtype
    return None


def is_tensor_node(node: Any) -> bool:
    """Whether ``node`` is a graph value with a recorded tensor shape."""
    return node_shape(node) is not None


def attr_value(gm: torch.nn.Module, target: str, default: Any = None) -> Any:
    """The object at dotted path ``target`` under ``gm`` (a submodule, parameter, buffer or plain
    attribute), or ``default`` when any step of the path is missing."""
    value = resolve_attr(gm, target)[2]
    return default if value is MISSING else value


def resolve_attr(gm: torch.nn.Module, target: str) -> tuple[Any, str, Any]:
    """``(owner, attribute name, value)`` of a dotted ``get_attr`` target; value may be MISSING,
    owner None when the path to it is missing."""
    *path, attr = target.split(".")
    owner: Any = gm
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            return None, attr, MISSING
    return owner, attr, getattr(owner, attr, MISSING)


def get_attr_value(gm: torch.nn.Module, node: Any) -> Any:
    """The object a ``get_attr`` node reads, or MISSING when ``node`` is not one."""
    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
        return MISSING
    return resolve_attr(gm, str(node.target))[2]


def replace_tensor_attr(owner: nn.Module, attr: str, value: torch.Tensor) -> None:
    """Rebind ``owner.attr`` to a new tensor of the same kind (parameter, buffer or plain).

    Always a new object: never writes into the existing tensor, so aliases elsewhere (the user's
    model, tied weights) keep their values, and weight fingerprints see the change. ``value``
    must be a tensor the caller owns (it is stored, not copied).
    """
    old = owner._parameters.get(attr, MISSING) if hasattr(owner, "_parameters") else MISSING
    if old is not MISSING:
        rg = old.requires_grad if old is not None else True
        owner._parameters[attr] = nn.Parameter(value.detach(), requires_grad=rg)
        return
    if hasattr(owner, "_buffers") and attr in owner._buffers:
        owner._buffers[attr] = value.detach()
        return
    setattr(owner, attr, value.detach())


def add_tensor_attr(owner: nn.Module, base: str, value: torch.Tensor, like: str) -> str:
    """Register a new tensor on ``owner`` under a fresh name derived from ``base``.

    It becomes a parameter when ``owner.like`` is one, else a buffer (``value`` is stored, not
    copied). Returns the attribute name.
    """
    name, i = base, 0
    while hasattr(owner, name):
        i += 1
        name = f"{base}_{i}"
    if like in owner._parameters:
        rg = owner._parameters[like].requires_grad if owner._parameters[like] is not None else True
        owner.register_parameter(name, nn.Parameter(value.detach(), requires_grad=rg))
    else:
        owner.register_buffer(name, value.detach())
    return name


def module_tensors(mod: nn.Module) -> list[torch.Tensor]:
    out = [p for _, p in mod.named_parameters(remove_duplicate=False)]
    out += [b for _, b in mod.named_buffers(remove_duplicate=False)]
    return out


def tensor_use_counts(gm: torch.fx.GraphModule) -> dict[int, int]:
    """id(tensor) -> how many graph sites read it (get_attr users, call_module calls).

    A tensor read at exactly one site can be replaced for that site alone; anything shared
    (a module called twice, tied weights, a weight also read by get_attr) counts more than once.
    """
    counts: dict[int, int] = {}

    def add(t: Any, n: int = 1) -> None:
        if isinstance(t, torch.Tensor):
            counts[id(t)] = counts.get(id(t), 0) + n

    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = resolve_attr(gm, str(node.target))[2]
            if isinstance(obj, nn.Module):
                for t in module_tensors(obj):
                    add(t, max(1, len(node.users)))
            else:
                add(obj, max(1, len(node.users)))
        elif node.op == "call_module":
            mod = submodule_or_none(gm, str(node.target))
            if mod is None:
                continue
            for t in module_tensors(mod):
                add(t)
    return counts


def submodule_or_none(gm: nn.Module, target: str) -> Any:
    """The submodule at ``target``, or None when there is none."""
    try:
        return gm.get_submodule(target)
    except AttributeError:
        return None


def tensor_meta_for(t: torch.Tensor) -> Any:
    """ShapeProp's TensorMetadata for a concrete tensor (for new get_attr nodes)."""
    try:
        from torch.fx.passes.shape_prop import _extract_tensor_metadata
        return _extract_tensor_metadata(t)
    except Exception:  # noqa: BLE001 - private helper; shape metadata is optional
        return None


class MetaEmitter:
    """Creates nodes before ``anchor`` for a rewrite rule; each gets its ``tensor_meta`` by
    running the op on meta tensors of the traced shapes (get_attr values as meta copies, ints for
    ``size`` queries). With ``shapes_known=False`` (inputs without traced shapes) the nodes are
    created without meta."""

    def __init__(self, gm: torch.fx.GraphModule, anchor: torch.fx.Node,
                 shapes_known: bool = True) -> None:
        self.gm, self.anchor, self.known = gm, anchor, shapes_known
        self.vals: dict[torch.fx.Node, Any] = {}

    def value(self, x: Any) -> Any:
        """The meta value of an argument (nodes, nested tuples/lists, constants)."""
        if isinstance(x, torch.fx.Node):
            if x not in self.vals:
                if x.op == "get_attr":
                    t = attr_value(self.gm, str(x.target))
                    self.vals[x] = t.detach().to("meta") if isinstance(t, torch.Tensor) else t
                else:
                    self.vals[x] = torch.empty(node_shape(x), dtype=dtype_of(x) or torch.float32,
                                               device="meta")
            return self.vals[x]
        if isinstance(x, (tuple, list)):
            return type(x)(self.value(v) for v in x)
        return x

    def emit(self, op: str, target: Any, args: tuple, name: str, kwargs: dict | None = None,
             compute: Callable[..., Any] | None = None) -> torch.fx.Node:
        """A new node before the anchor; ``compute`` (on meta values) replaces running the op."""
        with self.gm.graph.inserting_before(self.anchor):
            node = self.gm.graph.create_node(op, target, args, kwargs or {}, name=name)
        if not self.known:
            return node
        vals = [self.value(a) for a in args]
        kw = {k: self.value(v) for k, v in (kwargs or {}).items()}
        if compute is not None:
            out = compute(*vals)
        elif op == "call_method":
            out = getattr(vals[0], target)(*vals[1:], **kw)
        elif op == "get_attr":
            out = self.value(node)
        else:
            out = target(*vals, **kw)
        self.vals[node] = out
        if isinstance(out, torch.Tensor):
            meta = tensor_meta_for(out)
            if meta is not None:
                node.meta["tensor_meta"] = meta
        return node

    def method(self, name: str, x: torch.fx.Node, *args: Any) -> torch.fx.Node:
        """``x.<name>(*args)``, named after the anchor."""
        return self.emit("call_method", name, (x, *args), f"{self.anchor.name}_{name}")

    def linear(self, target: str, x: torch.fx.Node, name: str) -> torch.fx.Node:
        """A call of the nn.Linear installed at ``target``."""
        lin = self.gm.get_submodule(target)
        w = torch.empty(lin.weight.shape, dtype=lin.weight.dtype, device="meta")
        return self.emit("call_module", target, (x,), name,
                         compute=lambda v: torch.nn.functional.linear(v, w))


def graph_device(gm: torch.nn.Module) -> torch.device:
    """The device of the graph's first parameter or buffer (CPU for a graph without tensors)."""
    for t in gm.parameters():
        return t.device
    for t in gm.buffers():
        return t.device
    return torch.device("cpu")


def flat_values(value: Any) -> list[Any]:
    """The leaves of nested tuples, lists and dicts (a node's arguments, a graph's outputs), in
    order; anything else (None included) is one leaf."""
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in flat_values(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in flat_values(v)]
    return [value]


def graph_batch(gm: torch.fx.GraphModule) -> int | None:
    """The traced batch size: dim 0 of the first tensor input's traced shape (None: unknown)."""
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            break
        shape = node_shape(n)
        if shape:
            return int(shape[0])
    return None


def rows_per_sample(gm: torch.fx.GraphModule, out_shape: tuple[int, ...] | None) -> int:
    """How many rows of a value's leading dim belong to one sample: ``out_shape[0] / batch``
    when the leading dim is a multiple of the traced batch (Swin's windows, a linear on
    (batch·tokens, C)), else 1 (the leading dim is the sample dim). Per-sample costs multiply by
    it, so they equal the whole batch's cost divided by the batch size."""
    batch = graph_batch(gm)
    if not out_shape or not batch or out_shape[0] == batch or out_shape[0] % batch:
        return 1
    return int(out_shape[0]) // batch


def num_graph_inputs(gm: torch.fx.GraphModule) -> int:
    """How many inputs the graph takes (its placeholders; at least 1)."""
    return max(1, sum(1 for n in gm.graph.nodes if n.op == "placeholder"))


def copy_value_meta(src: torch.fx.Node, dst: torch.fx.Node) -> None:
    """Give ``dst`` the value metadata (shape, dtype, example value) of ``src``: for a node that
    computes a value of the same shape, e.g. a quantizer inserted on ``src``."""
    for key in ("tensor_meta", "val"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def module_container(gm: torch.fx.GraphModule, name: str) -> tuple[str, nn.ModuleDict]:
    """The ``nn.ModuleDict`` at ``gm.<name>`` that holds modules a pass inserts, created when
    absent; when ``name`` is taken by something else, ``name_1``, ``name_2``, ... Returns
    ``(attribute name, container)``."""
    cand, i = name, 0
    while True:
        existing = getattr(gm, cand, None)
        if isinstance(existing, nn.ModuleDict):
            return cand, existing
        if existing is None and cand not in gm._modules:
            box = nn.ModuleDict()
            gm.add_module(cand, box)
            return cand, box
        i += 1
        cand = f"{name}_{i}"


def unique_key(box: nn.ModuleDict, key: str) -> str:
    """A key for a new entry of ``box`` derived from ``key`` (dots replaced, ``_1``, ``_2``, ...
    appended until it is free)."""
    key = key.replace(".", "_") or "t"
    out, i = key, 0
    while out in box:
        i += 1
        out = f"{key}_{i}"
    return out


ModuleOrFactory = Union[nn.Module, Callable[[str], nn.Module]]


def add_inserted_module(gm: torch.fx.GraphModule, container: str, key: str,
                        module: ModuleOrFactory) -> str:
    """Store a module in the container ``container`` of ``gm`` under a fresh key derived from
    ``key``; returns its qualified name (the ``call_module`` target). ``module`` may be a
    factory called with that name (for modules that carry their own name)."""
    box_name, box = module_container(gm, container)
    k = unique_key(box, key)
    target = f"{box_name}.{k}"
    box[k] = module if isinstance(module, nn.Module) else module(target)
    return target


def call_module_on(gm: torch.fx.GraphModule, target: str, value: torch.fx.Node, *,
                   before: torch.fx.Node | None = None, after: torch.fx.Node | None = None
                   ) -> torch.fx.Node:
    """A new node ``call_module[target](value)`` placed right before ``before`` or right after
    ``after``, carrying ``value``'s shape metadata. Rewiring users is the caller's choice."""
    if (before is None) == (after is None):
        raise ValueError("call_module_on: give exactly one of before= and after=")
    where = gm.graph.inserting_before(before) if before is not None \
        else gm.graph.inserting_after(after)
    with where:
        node = gm.graph.call_module(target, (value,))
    copy_value_meta(value, node)
    return node


def insert_module_before(gm: torch.fx.GraphModule, consumer: torch.fx.Node,
                         value: torch.fx.Node, container: str, key: str,
                         module: ModuleOrFactory) -> torch.fx.Node:
    """Put ``module`` in front of ``consumer``'s input ``value``: store it in ``container``
    (fresh key from ``key``), call it on ``value`` right before ``consumer`` and make
    ``consumer`` (only) read its output. Returns the new node."""
    target = add_inserted_module(gm, container, key, module)
    node = call_module_on(gm, target, value, before=consumer)
    consumer.replace_input_with(value, node)
    return node


def copy_sharing_tensors(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` with its own graph, meta and module objects (so a pass may swap modules,
    set attributes or switch train/eval in it) whose parameters and buffers are ``gm``'s own
    tensors — a deep copy without copying weights. The caller must not write into the tensors."""
    memo: dict[int, nn.Module] = {}

    def copy_module(m: nn.Module) -> nn.Module:
        if id(m) not in memo:
            new = copy.copy(m)
            new.__dict__ = dict(m.__dict__)
            new._parameters = dict(m._parameters)
            new._buffers = dict(m._buffers)
            memo[id(m)] = new
            new._modules = {k: None if v is None else copy_module(v)
                            for k, v in m._modules.items()}
        return memo[id(m)]

    root = copy_module(gm)
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    old_out = next(n for n in gm.graph.nodes if n.op == "output")
    graph.output(out, type_expr=old_out.type)
    new = torch.fx.GraphModule(root, graph, class_name=type(gm).__name__)
    new.meta.update(gm.meta)
    return new
