"""Helpers shared by the command-line tools (tools/dump_graph.py, tools/qpass_opt.py, tools/bench.py).

Everything here is importable and raises typed errors, so tools stay thin argparse layers and tests
call the logic in-process:

- :func:`load_model` builds a model from a spec: ``torchvision:NAME`` (random init, never downloads
  weights) or ``package.module:factory`` (a callable returning an ``nn.Module`` or a
  ``(module, example_inputs)`` pair).
- :func:`parse_input_shape` turns ``1,3,224,224`` into a tuple of ints (bounded in size);
  :func:`check_seed` bounds ``--seed`` to what torch accepts.
- :func:`calibration_data` reads ``--calibration random:N`` or ``PATH.pt`` (a saved list of
  batches); :func:`synthetic_batches` makes the random ones.
- :func:`resolve_pipeline_text` expands the special pipeline ``default``.
- :func:`run_main` runs a tool's ``main`` body and turns typed errors into ``exit 2`` with the
  message on stderr (no traceback).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
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
MAX_INPUT_ELEMENTS = 2 ** 28  # 1 GiB of float32: far above any example input, below an OOM
SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)  # what torch.manual_seed accepts


class ModelSpecError(InputError):
    """A ``--model`` spec names no model: unknown torchvision name, bad module or factory."""


def parse_input_shape(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``; positive ints only."""
    if not isinstance(text, str):
        dims = tuple(text)
        if dims and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            return _bounded(dims, dims)
        raise InputError(f"bad input shape {text!r}: expected positive ints, e.g. 1,3,224,224")
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise InputError(f"bad input shape '{text}': expected comma-separated positive ints, "
                         "e.g. 1,3,224,224")
    return _bounded(dims, text)


def _bounded(dims: tuple[int, ...], text: Any) -> tuple[int, ...]:
    numel = 1
    for d in dims:
        numel *= d
    if numel > MAX_INPUT_ELEMENTS:
        raise InputError(f"input shape {text!s:.60} has {numel:.3g} elements, more than the "
                         f"{MAX_INPUT_ELEMENTS:,} an example input may have; use a smaller "
                         "shape (shapes propagate from one example batch)")
    return dims


def check_seed(seed: Any) -> int:
    """``seed`` if torch accepts it as a seed, else an InputError naming ``--seed``."""
    if isinstance(seed, bool) or not isinstance(seed, int) \
            or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise InputError(f"--seed {seed!r:.40}: expected an int in {SEED_RANGE[0]}..{SEED_RANGE[1]}")
    return seed


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


def _call_factory(spec: str, factory: Callable[[], Any]) -> Any:
    """``factory()``; a factory that needs arguments or raises is a ModelSpecError."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: just call it
        sig = None
    if sig is not None:
        needed = [p.name for p in sig.parameters.values() if p.default is p.empty
                  and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if needed:
            raise ModelSpecError(f"model factory '{spec}' needs arguments ({', '.join(needed)}); "
                                 "--model calls it with none: give a factory whose arguments "
                                 "all have defaults (e.g. a small wrapper function)")
    try:
        return factory()
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's code; re-raised typed
        raise ModelSpecError(f"model factory '{spec}' raised {type(e).__name__}: {e}") from e


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
        torch.manual_seed(check_seed(seed))
    prefix, _, name = spec.partition(":")
    if prefix == "torchvision":
        model: Any = _torchvision_model(name)
        inputs = None
    else:
        built = _call_factory(spec, _import_factory(spec))
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
    shape = parse_input_shape(shape)
    gen = torch.Generator().manual_seed(check_seed(seed)) if seed is not None else None
    try:
        return (torch.randn(*shape, generator=gen),)
    except (RuntimeError, MemoryError) as e:
        raise InputError(f"cannot make an example input of shape {shape}: {e}") from None


def synthetic_batches(inputs: tuple, count: int, seed: int, *,
                      flag: str = "--calibration-batches") -> list[tuple]:
    """``count`` random batches shaped like ``inputs`` (standard normal, seeded)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise InputError(f"{flag} must be >= 0, got {count}")
    if count > 10_000:
        raise InputError(f"{flag}: {count} batches is more than the 10000 allowed")
    g = torch.Generator().manual_seed(check_seed(seed) + 1 if seed < SEED_RANGE[1] else 0)
    return [tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) if t.is_floating_point()
                  else t.clone() for t in inputs) for _ in range(count)]


def calibration_data(spec: str | None, inputs: tuple | None, seed: int = 0) -> list | None:
    """The batches ``--calibration SPEC`` names: ``random:N`` (N random batches shaped like the
    example inputs) or ``PATH.pt`` (``torch.save``'d list of batches, each a tensor or a tuple
    of tensors; a single tensor is one batch). ``None`` gives None."""
    if spec is None:
        return None
    if spec.startswith("random:"):
        try:
            count = int(spec[len("random:"):])
        except ValueError:
            count = -1
        if count < 1 or inputs is None:
            raise InputError(f"--calibration {spec}: expected random:N with N >= 1"
                             + ("" if inputs is not None else " and example inputs to copy "
                                "shapes from (--input-shape)"))
        return synthetic_batches(inputs, count, seed, flag="--calibration")
    if not os.path.isfile(spec):
        raise InputError(f"--calibration {spec}: no such file; expected random:N or the path "
                         "of a torch.save'd list of batches")
    try:
        data = torch.load(spec, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling raises many kinds; re-raised typed
        raise InputError(f"--calibration {spec}: cannot load batches: {type(e).__name__}: "
                         f"{e}") from None
    if isinstance(data, torch.Tensor):
        data = [data]
    if not isinstance(data, (list, tuple)) or not data:
        raise InputError(f"--calibration {spec} holds a {type(data).__name__}; save a non-empty "
                         "list of batches: torch.save([x1, x2, ...], path)")
    return list(data)


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
