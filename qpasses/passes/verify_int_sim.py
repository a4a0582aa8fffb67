"""verify-int-sim: check a lowered graph against an independent implementation of its arithmetic.

On ``samples`` inputs from ``PassContext.example_inputs`` / ``calibration_data`` the pass

1. runs the lowered graph (on ``backend``: as lowered, or switched to ``reference``/``fast`` for
   the check and switched back), recording every node;
2. checks every integer node's value is an integer tensor inside the range its module declares,
   and every conv/linear accumulator fits its declared width (the layer's proven ``acc_bits``, or
   ``acc-bits=N`` for a hardware accumulator): :class:`AccumulatorOverflowError` names the node;
3. runs the oracle — :class:`qpasses.algorithms.int_sim_reference.ReferenceInterpreter` (numpy int64 / exact
   rationals, written from the spec; ``oracle=independent``) or the graph itself on the int64
   ``reference`` backend (``oracle=reference-backend``, for big graphs; ``auto`` picks by MACs) —
   and raises :class:`IntSimMismatchError` naming the first node (graph order) whose value differs,
   with the count and max |diff|;
4. when ``lower-to-int-sim`` kept the fake-quant graph (and ``deviation``, the default), measures
   the int-sim vs fake-quant deviation at every activation quantizer (codes, in LSB of that
   quantizer), per op without the cascade (the ops up to each quantization point, single or a chain such as pool → flatten →
   requantize, fed the fake-quant codes of the previous points), and on the outputs (max |diff|,
   top-1 agreement for 2-D logits).

Stats (also stored in the int-sim record's ``verify``): ``num_samples``,
``num_nodes_checked``, ``num_int_nodes``, ``max_acc_bits_seen``, ``fq_points``,
``fq_points_exact``, ``codes_total``, ``codes_off_by_one``, ``codes_off_more``, ``max_lsb_diff``
(whole-graph: differences cascade), ``local_points``, ``local_codes_off``,
``local_max_lsb_diff`` (each integer op fed the fake-quant graph's own input codes: the
rounding-contract difference alone), ``output_max_abs_diff``, ``top1_agree_pct``.

Cost (docs/int-sim.md, "Verifying it fast"): the recorded integer run, the oracle (graph and
oracle values compared as the oracle produces them), and for the deviation a fake-quant run and
the per-op replay; ``python -m tools.bench --only verify-int-sim`` measures it against one
int-sim forward.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.fx

from passes_registry import (Pass, PassFailure, PassResult, PreservedAnalyses, get_record,
                             register_pass, set_record)
from passes_registry.errors import OptionError

from qpasses.ir.fx import flat_values
from qpasses.ir.graph_runner import run_graph
from qpasses.ir.layers import quantizable_layers
from qpasses.ir.ops import PASSTHROUGH_FUNCTIONS, PASSTHROUGH_METHODS
from qpasses.ir.records import INT_SIM_KEY
from qpasses.algorithms.int_sim_check import classify_nodes
from qpasses.algorithms.int_sim_compare import (Scratch, code_diff, fake_quant_codes, int_equal,
                                                min_max)
from qpasses.modules.int_sim import IntSimModule, set_backend
from qpasses.modules.int_sim_layers import IntLayer
from qpasses.modules.int_sim_transformer import IntMatMul
from qpasses.algorithms.int_sim_reference import ReferenceInterpreter
from qpasses.ir.batches import context_batches

__all__ = ["AccumulatorOverflowError", "IntSimMismatchError", "VerifyIntSim",
           "VerifyIntSimOptions", "record_run", "summary_line"]

PASS_NAME = "verify-int-sim"
# oracle=auto takes the independent oracle up to this many MACs x samples (it runs in a few
# forwards' time: convolutions and matmuls on exact float64 BLAS, docs/int-sim.md)
AUTO_INDEPENDENT_MAC_SAMPLES = 5 * 10 ** 10


class IntSimMismatchError(PassFailure):
    """The integer graph disagrees with the independent reference (``node`` names the first)."""


class AccumulatorOverflowError(PassFailure):
    """An accumulator or integer tensor left its declared width/range (``node`` names it)."""


@dataclass(frozen=True)
class VerifyIntSimOptions:
    backend: Literal["lowered", "reference", "fast"] = field(default="lowered", metadata={
        "help": "backend the lowered graph runs on for the check (lowered: as it is)"})
    samples: int = field(default=4, metadata={
        "help": "number of input samples (rows) taken from example_inputs / calibration_data"})
    oracle: Literal["auto", "independent", "reference-backend"] = field(default="auto", metadata={
        "help": "independent: numpy/exact-rational interpreter written from the spec; "
                "reference-backend: the graph on int64 kernels; auto: independent below "
                "5e10 MAC-samples"})
    print: bool = field(default=False, metadata={
        "help": "print a one-line summary (checks, deviation from the fake-quant graph) to the "
                "PassContext stream"})
    acc_bits: int | None = field(default=None, metadata={
        "help": "overflow mode: every conv/linear accumulator must fit this signed width "
                "(none: each layer's proven width)"})
    deviation: bool = field(default=True, metadata={
        "help": "measure the deviation from the kept fake-quant graph (a fake-quant run and a "
                "per-op replay of the integer graph, about 40% of the pass's time); false: the "
                "bit-exact, range and width checks only"})

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise OptionError(PASS_NAME, "samples", f"must be >= 1, got {self.samples}")
        if self.acc_bits is not None and not 2 <= self.acc_bits <= 64:
            raise OptionError(PASS_NAME, "acc-bits", f"must be in 2..64, got {self.acc_bits}")


def _take_samples(batches: list[tuple[torch.Tensor, ...]], n: int) -> tuple[torch.Tensor, ...]:
    k = len(batches[0])
    cols: list[list[torch.Tensor]] = [[] for _ in range(k)]
    have = 0
    for b in batches:
        if have >= n:
            break
        take = min(n - have, b[0].shape[0]) if b[0].dim() else 1
        for i in range(k):
            cols[i].append(b[i][:take] if b[i].dim() else b[i])
        have += take
    return tuple(torch.cat(c) if c[0].dim() else c[0] for c in cols)


class _Run:
    """A run of a graph (:func:`qpasses.ir.graph_runner.run_graph`) whose ``hook`` sees, and may
    replace, every node's value."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm

    def run(self, *inputs: Any) -> Any:
        return run_graph(self.gm, inputs, self.hook)

    def hook(self, n: torch.fx.Node, v: Any) -> Any:
        return v


