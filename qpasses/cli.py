"""Helpers shared by the command-line tools (tools/dump_graph.py, tools/qpass_opt.py, tools/bench.py).

Everything here is importable and raises typed errors, so tools stay thin argparse layers and tests
call the logic in-process:

- :func:`load_model` builds a model from a spec: ``torchvision:NAME`` (random init, never downloads
  weights) or ``package.module:factory`` (a callable returning an ``nn.Module`` or a
  ``(module, example_inputs)`` pair).
- :func:`parse_input_shape` turns ``1,3,224,224`` into a tuple of ints.
- :func:`resolve_pipeline_text` expands the special pipeline ``default``.
- :func:`run_main` runs a tool's ``main`` body and turns typed errors into ``exit 2`` with the
  message on stderr (no traceback).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from passes_registry import PassesError

from qpasses.errors import InputError

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)
EXIT_USAGE = 2


class ModelSpecError(InputError):
    """A ``--model`` spec names no model: unknown torchvision name, bad module or factory."""


def parse_input_shape(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``; positive ints only."""
    if not isinstance(text, str):
        dims = tuple(text)
        if dims and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            return dims
        raise InputError(f"bad input shape {text!r}: expected positive ints, e.g. 1,3,224,224")
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise InputError(f"bad input shape '{text}': expected comma-separated positive ints, "
                         "e.g. 1,3,224,224")
    return dims


def _torchvision_model(name: str) -> torch.nn.Module:
    import torchvision

    available = sorted(torchvision.models.list_models())
    if name not in available:
        from passes_registry.suggest import did_you_mean
        raise ModelSpecError(f"unknown torchvision model '{name}'" + did_you_mean(name, available)
                             + " (see torchvision.models.list_models())")
    kwargs: dict[str, Any] = {"weights": None}
    if name.startswith(("inception", "googlenet")):
        kwargs["init_weights"] = True  # silences torchvision's init warning; random init either way
    return torchvision.models.get_model(name, **kwargs)


def _import_factory(spec: str) -> Callable[[], Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelSpecError(f"bad model spec '{spec}': expected torchvision:NAME or "
                             "package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Tools run as scripts put tools/ first on sys.path; the user's models usually live
        # relative to the working directory, as with `python -m`.
        cwd = os.getcwd()
        if cwd in sys.path or (e.name and not module_name.startswith(e.name)):
            raise ModelSpecError(f"cannot import module '{module_name}' for model spec "
                                 f"'{spec}': {e}") from None
        sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e2:
            raise ModelSpecError(f"cannot import module '{module_name}' for model spec "
                                 f"'{spec}': {e2}") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            from passes_registry.suggest import did_you_mean
            names = [n for n in dir(module) if not n.startswith("_")]
            raise ModelSpecError(f"module '{module_name}' has no attribute '{attr}'"
                                 + did_you_mean(attr, names))
    if not callable(factory):
        raise ModelSpecError(f"'{spec}' is not callable: the factory must return an nn.Module")
    return factory


def load_model(spec: str, *, seed: int | None = None) -> tuple[torch.nn.Module, tuple | None]:
    """Build the model a spec names, with random weights.

    Returns ``(model, example_inputs)``; ``example_inputs`` is None unless the factory returned a
    ``(module, example_inputs)`` pair. ``seed`` seeds torch before construction (deterministic
    random init).
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ModelSpecError(f"bad model spec {spec!r}: expected torchvision:NAME or "
                             "package.module:factory")
    if seed is not None:
        torch.manual_seed(seed)
    prefix, _, name = spec.partition(":")
    if prefix == "torchvision":
        model: Any = _torchvision_model(name)
        inputs = None
    else:
        built = _import_factory(spec)()
        inputs = None
        if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], torch.nn.Module):
            built, inputs = built
            if isinstance(inputs, torch.Tensor):
                inputs = (inputs,)
            inputs = tuple(inputs)
        model = built
    if not isinstance(model, torch.nn.Module):
        raise ModelSpecError(f"'{spec}' returned {type(model).__name__}, expected an nn.Module "
                             "(or a (module, example_inputs) pair)")
    return model.eval(), inputs


def example_inputs_for(shape: Sequence[int], *, seed: int | None = None) -> tuple[torch.Tensor]:
    """One random normal input tensor of ``shape`` (seeded when ``seed`` is given)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return (torch.randn(*shape, generator=gen),)


def trace_quietly(model: torch.nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    """``qpasses.trace`` without the traceback torch's ShapeProp prints to stderr on failure.

    What the trace writes to stderr is held back and replayed when it succeeds (warnings are not
    lost); when it fails, the typed error's message says everything.
    """
    from qpasses.ir.trace import trace

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        try:
            gm = trace(model, inputs)
        except PassesError:
            raise
        except BaseException:
            sys.stderr.write(buf.getvalue())
            raise
    sys.stderr.write(buf.getvalue())
    return gm


def resolve_pipeline_text(text: str | None) -> str | None:
    """The pipeline text a tool should run: ``default`` means the registered pipeline named
    ``default`` (:func:`qpasses.pipelines.default`)."""
    if text is None:
        return None
    if text.strip() == "default":
        return "graph(default)"
    return text


def split_names(values: Sequence[str] | str | None) -> frozenset[str]:
    """``["a,b", "c"]`` -> ``{"a", "b", "c"}`` (for repeated comma-separated flags)."""
    if values is None:
        return frozenset()
    if isinstance(values, str):
        values = [values]
    return frozenset(n.strip() for v in values for n in v.split(",") if n.strip())


def run_main(body: Callable[[], int | None], *, stderr: Any = None) -> int:
    """Run a tool body; typed user errors print their message to stderr and return 2."""
    try:
        rc = body()
    except PassesError as e:
        text = str(e)
        # Parse errors already read "pipeline:1:7: error: ..." (compiler style).
        prefix = "" if text.startswith("pipeline:") else "error: "
        (stderr or sys.stderr).write(f"{prefix}{text}\n")
        return EXIT_USAGE
    return 0 if rc is None else int(rc)
