"""calibrate: run calibration data through the observers, then freeze scales and zero points.

``PassContext.calibration_data`` is any iterable of batches (a DataLoader, a list, a generator).
A batch may be:

- a tensor: the model's (first) input;
- a tuple or list, e.g. ``(x, y)`` from a labelled DataLoader: its first ``k`` items are the
  model's ``k`` inputs (labels and anything after are ignored);
- a dict (or Mapping) with an ``"x"``, ``"input"``, ``"inputs"`` or ``"image"`` key holding the input
  (a tensor or a tuple of tensors).

The pass puts the graph in eval mode, switches every quantizer to "observe, do not quantize" (the
statistics are those of the float model, as in Distiller and torch.ao PTQ) and feeds up to
``num-batches`` batches under ``torch.no_grad`` with a tqdm progress bar (shown when
``PassContext.progress`` is set and stderr is a terminal). Then it freezes:

- activation quantizers: ``scale``/``zero_point`` from their observer (``method`` replaces the
  observers chosen by insert-fake-quant; ``inserted`` keeps them); PACT's ``alpha`` = the observed
  clip range, LSQ's ``step`` = the observed range's scale; observers off, fake quant on;
- weight quantizers: min/max scales of the current weights (they keep tracking the weights when
  they change, e.g. during QAT; see :mod:`qpasses.modules.fake_quant`);
- QMeta (through ``update_qmeta``): ``weight.scale/zero_point`` (one per output channel, or one
  value per tensor), ``act.scale/zero_point`` on layers, ``output.scale/zero_point`` on joins and on
  the inserted activation nodes. DoReFa weights get the grid step ``2/(2^b - 1)`` and no zero point.

Speed: on CPU the 4-D batches go in channels-last memory format (option ``channels-last``, on
by default) when :func:`qpasses.ir.memory_format.channels_last_blocker` finds every node reading
its inputs through their strides, and the fake-quant 2-D convolutions call oneDNN directly
(:func:`qpasses.modules.fake_quant_layers.onednn_convolutions`): ResNet-50's calibration forward
at batch 8 on one thread takes ~0.81 s instead of ~0.93 s. The ranges are the NCHW run's up to
float summation order. A graph that still fails on channels-last input reruns its first batch
as given and keeps that format.

The graph's train/eval mode is restored afterwards. :func:`write_qmeta` re-exports the current
quantizer state into QMeta (e.g. after QAT has moved the scales).

After QAT use ``calibrate{method=trained}``: no data is fed; the activation quantizers keep the
ranges training gave them (PACT clips, LSQ steps, observer state) and stop observing, weight
scales follow the trained weights, and QMeta gets the scales, so ``lower-to-int-sim`` implements
the trained model. Re-observing instead would replace learned clips by the float model's ranges:
a different model (a clip learned at 8.0 becomes ~1.1, a 7x finer grid the network never saw).

Errors (:class:`qpasses.errors.CalibrationError`): no calibration data (names
``PassContext(calibration_data=...)``), an empty iterable, a batch that is not one of the forms
above, a batch with NaN/inf (names the batch and input index), a quantizer that no batch reached
(names the quantizer and the layers it serves).
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx
from tqdm import tqdm

from passes_registry import Pass, PassResult, PreservedAnalyses, register_pass
from passes_registry.errors import OptionError, PassesError
from passes_registry import fingerprint, registry

from qpasses.errors import CalibrationError, NumericsError
from qpasses.modules.fake_quant import ActFakeQuant, FakeQuantize, WeightFakeQuant
from qpasses.ir.annotations import QMeta
from qpasses.ir.batches import batch_inputs, calibration_batches, check_batch_inputs
from qpasses.ir.fx import attr_value, graph_device, num_graph_inputs
from qpasses.ir.layers import quantizable_layers
from qpasses.ir.memory_format import channels_last_blocker, to_channels_last
from qpasses.modules.fake_quant_layers import onednn_convolutions
from qpasses.modules.lookup import layer_weight_quantizer, make_act_observer, write_qmeta

__all__ = ["Calibrate", "CalibrateOptions"]

PASS_NAME = "calibrate"


@dataclass(frozen=True)
class CalibrateOptions:
    method: Literal["inserted", "minmax", "moving-average", "avg", "percentile", "mse", "aciq",
                    "kl", "trained"] = field(default="inserted", metadata={
                        "help": "activation range method; 'inserted' keeps the observers chosen "
                                "by insert-fake-quant; 'trained' keeps the ranges QAT learned "
                                "(PACT clips, LSQ steps, observer state) and needs no data"})
    num_batches: int | None = field(default=None, metadata={
        "help": "use at most this many batches (none: the whole iterable)"})
    percentile: float = field(default=99.99, metadata={
        "help": "percentile for method=percentile"})
    channels_last: bool = field(default=True, metadata={
        "help": "feed 4-D CPU batches in channels-last memory format when every node of the "
                "graph reads its inputs through their strides (oneDNN convolutions and pooling "
                "run faster; ranges differ from an NCHW run by float summation order only); "
                "false feeds them as given"})

    def __post_init__(self) -> None:
        if self.num_batches is not None and self.num_batches < 1:
            raise OptionError(PASS_NAME, "num-batches", f"must be >= 1, got {self.num_batches}")
        if not 50.0 < self.percentile <= 100.0:
            raise OptionError(PASS_NAME, "percentile",
                              f"must be in (50, 100], got {self.percentile}")


def _show_progress(ctx: Any) -> bool:
    return bool(getattr(ctx, "progress", False)) and sys.stderr.isatty()


@register_pass
class Calibrate(Pass):
    """Feed ``PassContext.calibration_data`` through the observers and freeze scales/zero points
    into the quantizers and into QMeta (batch forms, modes and errors: module docstring).

    Requires ``fake-quant-inserted``; establishes ``calibrated`` (every quantizer has finite
    positive scales). Stats: ``num_batches``, ``num_quantizers``.
    """
    name = PASS_NAME
    summary = "run calibration data through the observers; freeze scales into quantizers and QMeta"
    Options = CalibrateOptions
    requires = frozenset({"fake-quant-inserted"})
    establishes = frozenset({"calibrated"})
    preserves = PreservedAnalyses.none()

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        opts: CalibrateOptions = self.options
        quantizers = {n: m for n, m in gm.named_modules() if isinstance(m, FakeQuantize)}
        acts = {n: m for n, m in quantizers.items() if isinstance(m, ActFakeQuant)}
        weights = {n: m for n, m in quantizers.items() if isinstance(m, WeightFakeQuant)}
        # honest "modified": nothing to calibrate (all layers skipped, no conv/linear) or a
        # re-run on the same data leaves the graph as it was (verify-each checks the claim)
        before = _Snapshot(gm)
        if opts.method == "trained":
            res = self._keep_trained(gm, acts, weights)
            return dataclasses.replace(res, modified=before.changed(gm))
        data = calibration_batches(ctx, self.name)
        if opts.method != "inserted":
            for n, q in acts.items():
                q.observer = make_act_observer(opts.method, q.signed, percentile=opts.percentile,
                                               bits=q.num_bits, where=f"quantizer '{n}'").to(
                    q.bits.device)
        for q in acts.values():
            q.observer.reset()
        saved = {n: (q.fake_quant_on, q.observing) for n, q in quantizers.items()}
        was_training = gm.training
        ok = False
        try:
            for q in quantizers.values():
                q.enable_fake_quant(False)
            for q in acts.values():
                q.enable_observer(True)
            gm.eval()
            seen = self._feed(gm, ctx, data, acts)
            self._check_observed(gm, acts)
            for n, q in acts.items():
                try:
                    q.init_from_observer()
                except NumericsError as e:
                    raise CalibrationError(f"quantizer '{n}' ({_serves(q)}): {e}") from None
                q.enable_observer(False)
            self._observe_weights(gm)
            for q in quantizers.values():
                q.enable_fake_quant(True)
            ok = True
        finally:
            gm.train(was_training)
            if not ok:
                for n, q in quantizers.items():
                    q.enable_fake_quant(saved[n][0])
                    q.enable_observer(saved[n][1])
        write_qmeta(gm, origin=self.name)
        return PassResult(modified=before.changed(gm), stats={"num_batches": seen,
                                                "num_quantizers": len(quantizers),
                                                "num_weight_quantizers": len(weights)})

    def _keep_trained(self, gm: torch.fx.GraphModule, acts: dict[str, ActFakeQuant],
                      weights: dict[str, WeightFakeQuant]) -> PassResult:
        _keep_trained_ranges(gm, acts)
        self._observe_weights(gm)
        for q in list(acts.values()) + list(weights.values()):
            q.enable_fake_quant(True)
        write_qmeta(gm, origin=self.name)
        return PassResult(modified=True, stats={"num_batches": 0,
                                                "num_quantizers": len(acts) + len(weights),
                                                "num_weight_quantizers": len(weights)})

    def _feed(self, gm: torch.fx.GraphModule, ctx: Any, data: Iterable,
              acts: dict[str, ActFakeQuant]) -> int:
        opts: CalibrateOptions = self.options
        limit = opts.num_batches
        try:
            total: int | None = len(data)  # type: ignore[arg-type]
        except TypeError:
            total = None
        if total is not None and limit is not None:
            total = min(total, limit)
        k, device = num_graph_inputs(gm), graph_device(gm)
        layout = to_channels_last if (opts.channels_last and device.type == "cpu"
                                      and channels_last_blocker(gm) is None) else None
        seen = 0
        with torch.no_grad(), tqdm(total=total, desc=self.name, unit="batch",
                                   disable=not _show_progress(ctx), leave=False) as bar:
            for i, batch in enumerate(_user_batches(data)):
                inputs = batch_inputs(batch, i, k)
                check_batch_inputs(gm, inputs, i, self.name)
                for j, t in enumerate(inputs):
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        what = "NaN" if bool(torch.isnan(t).any()) else "inf"
                        raise CalibrationError(
                            f"calibration batch {i} (input {j}) contains {what} values; clean "
                            "the data (observers would turn them into invalid scales)")
                try:
                    layout = self._run_batch(gm, [t.to(device) for t in inputs], layout,
                                             seen == 0, acts)
                except (RuntimeError, TypeError, ValueError, IndexError) as e:
                    if isinstance(e, PassesError):
                        raise
                    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
                    raise CalibrationError(
                        f"{self.name}: running calibration batch {i} (input shapes {shapes}) "
                        f"through the graph failed: {type(e).__name__}: {e}; give batches like "
                        "the example inputs the model was traced with") from e
                seen += 1
                bar.update(1)
                if limit is not None and seen >= limit:
                    break  # before pulling another batch from a (possibly costly) iterator
        if seen == 0:
            raise CalibrationError("PassContext(calibration_data=...) yielded no batches; give "
                                   "at least one batch")
        return seen

    @staticmethod
    def _run_batch(gm: torch.fx.GraphModule, inputs: list[torch.Tensor],
                   layout: Callable[[torch.Tensor], torch.Tensor] | None, first: bool,
                   acts: dict[str, ActFakeQuant]) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Run one batch, in channels-last format while ``layout`` says so; the layout for the
        next batch. A graph that fails on channels-last input (an op the node check could not
        see into) fails on its first batch: the observers forget that batch and it reruns as
        given, as does every later batch."""
        if layout is None:
            gm(*inputs)
            return None
        try:
            with onednn_convolutions():
                gm(*(layout(t) for t in inputs))
            return layout
        except RuntimeError:
            if not first:
                raise
            for q in acts.values():
                q.observer.reset()
            gm(*inputs)
            return None

    @staticmethod
    def _check_observed(gm: torch.fx.GraphModule, acts: dict[str, ActFakeQuant]) -> None:
        missing = [f"'{n}' ({_serves(q)})" for n, q in acts.items() if not q.observed]
        if missing:
            raise CalibrationError(
                f"quantizer {missing[0]} was never observed"
                + (f" (and {len(missing) - 1} more: {', '.join(missing[1:4])})"
                   if len(missing) > 1 else "")
                + ": no calibration batch reached it (a branch the data never took, or a "
                  "quantizer outside the graph); feed data that exercises it, or leave the layer "
                  "in float")

    @staticmethod
    def _observe_weights(gm: torch.fx.GraphModule) -> None:
        nodes = {n.name: n for n in gm.graph.nodes}
        for info in quantizable_layers(gm):
            wq = layer_weight_quantizer(gm, nodes[info.node])
            if wq is None:
                continue
            w = attr_value(gm, info.weight_attr)
            wq.observe(w)