class _Recorder(_Run):
    def __init__(self, gm: torch.fx.GraphModule, keep: set[str] | None = None) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}
        self.keep = keep

    def hook(self, n: torch.fx.Node, v: Any) -> Any:
        if self.keep is not None and n.name not in self.keep:
            return v
        # a copy: a later in-place op (ReLU(inplace=True), the fast backend's owned buffers)
        # would otherwise rewrite the recorded value
        self.values[n.name] = v.clone() if isinstance(v, torch.Tensor) else \
            torch.utils._pytree.tree_map(
                lambda t: t.clone() if isinstance(t, torch.Tensor) else t, v)
        return v


class _LocalDeviation(_Run):
    """Runs the integer graph with every quantization point's value replaced by the fake-quant
    graph's codes, so each point's ops (the op itself, or a chain such as pool → flatten →
    requantize) see the fake-quant inputs: the deviation each contributes, without the cascade."""

    def __init__(self, gm: torch.fx.GraphModule, fq_codes: dict[str, torch.Tensor]) -> None:
        super().__init__(gm)
        self.fq_codes = fq_codes
        self.points = self.off = self.max_lsb = 0
        self.scratch = Scratch()

    def hook(self, n: torch.fx.Node, v: Any) -> Any:
        want = self.fq_codes.get(n.name)
        if want is None or n.op == "placeholder":
            return v
        if isinstance(v, torch.Tensor) and v.shape == want.shape:
            self.points += 1
            same = want if v.dtype == want.dtype else want.to(v.dtype)
            off, mx = code_diff(v, same, self.scratch)
            self.off += off[0] + off[1]
            self.max_lsb = max(self.max_lsb, mx)
            return same
        return v


