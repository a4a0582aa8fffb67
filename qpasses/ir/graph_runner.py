"""A lean node-by-node run of a GraphModule with a hook on every node's value.

:class:`torch.fx.Interpreter` pays, per node, a progress-bar update, a debug-log call and two
context managers (current node, traceback metadata): about 0.1 s on a 1,500-node graph, a tenth of
an int-sim forward of MaxViT-T. :func:`run_graph` evaluates the same nodes in the same order with
the same semantics (placeholders from the inputs, ``get_attr`` through the module tree, modules,
functions and methods called on the mapped arguments; each value dropped after its last user, as
the interpreter does), and lets ``hook(node, value)`` observe or replace each value (the output node's too).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx

__all__ = ["run_graph"]

_MISSING = object()


def run_graph(gm: torch.fx.GraphModule, inputs: tuple[Any, ...],
              hook: Callable[[torch.fx.Node, Any], Any] | None = None) -> Any:
    """``gm(*inputs)`` node by node; ``hook(node, value)`` (if given) returns the value the
    graph goes on with. Call under ``torch.no_grad()`` where gradients are not wanted."""
    graph = gm.graph
    mods = dict(gm.named_modules())
    last_user: dict[str, torch.fx.Node] = {}
    for n in graph.nodes:
        for a in n.all_input_nodes:
            last_user[a.name] = n
    free_after: dict[torch.fx.Node, list[str]] = {}
    for name, user in last_user.items():
        free_after.setdefault(user, []).append(name)
    env: dict[str, Any] = {}

    def load(a: torch.fx.Node) -> Any:
        return env[a.name]

    it = iter(graph.process_inputs(*inputs))
    for n in graph.nodes:
        op = n.op
        if op == "placeholder":
            v = next(it, _MISSING)
            if v is _MISSING:
                if not n.args:
                    raise TypeError(f"run_graph: missing input for placeholder '{n.name}'")
                v = n.args[0]
        elif op == "get_attr":
            v = gm
            for part in str(n.target).split("."):
                v = getattr(v, part)
        elif op == "output":
            v = torch.fx.node.map_arg(n.args[0], load)
            return graph.process_outputs(hook(n, v) if hook is not None else v)
        else:
            args = torch.fx.node.map_arg(n.args, load)
            kwargs = torch.fx.node.map_arg(n.kwargs, load)
            if op == "call_module":
                v = mods[str(n.target)](*args, **kwargs)
            elif op == "call_function":
                v = n.target(*args, **kwargs)
            else:
                self_obj, *rest = args
                v = getattr(self_obj, str(n.target))(*rest, **kwargs)
        if hook is not None:
            v = hook(n, v)
        env[n.name] = v
        for name in free_after.get(n, ()):
            env.pop(name, None)
    return None