class _Snapshot:
    """The graph's state before the pass, to tell honestly whether the pass changed it: exactly
    "``fingerprint(gm)`` differs" (structure, annotations, weights, records), computed cheaper.
    The weights aspect (tensor identities and versions; observers write their buffers in place)
    is compared first; the annotations only when everything else is unchanged, QMeta values by
    identity first (frozen objects: the same object has the same text) and by text otherwise."""

    _CHEAP = frozenset({"structure", "weights", "records"})

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.cheap = fingerprint(gm, self._CHEAP)
        self.annotations = _annotation_values(gm)

    def changed(self, gm: torch.fx.GraphModule) -> bool:
        if fingerprint(gm, self._CHEAP) != self.cheap:
            return True
        after = _annotation_values(gm)
        if [k for k, _ in after] != [k for k, _ in self.annotations]:
            return True
        return any(old is not new and _text(old) != _text(new)
                   for (_, old), (_, new) in zip(self.annotations, after))


def _annotation_values(gm: torch.fx.GraphModule) -> list[tuple[tuple[str, str], Any]]:
    """((node name, key), value) of every registered annotation, in fingerprint order; values
    other than the frozen QMeta are kept as their text (they could be mutated in place)."""
    keys = sorted(registry.annotation_keys())
    return [((n.name, k), _kept(n.meta[k])) for n in gm.graph.nodes for k in keys if k in n.meta]


