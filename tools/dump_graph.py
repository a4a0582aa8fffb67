#!/usr/bin/env python3
"""Trace a model, run a pipeline and dump the annotated graph (the main job of ``make demo``).

    python -m tools.dump_graph --model torchvision:resnet18 [--input-shape 1,3,224,224]
           [--pipeline TEXT|default] [--format table|json|fxir|dot] [--out PATH] [--plot PNG]
           [--seed N] [--emit onnx=PATH [--onnx-format qdq|qoperator|qonnx]]

``--model`` is ``torchvision:NAME`` (random init, no downloads) or ``package.module:factory`` for a
user's own model (the factory returns an ``nn.Module`` or a ``(module, example_inputs)`` pair).
``--pipeline default`` runs the registered pipeline named ``default`` if there is one, else
``graph(canonicalize,fold-batch-norm,dce)``. Formats: ``table`` (the per-layer report), ``json``
(the report dict, schema in docs/annotations.md), ``fxir`` (the canonical one-line-per-node dump with
annotations), ``dot`` (Graphviz). ``--emit onnx=PATH`` also writes the final graph as ONNX
(tools/emit.py, docs/export.md). Typed errors print their message and exit with status 2.

Every step is an importable function (:func:`build`, :func:`run_pipeline`, :func:`render`,
:func:`to_dot`, :func:`plot_bits`, :func:`main`) so tests call them in-process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

import qpasses
from passes_registry import PassContext, PassManager, print_graph
from passes_registry.printing import format_annotations, format_type, target_name
from qpasses.cli import (DEFAULT_INPUT_SHAPE, example_inputs_for, load_model, parse_input_shape,
                         resolve_pipeline_text, run_main, synthetic_batches, trace_quietly)
from qpasses.errors import InputError
from tools.emit import add_emit_arguments, emit, parse_emit

FORMATS = ("table", "json", "fxir", "dot")


def build(model_spec: str, input_shape: str | Sequence[int] | None = None,
          seed: int = 0) -> tuple[torch.fx.GraphModule, tuple]:
    """Build the model a spec names (random init, seeded) and trace it with shapes.

    ``input_shape=None`` uses the factory's own example inputs if it returned some, else
    1,3,224,224.
    """
    model, inputs = load_model(model_spec, seed=seed)
    if input_shape is not None or inputs is None:
        shape = parse_input_shape(input_shape if input_shape is not None else DEFAULT_INPUT_SHAPE)
        inputs = example_inputs_for(shape, seed=seed)
    return trace_quietly(model, inputs), inputs


def run_pipeline(gm: torch.fx.GraphModule, inputs: tuple, pipeline: str | None,
                 **ctx_fields: Any) -> tuple[torch.fx.GraphModule, str | None]:
    """Run ``pipeline`` (text or ``default``) on ``gm``; returns ``(gm, canonical text)``."""
    text = resolve_pipeline_text(pipeline)
    if text is None:
        return gm, None
    # Properties the graph's history records are inferred (and checked) by PassManager.run; a
    # failing run leaves gm as it was (rollback, on for the tools).
    pm = PassManager.parse(text)
    ctx_fields.setdefault("rollback", True)
    with PassContext(example_inputs=inputs, **ctx_fields) as ctx:
        gm = pm.run(gm, ctx)
    return gm, str(pm)


def render(gm: torch.fx.GraphModule, fmt: str, pipeline: str | None = None) -> str:
    """The text of one output format (no trailing newline)."""
    if fmt == "table":
        return qpasses.format_table(qpasses.report(gm))
    if fmt == "json":
        return json.dumps(qpasses.report(gm), indent=2)
    if fmt == "fxir":
        return print_graph(gm, header=pipeline)
    if fmt == "dot":
        return to_dot(gm, title=pipeline)
    raise InputError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")


# ---------------------------------------------------------------------------------------------
# Graphviz

_DOT_STYLE = {
    "placeholder": 'shape=ellipse, style=filled, fillcolor="#dbe9f6"',
    "output": 'shape=ellipse, style=filled, fillcolor="#dbe9f6"',
    "get_attr": 'shape=box, style="rounded,filled", fillcolor="#eeeeee"',
    "call_module": 'shape=box, style="rounded,filled", fillcolor="#ffffff"',
    "call_function": 'shape=box, style="rounded,filled", fillcolor="#ffffff"',
    "call_method": 'shape=box, style="rounded,filled", fillcolor="#ffffff"',
}
_ANNOTATED = 'fillcolor="#fde8c8"'


def _dot_escape(text: str) -> str:
    return (text.replace("\\", "\\\\").replace('"', '\\"').replace("{", "\\{")
            .replace("}", "\\}").replace("<", "\\<").replace(">", "\\>"))


def to_dot(gm: torch.fx.GraphModule, title: str | None = None) -> str:
    """A Graphviz digraph of ``gm``: one node per fx node labelled name / op[target] / type /
    annotations (annotated nodes filled orange), one edge per data dependency. Deterministic."""
    lines = ["digraph G {", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];',
             '  edge [color="#555555"];']
    if title:
        lines.append(f'  label="{_dot_escape(title)}"; labelloc=t; fontsize=11;')
    for n in gm.graph.nodes:
        parts = [n.name]
        if n.op in ("placeholder", "output"):
            parts.append(n.op)
        else:
            parts.append(f"{n.op}[{target_name(n)}]")
        ty = format_type(n)
        if ty and n.op != "output":
            parts.append(ty)
        ann = format_annotations(n)
        if ann:
            parts.append(ann)
        style = _DOT_STYLE.get(n.op, "shape=box")
        if ann:
            style = style.replace('fillcolor="#ffffff"', _ANNOTATED)
        label = "\\n".join(_dot_escape(p) for p in parts)
        lines.append(f'  "{_dot_escape(n.name)}" [label="{label}", {style}];')
    for n in gm.graph.nodes:
        for inp in n.all_input_nodes:
            lines.append(f'  "{_dot_escape(inp.name)}" -> "{_dot_escape(n.name)}";')
    lines.append("}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Bit-width plot


def plot_bits(rep: dict[str, Any], path: str) -> str:
    """Bar chart (PNG) of weight and activation bit-widths per layer from a report dict.

    Per-kernel weight bits show as a bar at the mean with an error bar spanning min..max. Layers
    without annotations get no bar; when no layer has any, the figure says so.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = rep.get("layers", [])
    names = [r["name"] for r in layers]
    w_mean, w_lo, w_hi, a_bits = [], [], [], []
    for r in layers:
        ks = r.get("w_bits_per_kernel")
        if ks:
            mean = sum(ks) / len(ks)
            w_mean.append(mean)
            w_lo.append(mean - min(ks))
            w_hi.append(max(ks) - mean)
        else:
            w_mean.append(r["w_bits"] if r.get("w_bits") is not None else float("nan"))
            w_lo.append(0.0)
            w_hi.append(0.0)
        a_bits.append(r["a_bits"] if r.get("a_bits") is not None else float("nan"))
    fig = Figure(figsize=(max(6.0, 0.28 * len(names) + 2), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(names)))
    have_bits = any(v == v for v in w_mean + a_bits)  # not all NaN
    if have_bits:
        width = 0.4
        ax.bar([x - width / 2 for x in xs], w_mean, width, label="weight bits (per-kernel: "
               "mean, min..max)", color="#4c78a8", yerr=[w_lo, w_hi], capsize=2,
               error_kw={"elinewidth": 0.8})
        ax.bar([x + width / 2 for x in xs], a_bits, width, label="activation bits",
               color="#f58518")
        ax.legend(fontsize=8, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no bit-width annotations\n(run a pipeline that annotates bit-widths)",
                ha="center", va="center", transform=ax.transAxes, fontsize=10, color="#666666")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("bits")
    ax.set_ylim(0, 33 if not have_bits else max(
        [v for v in w_mean + a_bits if v == v] + [h + m for h, m in zip(w_hi, w_mean) if m == m])
        + 1)
    title = rep.get("model", "")
    if rep.get("pipeline"):
        title += "\n" + rep["pipeline"]
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# ---------------------------------------------------------------------------------------------
# CLI


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.dump_graph", description="Trace a model, run a pass pipeline and dump the "
        "annotated graph or its per-layer report.")
    p.add_argument("--model", required=True,
                   help="torchvision:NAME (random init) or package.module:factory")
    p.add_argument("--input-shape", default=None,
                   help="example input shape, e.g. 1,3,224,224 (default: the factory's own "
                        "example inputs, else 1,3,224,224)")
    p.add_argument("--pipeline", default=None,
                   help="pipeline text, e.g. 'graph(fold-batch-norm)'; 'default' runs the "
                        "default pipeline; omitted: no passes")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format")
    p.add_argument("--out", default=None, help="write the output here instead of stdout")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also write a bar chart of per-layer bit-widths")
    p.add_argument("--seed", type=int, default=0, help="seed for random init and inputs")
    p.add_argument("--calibration-batches", type=int, default=2, metavar="N",
                   help="random batches shaped like the example inputs fed to calibrate "
                        "(synthetic data: the tool downloads nothing)")
    add_emit_arguments(p)
    return p