class _FqPoints(_Run):
    """Runs the fake-quant graph; at each quantization point turns the value into codes (kept
    in ``fq_codes`` for the local replay) and compares them with the integer graph's recorded
    codes there (``stats``: points, exact points, codes, off by one, off by more, max LSB)."""

    def __init__(self, gm: torch.fx.GraphModule, fq_map: dict[str, dict[str, Any]],
                 values: dict[str, Any]) -> None:
        super().__init__(gm)
        self.fq_map, self.values = fq_map, values
        self.fq_codes: dict[str, torch.Tensor] = {}
        self.stats = [0, 0, 0, 0, 0, 0]
        self.scratch = Scratch()

    def hook(self, n: torch.fx.Node, fv: Any) -> Any:
        m = self.fq_map.get(n.name)
        if m is None or not isinstance(fv, torch.Tensor):
            return fv
        iv = self.values.get(m["node"])
        iv = iv if isinstance(iv, torch.Tensor) else None
        codes = fake_quant_codes(fv, m["scale"], int(m["zero_point"]), iv, self.scratch)
        self.fq_codes[m["node"]] = codes
        if iv is None or fv.shape != iv.shape:
            return fv
        (o1, om), mx = code_diff(codes, iv, self.scratch)
        st = self.stats
        st[0] += 1
        st[1] += not o1 + om
        st[2] += codes.numel()
        st[3] += o1
        st[4] += om
        st[5] = max(st[5], mx)
        return fv


def _may_leave(dtype: torch.dtype, lo: int, hi: int) -> bool:
    """Whether values of an integer ``dtype`` can lie outside ``[lo, hi]`` at all."""
    if dtype.is_floating_point or dtype == torch.bool:
        return True
    info = torch.iinfo(dtype)
    return info.min < lo or info.max > hi


def record_run(gm: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...],
               keep: set[str] | None = None) -> dict[str, Any]:
    """Every node's value on ``inputs`` (no_grad, eval); only those named in ``keep`` if given."""
    rec = _Recorder(gm, keep)
    with torch.no_grad():
        rec.run(*inputs)
    return rec.values


def _total_macs(gm: torch.fx.GraphModule) -> int:
    try:
        return sum(info.macs for info in quantizable_layers(gm))
    except Exception:  # noqa: BLE001 - shapes missing: treat as big
        return 10 ** 12


def _oracle_acc(n: torch.fx.Node, ins: Any, values: dict[str, Any],
                ref: dict[str, Any] | None, accs: dict[str, int] | None,
                same: dict[str, bool]) -> int | None:
    """The oracle's max |accumulator| of node ``n`` when it was computed from the very inputs
    the graph saw (else None: the caller recomputes it from the graph's inputs)."""
    if accs is None or ref is None or n.name not in accs:
        return None
    for a in ins:
        if a.name not in same:
            x, y = _as_np(values.get(a.name)), _as_np(ref.get(a.name))
            same[a.name] = x is not None and y is not None and x.shape == y.shape and \
                x.dtype.kind in "iub" and y.dtype.kind in "iub" and int_equal(x, y)
        if not same[a.name]:
            return None
    return accs[n.name]


class _Comparison:
    """Graph vs oracle values, node by node in graph order: ``checked`` (nodes compared),
    ``same`` (node -> its integer values are equal: the width check reuses the oracle's
    accumulators then), the first mismatch (raised by :meth:`raise_first`). A pass-through op
    (reshape, permute, indexing, copy) of nodes found equal gives equal values (both sides run the
    same torch op on equal inputs), and a float value the oracle took from the graph is the very
    same memory: both count as checked without a comparison."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.equal: set[str] = set()
        self.same: dict[str, bool] = {}
        self.checked = 0
        self.first: tuple[torch.fx.Node, str] | None = None

    def __call__(self, n: torch.fx.Node, ref_value: Any) -> None:
        if n.op in ("placeholder", "get_attr"):
            self.equal.add(n.name)                       # the same inputs and attributes
        if n.op in ("placeholder", "output") or n.name not in self.values:
            return
        a, b = _as_np(self.values[n.name]), _as_np(ref_value)
        if a is None or b is None:
            if _plain_equal(self.values[n.name], ref_value):
                self.equal.add(n.name)
            return
        self.checked += 1
        ints = a.dtype.kind in "iub" and b.dtype.kind in "iub"
        if a.shape != b.shape:
            self._mismatch(n, f"node '{n.name}' has shape {a.shape} but the {{oracle}} oracle "
                              f"gives {b.shape}")
            return
        if _same_array(a, b) or \
                (_passthrough(n) and all(i.name in self.equal for i in n.all_input_nodes)) or \
                (ints and int_equal(a, b)):
            self.equal.add(n.name)
            self.same[n.name] = ints
            return                                        # the common case: one pass, no copy
        self.same[n.name] = False
        if ints:
            diff = np.abs(a.astype(np.int64) - b.astype(np.int64))
        else:
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            both_nan = np.isnan(a.astype(np.float64)) & np.isnan(b.astype(np.float64))
            diff = np.where(both_nan, 0.0, diff)
        bad = int((diff != 0).sum())
        if bad:
            self._mismatch(n, f"node '{n.name}' ({n.op} {n.target}) differs from the {{oracle}} "
                              f"oracle in {bad} of {diff.size} values (max |diff| {diff.max()})")
        else:
            self.equal.add(n.name)

    def _mismatch(self, n: torch.fx.Node, message: str) -> None:
        if self.first is None:
            self.first = (n, message)

    def raise_first(self, oracle: str) -> None:
        if self.first is not None:
            n, message = self.first
            raise IntSimMismatchError(message.replace("{oracle}", oracle), node=n.name)


def _passthrough(n: torch.fx.Node) -> bool:
    """A node that only moves its input's values (reshape, permute, indexing, copy)."""
    return (n.op == "call_function" and n.target in PASSTHROUGH_FUNCTIONS) or \
        (n.op == "call_method" and n.target in PASSTHROUGH_METHODS)


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """Two views of the very same memory (a float node the oracle took from the graph)."""
    return a.dtype == b.dtype and a.strides == b.strides and \
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]