def _kept(value: Any) -> Any:
    return value if type(value) is QMeta else ("text", repr(value))


def _text(kept: Any) -> str:
    return kept[1] if isinstance(kept, tuple) else repr(kept)


def _user_batches(data: Iterable) -> Iterable:
    """The user's batches; an exception raised by their iterable (a DataLoader worker, a
    generator) becomes a CalibrationError naming the batch index, with the user's exception as
    ``__cause__``. KeyboardInterrupt and SystemExit pass through."""
    try:
        it = iter(data)
    except Exception as e:
        raise CalibrationError(f"{PASS_NAME}: iter(calibration_data) raised "
                               f"{type(e).__name__}: {e}") from e
    i = 0
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise CalibrationError(f"{PASS_NAME}: the calibration data raised "
                                   f"{type(e).__name__} while producing batch {i}: {e}") from e
        yield batch
        i += 1


def _serves(q: ActFakeQuant) -> str:
    return ("input of " + ", ".join(q.consumers)) if q.consumers else "no recorded consumer"


def _keep_trained_ranges(gm: torch.fx.GraphModule, acts: dict[str, ActFakeQuant]) -> None:
    """Freeze the activation quantizers as training left them; CalibrationError naming the first
    one without a usable range (never trained or observed)."""
    for n, q in acts.items():
        try:
            scale, _ = q.qparams()
        except CalibrationError as e:
            raise CalibrationError(f"{PASS_NAME}{{method=trained}}: quantizer '{n}' "
                                   f"({_serves(q)}) has no trained range ({e}); calibrate it with "
                                   "data (method=inserted) instead") from None
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise CalibrationError(f"{PASS_NAME}{{method=trained}}: quantizer '{n}' "
                                   f"({_serves(q)}) has scale {scale.flatten()[:4].tolist()}; "
                                   "calibrate it with data (method=inserted) instead")
        q.enable_observer(False)