def dump(model: str, input_shape: str | None = None, pipeline: str | None = None,
         fmt: str = "table", out: str | None = None, plot: str | None = None,
         seed: int = 0, calibration_batches: int = 2, emit_specs: list[str] | None = None,
         onnx_format: str = "qdq", onnx_strict: bool = False) -> str:
    """The whole tool as one function: returns the text it prints (and writes ``out``/``plot``
    and the ``--emit`` files, reported on stderr)."""
    parse_emit(emit_specs)                   # a bad --emit fails before the pipeline runs
    gm, inputs = build(model, input_shape, seed)
    cal = synthetic_batches(inputs, calibration_batches, seed)
    # Diagnostics printed by passes (print<...>, verify-int-sim{print}) go to stderr, so stdout
    # holds only the requested format (a json dump stays parseable).
    gm, text = run_pipeline(gm, inputs, pipeline, seed=seed, print_stream=sys.stderr,
                            calibration_data=cal)
    for line in emit(gm, inputs, emit_specs, onnx_format, onnx_strict, cal):
        sys.stderr.write(line + "\n")
    result = render(gm, fmt, text)
    if out is not None:
        try:
            with open(out, "w") as f:
                f.write(result + "\n")
        except OSError as e:
            raise InputError(f"cannot write --out {out}: {e}") from None
    if plot is not None:
        try:
            plot_bits(qpasses.report(gm), plot)
        except OSError as e:
            raise InputError(f"cannot write --plot {plot}: {e}") from None
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)

    def body() -> int:
        text = dump(args.model, args.input_shape, args.pipeline, args.format, args.out,
                    args.plot, args.seed, args.calibration_batches, args.emit,
                    args.onnx_format, args.onnx_strict)
        if args.out is None:
            sys.stdout.write(text + "\n")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