def _plain_equal(x: Any, y: Any) -> bool:
    """Equality of non-tensor values (sizes, ints, tuples of them); False where unsure."""
    if any(isinstance(v, (torch.Tensor, np.ndarray)) for v in flat_values(x) + flat_values(y)):
        return False
    try:
        return bool(x == y)
    except Exception:  # noqa: BLE001 - incomparable: not known equal
        return False


def _as_np(v: Any) -> np.ndarray | None:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        return v
    return None


@register_pass
class VerifyIntSim(Pass):
    """Check a lowered integer graph against an independent reference of its arithmetic, check
    ranges and accumulator widths, and measure the deviation from the fake-quant graph (module
    docstring). Requires ``int-sim``; changes nothing (its findings go to stats and the int-sim
    record's ``verify``, which is not part of the record's value)."""
    name = PASS_NAME
    summary = "verify the integer graph bit for bit against an independent reference"
    Options = VerifyIntSimOptions
    requires = frozenset({"int-sim"})
    preserves = PreservedAnalyses.all()
    reads_records = frozenset({INT_SIM_KEY})
    writes_records = frozenset({INT_SIM_KEY})

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        opts: VerifyIntSimOptions = self.options
        batches = context_batches(ctx, gm, limit=64)
        if not batches:
            raise PassFailure("verify-int-sim needs inputs: run it under PassContext("
                              "example_inputs=...) or PassContext(calibration_data=...)")
        inputs = _take_samples(batches, opts.samples)
        record = get_record(gm, INT_SIM_KEY)
        before = record.backend if record is not None else "fast"
        switched = opts.backend != "lowered" and opts.backend != before
        if switched:
            set_backend(gm, opts.backend)
        try:
            values = record_run(gm, inputs)
            # the oracle runs first (its accumulators serve the width check), but a range or
            # width violation is reported before anything the oracle found
            # (graph and oracle values are compared as the oracle produces them)
            cmp = _Comparison(values)
            oracle, accs, failure = self._run_oracle(gm, values, inputs, opts, cmp)
            stats = self._check_ranges(gm, values, opts, {}, accs, cmp.same)
            if failure is not None:
                raise failure
            cmp.raise_first(oracle)
            stats.update({"num_nodes_checked": cmp.checked, "oracle": oracle})
        finally:
            if switched:
                set_backend(gm, before)
        stats["num_samples"] = int(inputs[0].shape[0]) if inputs[0].dim() else 1
        source = record.fake_quant if record is not None else None
        if source is not None and opts.deviation:
            # only the codes at the quantization points and the output are read from here on:
            # the rest goes back to the allocator, which the two deviation runs then reuse
            # (fresh pages cost a page fault each: ~0.1 s per maxvit_t run at batch 2)
            keep = {m["node"] for m in record.fq_map.values()} | {_output_name(gm)}
            values = {k: v for k, v in values.items() if k in keep}
            del cmp, oracle, accs
            stats.update(self._deviation(gm, source, values, inputs, record.fq_map))
        record = get_record(gm, INT_SIM_KEY)     # set_backend may have replaced it
        if record is not None:
            set_record(gm, INT_SIM_KEY, replace(record, verify=dict(stats)))
        if opts.print:
            stream = getattr(ctx, "stream", None) or sys.stdout
            stream.write(summary_line(stats) + "\n")
        return PassResult(modified=False, stats=stats)

    # -- ranges and accumulator widths -------------------------------------------------------

    def _check_ranges(self, gm: torch.fx.GraphModule, values: dict[str, Any],
                      opts: VerifyIntSimOptions, ref: dict[str, Any] | None = None,
                      accs: dict[str, int] | None = None,
                      same: dict[str, bool] | None = None) -> dict[str, Any]:
        kinds, problems = classify_nodes(gm)
        if problems:
            raise PassFailure(f"the graph is not a well-formed int-sim graph: {problems[0]}")
        mods = dict(gm.named_modules())
        same = {} if same is None else same
        n_int, max_acc = 0, 0

        def check_width(amax: int, declared: int, n: torch.fx.Node, what: str) -> int:
            """The bits ``|amax|`` needs; AccumulatorOverflowError beyond the declared width."""
            need = amax.bit_length() + 1
            width = opts.acc_bits if opts.acc_bits is not None else declared
            if need > width:
                raise AccumulatorOverflowError(
                    f"accumulator of {what} reached |{amax}|, which needs {need} bits: it "
                    f"exceeds the declared {width}-bit width"
                    + (" (acc-bits option)" if opts.acc_bits is not None else ""), node=n.name)
            return need

        for n in gm.graph.nodes:
            if kinds.get(n.name) != "int":
                continue
            v = values.get(n.name)
            if not isinstance(v, torch.Tensor):
                continue
            n_int += 1
            if v.dtype.is_floating_point or v.dtype == torch.bool:
                raise AccumulatorOverflowError(f"integer node '{n.name}' produced a {v.dtype} "
                                               "tensor", node=n.name)
            m = mods.get(str(n.target)) if n.op == "call_module" else None
            if isinstance(m, IntSimModule) and v.numel():
                lo, hi = m.declared_range()
                vmin, vmax = min_max(v) if _may_leave(v.dtype, lo, hi) else (lo, hi)
                if vmin < lo or vmax > hi:
                    raise AccumulatorOverflowError(
                        f"node '{n.name}' ({type(m).__name__}) produced values in [{vmin}, "
                        f"{vmax}], outside its declared range [{lo}, {hi}]", node=n.name)
            if isinstance(m, IntLayer):
                x = values[n.args[0].name]
                xlo, xhi = min_max(x) if x.numel() and _may_leave(x.dtype, m.x_qmin, m.x_qmax) \
                    else (m.x_qmin, m.x_qmax)
                if xlo < m.x_qmin or xhi > m.x_qmax:
                    raise AccumulatorOverflowError(
                        f"input of layer '{n.target}' (node '{n.name}') spans [{xlo}, {xhi}], "
                        f"outside its declared input range [{m.x_qmin}, {m.x_qmax}]",
                        node=n.name)
                amax = _oracle_acc(n, (n.args[0],), values, ref, accs, same)
                if amax is None:
                    acc = m.accumulate(x, kernel="reference")
                    amax = int(acc.abs().max()) if acc.numel() else 0
                max_acc = max(max_acc, check_width(
                    amax, m.acc_bits, n, f"layer '{n.target}' (node '{n.name}')"))
            if isinstance(m, IntMatMul):
                amax = _oracle_acc(n, n.args[:2], values, ref, accs, same)
                if amax is None:
                    acc = m.accumulate(values[n.args[0].name], values[n.args[1].name],
                                       "reference")
                    amax = int(acc.abs().max()) if acc.numel() else 0
                max_acc = max(max_acc, check_width(amax, m.acc_bits, n, f"matmul '{n.name}'"))
        return {"num_int_nodes": n_int, "max_acc_bits_seen": max_acc}

    # -- the oracle ------------------------------------------------------------------------

    def _run_oracle(self, gm: torch.fx.GraphModule, values: dict[str, Any],
                    inputs: tuple[torch.Tensor, ...], opts: VerifyIntSimOptions,
                    cmp: _Comparison) -> tuple[str, dict[str, int] | None, Exception | None]:
        """Runs the oracle, each of its values going to ``cmp`` (graph order); ``(oracle, its
        accumulator maxima or None, what it raised or None)``."""
        oracle = opts.oracle
        if oracle == "auto":
            n = int(inputs[0].shape[0]) if inputs[0].dim() else 1
            oracle = "independent" if _total_macs(gm) * n <= AUTO_INDEPENDENT_MAC_SAMPLES \
                else "reference-backend"
        if oracle == "independent":
            kinds, _ = classify_nodes(gm)
            interp = ReferenceInterpreter(gm)
            try:
                interp.run(*inputs, trusted=values, kinds=kinds, observe=cmp)
            except Exception as e:  # noqa: BLE001 - re-raised after the range checks
                return oracle, None, e
            return oracle, interp.acc_absmax, None
        record = get_record(gm, INT_SIM_KEY)
        before = record.backend if record is not None else "fast"
        set_backend(gm, "reference")
        try:
            ref = record_run(gm, inputs)
        finally:
            set_backend(gm, before)
        for n in gm.graph.nodes:
            cmp(n, ref.get(n.name))
        return oracle, None, None

    # -- deviation from the fake-quant graph --------------------------------------------------

    def _deviation(self, gm: torch.fx.GraphModule, source: torch.fx.GraphModule,
                   values: dict[str, Any], inputs: tuple[torch.Tensor, ...],
                   fq_map: dict[str, dict[str, Any]]) -> dict[str, Any]:
        # the fake-quant graph's codes at each point, compared with the integer graph's as it
        # runs (no copy of its float values)
        fq = _FqPoints(source, fq_map, values)
        with torch.no_grad():
            yf = fq.run(*inputs)
        points, exact, total, off1, offmore, max_lsb = fq.stats
        # local deviation: each integer op fed with the fake-quant graph's own input codes
        # (no cascade of earlier differences), compared at its output quantizer
        local = _LocalDeviation(gm, fq.fq_codes)
        with torch.no_grad():
            local.run(*inputs)
        lpoints, loff, lmax = local.points, local.off, local.max_lsb
        # final outputs: the outputs of both graphs (no extra forward)
        yi = values[_output_name(gm)]
        diffs, agree = [], None
        for a, b in zip(flat_values(yf), flat_values(yi)):
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
                diffs.append(float((a.double() - b.double()).abs().max()) if a.numel() else 0.0)
                if a.dim() == 2 and agree is None and a.shape[1] > 1:
                    agree = float((a.argmax(1) == b.argmax(1)).double().mean() * 100)
        out: dict[str, Any] = {"fq_points": points, "fq_points_exact": exact,
                               "codes_total": total, "codes_off_by_one": off1,
                               "codes_off_more": offmore, "max_lsb_diff": max_lsb,
                               "local_points": lpoints, "local_codes_off": loff,
                               "local_max_lsb_diff": lmax,
                               "output_max_abs_diff": max(diffs) if diffs else 0.0}
        if agree is not None:
            out["top1_agree_pct"] = agree
        return out


def summary_line(stats: dict[str, Any]) -> str:
    """One line for humans: what was checked and how far int-sim is from fake-quant."""
    out = (f"verify-int-sim: {stats.get('num_nodes_checked', 0)} nodes bit-exact vs the "
           f"{stats.get('oracle', '?')} oracle on {stats.get('num_samples', 0)} samples, ranges "
           f"and accumulators (max {stats.get('max_acc_bits_seen', 0)} bits) within declared")
    if "codes_total" in stats:
        total = max(stats["codes_total"], 1)
        out += (f"; vs fake-quant: per op {stats['local_codes_off']} of {total} codes differ "
                f"(max {stats['local_max_lsb_diff']} LSB), whole graph "
                f"{100.0 * (stats['codes_off_by_one'] + stats['codes_off_more']) / total:.2f}% "
                f"differ (max {stats['max_lsb_diff']} LSB)")
        if "top1_agree_pct" in stats:
            out += f", top-1 agreement {stats['top1_agree_pct']:.1f}%"
    return out


def _output_name(gm: torch.fx.GraphModule) -> str:
    return next(n.name for n in reversed(gm.graph.nodes) if n.op == "output")
