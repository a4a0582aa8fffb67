#!/usr/bin/env python3
"""qpass-opt: run a textual pass pipeline on a model or a saved graph (the ``mlir-opt`` analogue).

    python -m tools.qpass_opt --model torchvision:resnet18 --input-shape 1,3,64,64 \\
        --pass-pipeline='graph(fold-batch-norm,dce)' --print-ir-after-change --timing
    python -m tools.qpass_opt --graph repro/graph.pt --input-shape 1,3,64,64 \\
        --pass-pipeline="$(cat repro/pipeline.txt)"
    python -m tools.qpass_opt --list-passes
    python -m tools.qpass_opt --pass-pipeline='graph(dce)' --dump-pipeline

Debugging flags map 1:1 onto :class:`passes_registry.PassContext` fields:

==========================  ==========================
flag                        PassContext field
==========================  ==========================
--print-ir-before=NAMES     print_before
--print-ir-before-all       print_before="all"
--print-ir-after=NAMES      print_after
--print-ir-after-all        print_after="all"
--print-ir-after-change     print_after_change
--print-ir-after-failure    print_after_failure
--[no-]verify-each          verify_each (default on)
--check-preservation        check_preservation
--timing                    timing
--pass-statistics           statistics
--disable-pass=NAMES        disabled
--bisect-limit=N            bisect_limit
--reproducer-dir=DIR        reproducer_dir
--[no-]rollback             rollback (default on: a failing pipeline leaves the graph unchanged)
--calibration=SPEC          calibration_data (``random:N`` batches shaped like the input, or
                            ``PATH.pt``: a torch.save'd list of batches)
==========================  ==========================

The final graph goes to stdout (``--output-format fxir|table|json``, or ``--out PATH``); IR dumps,
timing and statistics go to stderr, as in mlir-opt. ``--emit onnx=PATH`` (``--onnx-format
qdq|qoperator|qonnx``) also writes the final graph as ONNX (tools/emit.py, docs/export.md). Typed
errors print their message to stderr and exit with status 2.
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
from tabulate import tabulate

import qpasses
from passes_registry import (PassContext, PassesError, PassManager, list_passes,
                             lookup_property, print_graph, property_names)
from passes_registry.instrument import load_annotations
from passes_registry.options import format_value
from passes_registry.pass_manager import HISTORY_KEY
from passes_registry.errors import UsageError
from qpasses.cli import (calibration_data, check_seed, example_inputs_for, load_model,
                         parse_input_shape, resolve_pipeline_text, run_main, split_names,
                         trace_quietly)
from qpasses.errors import InputError
from qpasses.ir.trace import propagate_shapes
from tools.emit import add_emit_arguments, emit, parse_emit

OUTPUT_FORMATS = ("fxir", "table", "json")


# ---------------------------------------------------------------------------------------------
# --list-passes


def _wrap_choices(type_name: str, width: int = 28) -> str:
    """``{a|b|c...}`` split into lines at ``|`` so no line exceeds ``width``."""
    if len(type_name) <= width:
        return type_name
    lines, cur = [], ""
    for i, tok in enumerate(type_name.split("|")):
        piece = tok if i == 0 else "|" + tok
        if cur and len(cur) + len(piece) > width:
            lines.append(cur)
            cur = piece
        else:
            cur += piece
    return "\n".join(lines + [cur])


def format_pass_list(include_test: bool = False) -> str:
    """Every registered pass, pipeline and analysis with its options (type, default, help), and
    the IR properties; ``test-*`` entries only with ``include_test``."""
    sections = []
    titles = {"pass": "Passes", "pipeline": "Pipelines", "analysis": "Analyses"}
    rows_by_kind: dict[str, list[list[str]]] = {k: [] for k in titles}
    for item in list_passes():
        if item.name.startswith("test-") and not include_test:
            continue
        rows = rows_by_kind[item.kind]
        rows.append([item.name, "", "", "", item.summary])
        for o in item.options:
            default = "(required)" if o.required else format_value(o.default)
            rows.append(["", o.key, _wrap_choices(o.type_name), default, o.help])
        props = []
        if item.requires:
            props.append("requires: " + ", ".join(item.requires))
        if item.establishes:
            props.append("establishes: " + ", ".join(item.establishes))
        if item.invalidates:
            props.append("invalidates: " + ", ".join(item.invalidates))
        if props:
            rows.append(["", "", "", "", "; ".join(props)])
    for kind, title in titles.items():
        rows = rows_by_kind[kind]
        if not rows:
            sections.append(f"{title}: (none registered)")
            continue
        sections.append(f"{title}:\n" + tabulate(
            rows, headers=["name", "option", "type", "default", "summary / help"],
            disable_numparse=True, maxcolwidths=[None, None, None, 16, 72]))
    props = [[name, (lookup_property(name).summary if lookup_property(name) else "")]
             for name in property_names() if include_test or not name.startswith("test-")]
    if props:
        sections.append("IR properties:\n" + tabulate(props, headers=["property", "summary"]))
    sections.append("Combinators: fixpoint{max-iterations=8}(...), repeat{count=2}(...)")
    return "\n\n".join(sections)


# ---------------------------------------------------------------------------------------------
# Loading the input graph


def load_graph(path: str, input_shape: str | None = None, seed: int = 0) -> torch.fx.GraphModule:
    """A GraphModule saved with ``torch.save`` (the Reproducer's ``graph.pt``).

    Pickling a GraphModule keeps its code and weights but not ``node.meta`` (shapes,
    annotations); with ``input_shape`` the shapes are propagated again.
    """
    try:
        gm = torch.load(path, weights_only=False)
    except FileNotFoundError:
        raise InputError(f"--graph {path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - unpickling raises many kinds; re-raised typed
        raise InputError(f"--graph {path}: cannot load a GraphModule: {type(e).__name__}: {e}") \
            from None
    if not isinstance(gm, torch.fx.GraphModule):
        raise InputError(f"--graph {path} holds a {type(gm).__name__}, not a torch.fx.GraphModule "
                         "(save one with torch.save(gm, path))")
    if input_shape is not None:
        propagate_shapes(gm, example_inputs_for(parse_input_shape(input_shape), seed=seed))
    # A Reproducer writes annotations and properties beside graph.pt (pickling drops node.meta).
    sidecar = os.path.join(os.path.dirname(path), "annotations.json")
    if os.path.exists(sidecar):
        with open(sidecar) as f:
            data = json.load(f)
        load_annotations(gm, data.get("annotations", {}))
        gm.meta.setdefault(HISTORY_KEY, {"pipeline": [], "passes": [], "properties": []})
        gm.meta[HISTORY_KEY]["properties"] = sorted(data.get("properties", []))
    return gm


def load_input(model: str | None, graph: str | None, input_shape: str | None,
               seed: int = 0) -> tuple[torch.fx.GraphModule, tuple | None]:
    """``(gm, example_inputs)`` from ``--model`` or ``--graph``."""
    if (model is None) == (graph is None):
        raise InputError("give exactly one of --model SPEC or --graph PATH")
    if graph is not None:
        gm = load_graph(graph, input_shape, seed)
        inputs = (example_inputs_for(parse_input_shape(input_shape), seed=seed)
                  if input_shape is not None else None)
        return gm, inputs
    mod, inputs = load_model(model, seed=seed)  # type: ignore[arg-type]
    if input_shape is not None or inputs is None:
        inputs = example_inputs_for(parse_input_shape(input_shape or "1,3,224,224"), seed=seed)
    return trace_quietly(mod, inputs), inputs


# ---------------------------------------------------------------------------------------------
# Running


def context_from_args(args: argparse.Namespace, inputs: tuple | None, stream: Any) -> PassContext:
    """The PassContext the debugging flags describe (1:1 mapping)."""
    print_before: Any = "all" if args.print_ir_before_all else split_names(args.print_ir_before)
    print_after: Any = "all" if args.print_ir_after_all else split_names(args.print_ir_after)
    try:
        return _context(args, inputs, stream, print_before, print_after)
    except UsageError as e:  # name the flag, not the PassContext field
        flag = FLAGS.get(e.argument or "")
        if flag is None:
            raise
        raise InputError(f"{flag}: {e.reason.split(': ', 1)[-1]}") from None


# PassContext fields whose errors name a flag.
FLAGS = {"print_before": "--print-ir-before", "print_after": "--print-ir-after",
         "disabled": "--disable-pass", "bisect_limit": "--bisect-limit"}


def _context(args: argparse.Namespace, inputs: tuple | None, stream: Any, print_before: Any,
             print_after: Any) -> PassContext:
    return PassContext(
        example_inputs=inputs,
        verify_each=args.verify_each,
        check_preservation=args.check_preservation,
        print_before=print_before,
        print_after=print_after,
        print_after_change=args.print_ir_after_change,
        print_after_failure=args.print_ir_after_failure,
        print_stream=stream,
        timing=args.timing,
        statistics=args.pass_statistics,
        disabled=split_names(args.disable_pass),
        bisect_limit=args.bisect_limit,
        reproducer_dir=args.reproducer_dir,
        rollback=args.rollback,
        calibration_data=calibration_data(args.calibration, inputs, args.seed),
        seed=args.seed,
    )


def load_plugin(module: str) -> None:
    """Import a module that registers passes (mlir-opt's --load-pass-plugin)."""
    import importlib

    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise InputError(f"--load-plugin: cannot import module '{module}': {e}") from None
    except PassesError as e:  # e.g. a plugin registering a name twice
        raise InputError(f"--load-plugin {module}: {e}") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the plugin's own code failed
        raise InputError(f"--load-plugin {module}: importing the plugin raised "
                         f"{type(e).__name__}: {e}") from e


def render(gm: torch.fx.GraphModule, fmt: str, pipeline: str | None) -> str:
    if fmt == "fxir":
        return print_graph(gm, header=pipeline)
    if fmt == "table":
        return qpasses.format_table(qpasses.report(gm))
    if fmt == "json":
        return json.dumps(qpasses.report(gm), indent=2)
    raise InputError(f"unknown output format '{fmt}' (choose from {', '.join(OUTPUT_FORMATS)})")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.qpass_opt", description="Run a textual pass pipeline on "
                                "a model or a saved GraphModule (mlir-opt for qpasses).")
    p.add_argument("--load-plugin", action="append", default=None, metavar="MODULE",
                   help="import a Python module that registers extra passes (repeatable)")
    src = p.add_argument_group("input")
    src.add_argument("--model", help="torchvision:NAME (random init) or package.module:factory")
    src.add_argument("--graph", help="a torch.save'd GraphModule (e.g. a reproducer's graph.pt)")
    src.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    src.add_argument("--assume", action="append", default=None, metavar="PROPS",
                     help="IR properties the input graph already has (comma-separated)")
    src.add_argument("--seed", type=int, default=0, help="seed for random init and inputs")
    src.add_argument("--calibration", metavar="SPEC",
                     help="calibration data for calibrate and other data-driven passes: "
                          "random:N (N random batches shaped like the input) or PATH.pt "
                          "(a torch.save'd list of batches)")
    pipe = p.add_argument_group("pipeline")
    pipe.add_argument("--pass-pipeline", help="pipeline text, e.g. 'graph(fold-batch-norm,dce)'; "
                      "'default' is the default pipeline")
    pipe.add_argument("--list-passes", action="store_true",
                      help="list registered passes, pipelines and analyses with their options")
    pipe.add_argument("--dump-pipeline", action="store_true",
                      help="print the canonical pipeline text (all options, sorted)")
    dbg = p.add_argument_group("debugging (PassContext fields)")
    dbg.add_argument("--print-ir-before", action="append", metavar="NAMES",
                     help="print the graph before these passes (comma-separated)")
    dbg.add_argument("--print-ir-before-all", action="store_true")
    dbg.add_argument("--print-ir-after", action="append", metavar="NAMES",
                     help="print the graph after these passes (comma-separated)")
    dbg.add_argument("--print-ir-after-all", action="store_true")
    dbg.add_argument("--print-ir-after-change", action="store_true",
                     help="print after a pass only when it changed the graph")
    dbg.add_argument("--print-ir-after-failure", action="store_true",
                     help="print the graph after a pass fails")
    dbg.add_argument("--verify-each", action=argparse.BooleanOptionalAction, default=True,
                     help="verify graph, annotations, properties and 'modified' claims after "
                          "each pass (default: on)")
    dbg.add_argument("--check-preservation", action="store_true",
                     help="recompute analyses a pass claims to preserve and compare")
    dbg.add_argument("--timing", action="store_true", help="print a pass timing report")
    dbg.add_argument("--pass-statistics", action="store_true", help="print pass statistics")
    dbg.add_argument("--disable-pass", action="append", metavar="NAMES",
                     help="skip these passes (comma-separated; required passes still run)")
    dbg.add_argument("--bisect-limit", type=int, metavar="N",
                     help="run only the first N non-required passes (opt-bisect)")
    dbg.add_argument("--reproducer-dir", metavar="DIR",
                     help="on failure, write a reproducer (pipeline, graph, weights, command)")
    dbg.add_argument("--rollback", action=argparse.BooleanOptionalAction, default=True,
                     help="leave the input graph unchanged when the pipeline fails "
                          "(default: on; costs one copy of the graph)")
    out = p.add_argument_group("output")
    out.add_argument("--output-format", choices=OUTPUT_FORMATS, default="fxir",
                     help="format of the final graph (default: fxir)")
    out.add_argument("-o", "--out", help="write the final graph here instead of stdout")
    out.add_argument("--no-output", action="store_true", help="do not print the final graph")
    add_emit_arguments(out)
    return p


def opt(args: argparse.Namespace, stdout: Any = None, stderr: Any = None) -> int:
    """The tool's body on parsed arguments; raises typed errors."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    for module in args.load_plugin or ():
        load_plugin(module)
    if args.list_passes:
        stdout.write(format_pass_list() + "\n")
        if args.pass_pipeline is None:
            return 0
    if args.bisect_limit is not None and args.bisect_limit < 0:
        raise InputError("--bisect-limit must be >= 0")
    check_seed(args.seed)
    parse_emit(args.emit)                    # a bad --emit fails before the pipeline runs
    text = resolve_pipeline_text(args.pass_pipeline)
    # Without --assume, requirements the pipeline leaves open are checked against the input
    # graph's recorded (and verified) properties when it runs.
    assume = split_names(args.assume) or None
    pm = PassManager.parse(text, assume=assume) if text is not None else None
    if args.dump_pipeline:
        if pm is None:
            raise InputError("--dump-pipeline needs --pass-pipeline TEXT")
        stdout.write(str(pm) + "\n")
        if args.model is None and args.graph is None:
            return 0
    if args.model is None and args.graph is None:
        if args.list_passes:
            return 0
        raise InputError("nothing to do: give --model SPEC or --graph PATH (and "
                         "--pass-pipeline TEXT), or --list-passes / --dump-pipeline")
    gm, inputs = load_input(args.model, args.graph, args.input_shape, args.seed)
    canonical = None
    if pm is not None:
        canonical = str(pm)
        ctx = context_from_args(args, inputs, stderr)
        with ctx:
            gm = pm.run(gm, ctx)
    if args.emit:
        cal = calibration_data(args.calibration, inputs, args.seed) if inputs else None
        for line in emit(gm, inputs, args.emit, args.onnx_format, args.onnx_strict, cal):
            stderr.write(line + "\n")
    if args.no_output:
        return 0
    result = render(gm, args.output_format, canonical)
    if args.out:
        try:
            with open(args.out, "w") as f:
                f.write(result + "\n")
        except OSError as e:
            raise InputError(f"cannot write --out {args.out}: {e}") from None
    else:
        stdout.write(result + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return run_main(lambda: opt(args))


if __name__ == "__main__":
    sys.exit(main())
