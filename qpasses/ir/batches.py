"""The model inputs a pass reads from its PassContext: calibration batches in the forms users
pass them (tensors, ``(x, y)`` tuples from a labelled DataLoader, dicts), and a few batches for
passes that only need to look at the data (lowering ranges, checks).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.fx

from qpasses.errors import CalibrationError
from qpasses.ir.fx import num_graph_inputs

__all__ = ["BATCH_FORMS", "INPUT_KEYS", "batch_inputs", "calibration_batches", "check_batch_inputs",
           "context_batches"]

INPUT_KEYS = ("x", "input", "inputs", "image")
BATCH_FORMS = ("a tensor, a tuple/list whose first items are the inputs (e.g. (x, y)), or a dict "
               f"with one of the keys {', '.join(repr(k) for k in INPUT_KEYS)}")


def batch_inputs(batch: Any, index: int, num_inputs: int) -> tuple[torch.Tensor, ...]:
    """The model inputs of one calibration batch (forms in the module docstring)."""
    if isinstance(batch, torch.Tensor):
        items: tuple = (batch,)
    elif isinstance(batch, Mapping):
        key = next((k for k in INPUT_KEYS if k in batch), None)
        if key is None:
            raise CalibrationError(f"calibration batch {index} is a dict without an input key "
                                   f"(has {sorted(map(str, batch))}); expected {BATCH_FORMS}")
        v = batch[key]
        items = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    elif isinstance(batch, (tuple, list)):
        items = tuple(batch[:num_inputs])
    else:
        raise CalibrationError(f"calibration batch {index} is a {type(batch).__name__}; "
                               f"expected {BATCH_FORMS}")
    if len(items) < num_inputs or not all(isinstance(t, torch.Tensor) for t in items[:num_inputs]):
        raise CalibrationError(f"calibration batch {index} does not hold {num_inputs} input "
                               f"tensor(s); expected {BATCH_FORMS}")
    return items[:num_inputs]


def check_batch_inputs(gm: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...], index: int,
                       pass_name: str) -> None:
    """CalibrationError naming the batch, the input and what the graph was traced with, when a
    batch's input does not fit the graph's placeholders: another rank, other non-batch dims, or
    an integer tensor where the model takes floats (and the reverse). Placeholders without
    traced metadata accept anything."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for j, (ph, t) in enumerate(zip(placeholders, inputs)):
        tm = ph.meta.get("tensor_meta")
        shape, dtype = getattr(tm, "shape", None), getattr(tm, "dtype", None)
        if shape is not None and (t.dim() != len(shape)
                                  or tuple(t.shape[1:]) != tuple(shape)[1:]):
            expected = "x".join(["N"] + [str(int(d)) for d in tuple(shape)[1:]])
            raise CalibrationError(
                f"{pass_name}: calibration batch {index} (input {j}, '{ph.name}') has shape "
                f"{tuple(t.shape)}; the graph was traced with {tuple(shape)}, so expected "
                f"{expected} (any batch size N); give batches shaped like the example inputs")
        if dtype is not None and t.is_floating_point() != dtype.is_floating_point:
            raise CalibrationError(
                f"{pass_name}: calibration batch {index} (input {j}, '{ph.name}') has dtype "
                f"{t.dtype}; the graph was traced with {dtype}; convert the data "
                f"(e.g. x.to({dtype}))")


def calibration_batches(ctx: Any, pass_name: str) -> Iterable:
    """``ctx.calibration_data``, checked to be an iterable of batches; CalibrationError naming
    ``pass_name`` and the PassContext field to set otherwise. Shared by every data-driven pass."""
    data = getattr(ctx, "calibration_data", None)
    if data is None:
        raise CalibrationError(
            f"pass '{pass_name}' needs calibration data: run the pipeline under "
            "PassContext(calibration_data=...) with an iterable of batches (a DataLoader, a "
            f"list of tensors...; each batch {BATCH_FORMS})")
    if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise CalibrationError(
            f"PassContext(calibration_data=...) must be an iterable of batches, got "
            f"{type(data).__name__}" + (" (wrap a single batch in a list: [x])"
                                        if isinstance(data, torch.Tensor) else ""))
    return data


def context_batches(ctx: Any, gm: torch.fx.GraphModule, limit: int = 4
                    ) -> list[tuple[torch.Tensor, ...]]:
    """Up to ``limit`` input tuples from ``ctx.calibration_data`` (else ``ctx.example_inputs``);
    an unusable iterable gives no batches rather than an error; one that raises while producing
    a batch is a CalibrationError (the user's exception as its cause)."""
    k = num_graph_inputs(gm)
    out: list[tuple[torch.Tensor, ...]] = []
    data = getattr(ctx, "calibration_data", None)
    if data is not None and not isinstance(data, (torch.Tensor, str, bytes)):
        try:
            for i, b in enumerate(data):
                out.append(batch_inputs(b, i, k))
                if len(out) >= limit:
                    break
        except TypeError:
            out = []
        except CalibrationError:
            raise
        except Exception as e:          # the user's iterable raised: not an internal error
            raise CalibrationError(f"PassContext.calibration_data raised {type(e).__name__} "
                                   f"while producing batch {len(out)}: {e}") from e
    if not out and getattr(ctx, "example_inputs", None):
        ex = tuple(ctx.example_inputs)
        if all(isinstance(t, torch.Tensor) for t in ex[:k]) and len(ex) >= k:
            out.append(ex[:k])
    return out
