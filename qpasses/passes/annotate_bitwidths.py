"""annotate-bitwidths: write weight and input-activation bit-widths on every quantizable layer.

The pass only writes annotations (``node.meta["qpasses"]``, see :mod:`qpasses.ir.annotations`); it never
changes the graph's structure or weights. The contract is in :class:`AnnotateBitwidths`'s
docstring. Helpers that later passes need are public here:

- :func:`nonnegative_nodes`: which fx nodes provably produce non-negative tensors;
- :func:`is_join` / :func:`join_inputs`: the add/cat joins whose inputs and output share a spec;
- :func:`scale_sharing_groups`: the groups of tensors that share one activation spec (and so one
  scale after calibration), recomputed from an annotated graph;
- :func:`load_config` / :func:`resolve_layer_bits`: the config file format and the resolution order.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch.fx

from passes_registry import Pass, PassResult, PreservedAnalyses, register_pass
from passes_registry.errors import OptionError

from qpasses.analyses.properties import (refuse_realized_widths, refuse_unshaped_layers,
                                         warn_unfolded_batch_norms)
from qpasses.errors import ConfigError, ConfigWarning
from qpasses.ir.act_products import leaf_float_islands, product_act_specs
from qpasses.ir.signs import nonnegative_nodes
from qpasses.ir.joins import is_join, layer_input, share_components
from qpasses.ir.layers import LayerInfo, first_last_layers, quantizable_layers
from qpasses.ir.annotations import MAX_BITS, QMeta, QuantSpec, get_qmeta, update_qmeta

__all__ = [
    "AnnotateBitwidths", "AnnotateBitwidthsOptions", "BitwidthConfig", "ConfigEntry",
    "LayerBits", "SKIP_ISLAND_PREFIX", "load_config", "nonnegative_nodes", "resolve_layer_bits",
]

PASS_NAME = "annotate-bitwidths"
SKIP_ISLAND_PREFIX = f"skipped by {PASS_NAME}"
CONFIG_KEYS = ("act_bits", "weight_bits")


# ---------------------------------------------------------------------------------------------
# Options


def _check_bits(option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(PASS_NAME, option, f"expected an int in 1..{MAX_BITS}, got {value!r}")
    if not 1 <= value <= MAX_BITS:
        raise OptionError(PASS_NAME, option,
                          f"{value} is out of range: bit-widths are 1..{MAX_BITS} (0 bits, i.e. "
                          "pruned kernels, is only allowed inside per-kernel lists of a config "
                          "file)")


@dataclass(frozen=True)
class AnnotateBitwidthsOptions:
    weight_bits: int = field(default=8, metadata={
        "help": f"default weight bit-width of every quantizable layer (1..{MAX_BITS})"})
    act_bits: int = field(default=8, metadata={
        "help": f"default bit-width of every layer's input activation (1..{MAX_BITS})"})
    first_last_bits: int | None = field(default=8, metadata={
        "help": "FracBits pinning: the first layers' weights and inputs and "
                "the last layers' weights get this width (the last layers' inputs keep act-bits); "
                "none disables pinning"})
    granularity: Literal["layer", "kernel"] = field(default="layer", metadata={
        "help": "layer: one weight width per layer; kernel: also write a per-kernel (per output "
                "channel) bit vector so later searches can change widths per kernel"})
    config: str | None = field(default=None, metadata={
        "help": "path of a JSON object mapping layer-name globs (fnmatch on module paths, e.g. "
                "'layer1.*.conv1') to {\"weight_bits\": int or per-kernel list, \"act_bits\": "
                "int}; entries apply in file order after the defaults and the pinning, later "
                "entries override earlier ones"})
    skip: tuple[str, ...] = field(default=(), metadata={
        "help": "layer-name globs left in float (float island, no bit-widths); beats everything"})

    def __post_init__(self) -> None:
        _check_bits("weight-bits", self.weight_bits)
        _check_bits("act-bits", self.act_bits)
        if self.first_last_bits is not None:
            _check_bits("first-last-bits", self.first_last_bits)
        if self.granularity not in ("layer", "kernel"):
            raise OptionError(PASS_NAME, "granularity",
                              f"'{self.granularity}' is not one of layer, kernel")
        if self.config is not None and (not isinstance(self.config, str) or not self.config):
            raise OptionError(PASS_NAME, "config", "expected a non-empty file path")
        if not isinstance(self.skip, tuple) or not all(isinstance(g, str) and g for g in self.skip):
            raise OptionError(PASS_NAME, "skip", f"expected a list of non-empty layer-name "
                                                 f"globs, got {self.skip!r}")


# ---------------------------------------------------------------------------------------------
# Config file and resolution order


@dataclass(frozen=True)
class ConfigEntry:
    """One ``glob -> settings`` entry of a config file (``None``: the entry leaves it alone)."""
    glob: str
    weight_bits: int | tuple[int, ...] | None = None
    act_bits: int | None = None


@dataclass(frozen=True)
class BitwidthConfig:
    path: str
    entries: tuple[ConfigEntry, ...]


def _config_type_error(path: str, glob: str, key: str, value: Any, want: str) -> ConfigError:
    return ConfigError(f"config '{path}': entry '{glob}': \"{key}\" must be {want}, "
                       f"got {json.dumps(value)}")


def _parse_entry(path: str, glob: str, settings: Any) -> ConfigEntry:
    if not isinstance(settings, dict):
        raise ConfigError(f"config '{path}': entry '{glob}' must be an object such as "
                          f"{{\"weight_bits\": 4, \"act_bits\": 8}}, got {json.dumps(settings)}")
    for key in settings:
        if key not in CONFIG_KEYS:
            close = difflib.get_close_matches(key, CONFIG_KEYS, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"config '{path}': entry '{glob}' has unknown key '{key}'{hint}; "
                              f"valid keys: {', '.join(CONFIG_KEYS)}")
    weight = settings.get("weight_bits")
    act = settings.get("act_bits")
    want_w = (f"an int in 1..{MAX_BITS} or a per-kernel list of ints in 0..{MAX_BITS} "
              "(0 = pruned kernel)")
    if "weight_bits" in settings:
        if isinstance(weight, list):
            if not weight:
                raise _config_type_error(path, glob, "weight_bits", weight, want_w)
            for i, b in enumerate(weight):
                if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= MAX_BITS:
                    raise ConfigError(
                        f"config '{path}': entry '{glob}': \"weight_bits\"[{i}] is "
                        f"{json.dumps(b)}; per-kernel bit-widths must be ints in 0..{MAX_BITS} "
                        "(0 = pruned kernel)")
            weight = tuple(weight)
        elif isinstance(weight, bool) or not isinstance(weight, int) \
                or not 1 <= weight <= MAX_BITS:
            raise _config_type_error(path, glob, "weight_bits", weight, want_w)
    if "act_bits" in settings:
        if isinstance(act, bool) or not isinstance(act, int) or not 1 <= act <= MAX_BITS:
            raise _config_type_error(path, glob, "act_bits", act, f"an int in 1..{MAX_BITS}")
    return ConfigEntry(glob, weight, act)


def _too_deep(text: str, limit: int = 16) -> str | None:
    """``line:column`` where JSON ``text`` nests deeper than ``limit`` (strings skipped)."""
    depth, bare = 0, re.sub(r'"(\\.|[^"\\])*"', lambda m: " " * len(m.group(0)), text)
    for i, c in enumerate(bare):
        depth += (c in "[{") - (c in "]}")
        if depth > limit:
            return f"{text.count(chr(10), 0, i) + 1}:{i - text.rfind(chr(10), 0, i)}"
    return None


def load_config(path: str) -> BitwidthConfig:
    """Read and validate a bit-width config file (format only; see :func:`check_config`).

    Raises :class:`~qpasses.errors.ConfigError` naming the file and the entry.
    """
    shown = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config '{path}' (option 'config' of pass '{PASS_NAME}'): no such "
                          f"file ({shown}); give the path of a JSON object such as "
                          '{"layer1.*.conv1": {"weight_bits": 3}, "fc": {"act_bits": 6}}')
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if _too_deep(text):
            raise ConfigError(f"config '{path}':{_too_deep(text)}: nested too deeply; a config "
                              'maps layer-name globs to settings: {"fc": {"weight_bits": 8}}')
        pairs = json.loads(text, object_pairs_hook=lambda kv: ("__pairs__", kv))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config '{path}' is not valid JSON: {e}") from None
    except OSError as e:
        raise ConfigError(f"config '{path}' cannot be read: {e}") from None
    if not (isinstance(pairs, tuple) and pairs[:1] == ("__pairs__",)):
        kind = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
                type(None): "null"}.get(type(pairs), type(pairs).__name__)
        raise ConfigError(f"config '{path}' must hold a JSON object mapping layer-name globs to "
                          f"settings such as {{\"fc\": {{\"weight_bits\": 8}}}}, got a JSON {kind}")

    def plain(v: Any) -> Any:  # undo the pairs hook below the top level
        if isinstance(v, tuple) and v[:1] == ("__pairs__",):
            return {k: plain(x) for k, x in v[1]}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    entries, seen = [], set()
    for glob, settings in pairs[1]:
        if not glob:
            raise ConfigError(f"config '{path}': empty layer-name glob")
        if glob in seen:
            raise ConfigError(f"config '{path}': glob '{glob}' appears twice; merge the two "
                              "entries (later entries override earlier ones)")
        seen.add(glob)
        entries.append(_parse_entry(path, glob, plain(settings)))
    return BitwidthConfig(path, tuple(entries))


def _closest(name: str, candidates: Sequence[str], n: int = 5) -> list[str]:
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.0)


def check_config(config: BitwidthConfig, layers: Sequence[LayerInfo]) -> None:
    """Check a config against the graph: every glob matches a layer, per-kernel lists fit."""
    names = list(dict.fromkeys(info.name for info in layers))
    for entry in config.entries:
        matched = [info for info in layers if fnmatch.fnmatchcase(info.name, entry.glob)]
        if not matched:
            # A warning, not an error (issue 3): one config often serves several models.
            if not names:
                hint = "the graph has no quantizable layers"
            else:
                closest = ", ".join(f"'{c}'" for c in _closest(entry.glob, names))
                hint = (f"closest layer names: {closest} ({len(names)} layers; globs use "
                        "fnmatch on module paths, e.g. 'layer1.*.conv1')")
            warnings.warn(ConfigWarning(f"annotate-bitwidths: config '{config.path}': glob "
                                        f"'{entry.glob}' matches no layer; {hint}"), stacklevel=2)
            continue
        if isinstance(entry.weight_bits, tuple):
            for info in matched:
                if len(entry.weight_bits) != info.out_channels:
                    raise ConfigError(
                        f"config '{config.path}': entry '{entry.glob}': per-kernel "
                        f"\"weight_bits\" has {len(entry.weight_bits)} entries but layer "
                        f"'{info.name}' ({info.kind}) has {info.out_channels} output channels; "
                        f"give a list of length {info.out_channels} or a single int")


@dataclass(frozen=True)
class LayerBits:
    """Resolved widths of one layer before scale sharing."""
    weight: int | tuple[int, ...]
    act: int
    pinned: bool = False
    act_from_config: bool = False


def resolve_layer_bits(names: Iterable[str], *, weight_bits: int, act_bits: int,
                       first_last_bits: int | None = None, first: Iterable[str] = (),
                       last: Iterable[str] = (),
                       entries: Sequence[ConfigEntry] = ()) -> dict[str, LayerBits]:
    """Resolve every layer's (weight, input-activation) widths; weight and act independently.

    Order, lowest precedence first: the defaults (``weight_bits``/``act_bits``) < FracBits pinning
    (first layers: weights and input at ``first_last_bits``; last layers: weights only) < config
    entries in file order, a later matching entry overriding an earlier one for each key it sets.
    """
    first, last = set(first), set(last)
    out = {}
    for name in names:
        w: int | tuple[int, ...] = weight_bits
        a = act_bits
        pinned = False
        if first_last_bits is not None:
            if name in first:
                w, a, pinned = first_last_bits, first_last_bits, True
            if name in last:
                w, pinned = first_last_bits, True
        from_config = False
        for e in entries:
            if fnmatch.fnmatchcase(name, e.glob):
                if e.weight_bits is not None:
                    w = e.weight_bits
                if e.act_bits is not None:
                    a, from_config = e.act_bits, True
        out[name] = LayerBits(w, a, pinned, from_config)
    return out


def _act_spec(bits: int, signed: bool) -> QuantSpec:
    return QuantSpec(bits=bits, signed=signed, scheme="symmetric" if signed else "unsigned")


# ---------------------------------------------------------------------------------------------
# The pass


@register_pass
class AnnotateBitwidths(Pass):
    """Write weight and input-activation bit-widths on every quantizable layer.

    **Writes** (through ``qpasses.ir.annotations.update_qmeta``, origin ``annotate-bitwidths``), on every
    quantizable layer node (``qpasses.ir.layers.quantizable_layers``: Conv1d/2d/3d including grouped
    and depthwise, Linear, and their functional forms):

    - ``QMeta.weight = QuantSpec(bits=w, signed=True, scheme="symmetric")``; with per-kernel bits
      (``granularity=kernel`` or a per-kernel list in the config) also ``bits_per_kernel`` (one
      width per output channel, ``axis=0``) and ``bits = max(bits_per_kernel)``. 0 in a per-kernel
      list means a pruned kernel.
    - ``QMeta.act``: the spec of the layer's input activation, ``bits=a``; unsigned
      (``scheme="unsigned"``) when every tensor in its sharing group is provably non-negative
      (:func:`nonnegative_nodes`: after relu/relu6/hardtanh(min>=0)/clamp(min>=0)/sigmoid/softmax,
      propagated through pools, flatten/view, dropout and cat/add of non-negative tensors), else
      signed symmetric (network inputs, conv/bn outputs, residual adds without relu).
    - ``QMeta.output`` on every add/cat join (``operator.add``, ``torch.add``, ``Tensor.add`` of two
      tensors; ``torch.cat``): the spec shared by the join's inputs and output (below). Later
      passes quantize a join's inputs and output with this spec.
    - ``QMeta.act`` on every act x act product (a matmul/bmm of two tensors,
      :mod:`qpasses.ir.act_products`; attention after ``canonicalize``): ``act-bits`` (or a
      config entry's ``act_bits`` whose glob matches the node name), shared by both operands,
      unsigned only when both are provably non-negative.
    - ``QMeta.float_island`` on every ``call_module`` leaf that owns parameters but is neither a
      quantizable layer nor a known op (an ``nn.MultiheadAttention`` canonicalize did not
      decompose, with the reason; a custom module: "no integer kernel for <Type>"), so the report
      lists it. An existing reason is kept.
    - Layers matched by ``skip`` get ``weight=None``, ``act=None`` and ``float_island =
      "skipped by annotate-bitwidths{skip=<glob>}"``. Float islands set by other passes are left
      alone (no specs written).

    **Resolution order** per layer, each key (weight, act) independently, lowest first:
    defaults (``weight-bits``, ``act-bits``) < FracBits pinning (docs/algorithms.md, "FracBits"; first layers,
    i.e. no quantizable layer upstream: weights *and* input at ``first-last-bits``; last layers, no
    quantizable layer downstream: weights only, the input keeps ``act-bits``) < ``config`` entries
    in file order, a later matching glob overriding an earlier one for the keys it sets (CSS-like
    "last writer wins"). ``skip`` beats all of them. This is the opposite of Distiller's override
    order (docs/algorithms.md, "Range-linear PTQ": an exact name wins, else the *first* matching pattern), so a Distiller
    override list converts by reversing it (and listing exact names last). Globs are
    ``fnmatch.fnmatchcase`` on module paths (``LayerInfo.name``, e.g. ``layer1.*.conv1``; ``*``
    also matches dots).

    **Scale sharing.** Tensors are grouped with a union-find (connected components): a tensor read
    by several layers is one group (a ResNet downsample and the next conv1 read the same tensor),
    and every add/cat join is united with its tensor inputs. All members of a group get one
    identical spec: ``bits`` = the max of the widths demanded in the group (each reading layer's
    resolved act width; each join demands the act width of its consumers, the nearest quantized
    layers downstream, or ``act-bits`` when none), signed unless every member is provably
    non-negative. A group whose demands disagree counts once in ``num_act_conflicts_resolved``;
    a layer whose config ``act_bits`` was raised this way gets a warning. Use
    :func:`scale_sharing_groups` to recompute the groups later.

    **Errors.** Bits out of range: ``OptionError`` (options) or ``ConfigError`` (config). Config
    file missing, not JSON, not an object, unknown keys, wrong types, fractional bits, a per-kernel
    list whose length is not the layer's output channels, a glob matching no layer:
    ``qpasses.errors.ConfigError`` naming the file, glob, layer and what is valid (with the 5
    closest layer names). A ``skip`` glob matching no layer: ``OptionError``. Widths already
    realized (fake quantizers or int-sim modules): ``AnnotationError`` (re-run from the float
    graph); conv/linear without traced shapes: ``TraceError``. Unfolded BatchNorms: one warning.

    Returns ``modified=False`` when every annotation already equals what it would write (re-running
    with the same options). Stats: ``num_layers`` (annotated), ``num_per_kernel``,
    ``num_skipped``, ``num_pinned``, ``num_unsigned_acts``, ``num_joins``, ``num_share_groups``
    (groups with more than one tensor), ``num_act_conflicts_resolved``, ``num_act_products``,
    ``num_float_leaves``.
    """
    name = PASS_NAME
    summary = "annotate per-layer/per-kernel weight and input-activation bit-widths"
    Options = AnnotateBitwidthsOptions
    establishes = frozenset({"bits-annotated"})
    preserves = PreservedAnalyses.unaffected_by("annotations")

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        opts: AnnotateBitwidthsOptions = self.options
        refuse_realized_widths(gm, self.name)
        refuse_unshaped_layers(gm, self.name)
        warn_unfolded_batch_norms(gm, self.name)
        layers = quantizable_layers(gm)
        nodes = {n.name: n for n in gm.graph.nodes}
        names = list(dict.fromkeys(info.name for info in layers))

        # skip globs
        skipped: dict[str, str] = {}  # layer node -> glob
        for glob in opts.skip:
            hit = [info for info in layers if fnmatch.fnmatchcase(info.name, glob)]
            if not hit:
                closest = ", ".join(f"'{c}'" for c in _closest(glob, names)) or "none"
                raise OptionError(self.name, "skip",
                                  f"glob '{glob}' matches no layer; closest layer names: "
                                  f"{closest}")
            for info in hit:
                skipped.setdefault(info.node, glob)
        foreign = {info.node for info in layers
                   if info.node not in skipped
                   and (fi := get_qmeta(nodes[info.node]).float_island) is not None
                   and not fi.startswith(SKIP_ISLAND_PREFIX)}

        config = load_config(opts.config) if opts.config is not None else None
        if config is not None:
            check_config(config, layers)
        first, last = (first_last_layers(gm, layers) if opts.first_last_bits is not None
                       else (set(), set()))
        resolved = resolve_layer_bits(names, weight_bits=opts.weight_bits, act_bits=opts.act_bits,
                                      first_last_bits=opts.first_last_bits, first=first,
                                      last=last, entries=config.entries if config else ())

        active = [info for info in layers if info.node not in skipped and info.node not in foreign]
        all_layer_nodes = {info.node for info in layers}
        inputs = {info.node: layer_input(nodes[info.node]) for info in active}
        joins = [n for n in gm.graph.nodes if is_join(n)]
        join_names = {j.name for j in joins}
        groups = share_components(gm, [x for x in inputs.values() if x is not None], joins)
        group_of = {m: gi for gi, comp in enumerate(groups) for m in comp}
        nonneg = nonnegative_nodes(gm)

        # widths demanded in each group
        demands: dict[int, list[int]] = {gi: [] for gi in range(len(groups))}
        for info in active:
            x = inputs[info.node]
            if x is not None:
                demands[group_of[x.name]].append(resolved[info.name].act)
        layer_act = {info.node: resolved[info.name].act for info in active}
        for j in joins:
            d = self._consumer_demand(j, inputs, layer_act, all_layer_nodes, join_names)
            demands[group_of[j.name]].append(d if d is not None else opts.act_bits)
        group_spec = {gi: _act_spec(max(demands[gi]) if demands[gi] else opts.act_bits,
                                    signed=not all(m in nonneg for m in comp))
                      for gi, comp in enumerate(groups)}
        conflicts = sum(1 for d in demands.values() if len(set(d)) > 1)

        modified = False
        stats = {"num_layers": 0, "num_per_kernel": 0, "num_skipped": 0, "num_pinned": 0,
                 "num_unsigned_acts": 0, "num_joins": len(joins),
                 "num_share_groups": sum(1 for c in groups if len(c) > 1),
                 "num_act_conflicts_resolved": conflicts}
        raised: list[str] = []
        for info in layers:
            node = nodes[info.node]
            old = get_qmeta(node)
            if info.node in foreign:
                stats["num_skipped"] += 1
                continue
            if info.node in skipped:
                stats["num_skipped"] += 1
                changes = {"weight": None, "act": None,
                           "float_island": f"{SKIP_ISLAND_PREFIX}{{skip={skipped[info.node]}}}"}
            else:
                bits = resolved[info.name]
                weight = self._weight_spec(bits.weight, info)
                x = inputs[info.node]
                act = group_spec[group_of[x.name]] if x is not None else None
                if act is not None and not act.signed:
                    stats["num_unsigned_acts"] += 1
                if act is not None and bits.act_from_config and act.bits != bits.act:
                    raised.append(f"'{info.name}' ({bits.act} -> {act.bits})")
                stats["num_layers"] += 1
                stats["num_per_kernel"] += weight.per_kernel
                stats["num_pinned"] += bits.pinned
                changes = {"weight": weight, "act": act,
                           "float_island": (None if old.float_island is None
                                            or old.float_island.startswith(SKIP_ISLAND_PREFIX)
                                            else old.float_island)}
            modified |= self._write(node, old, changes)
        for j in joins:
            modified |= self._write(j, get_qmeta(j), {"output": group_spec[group_of[j.name]]})
        products = product_act_specs(gm, opts.act_bits, config.entries if config else (), nonneg)
        for n, spec in products.items():
            if get_qmeta(n).float_island is None:
                modified |= self._write(n, get_qmeta(n), {"act": spec})
        islands = {n: why for n, why in leaf_float_islands(gm).items()
                   if get_qmeta(n).float_island in (None, why)}
        for n, why in islands.items():
            modified |= self._write(n, get_qmeta(n), {"float_island": why})
        stats.update(num_act_products=len(products), num_float_leaves=len(islands))
        if raised:
            warnings.warn(f"{self.name}: config act_bits raised to the width of the scale-sharing "
                          f"group (layers reading one tensor, or joined by add/cat, share one "
                          f"activation spec; the max wins): {', '.join(raised)}",
                          UserWarning, stacklevel=2)
        return PassResult(modified=modified, stats=stats)

    def _write(self, node: torch.fx.Node, old: QMeta, changes: Mapping[str, Any]) -> bool:
        if dataclasses.replace(old, **changes) == old:
            return False
        update_qmeta(node, origin=self.name, **changes)
        return True

    def _weight_spec(self, bits: int | tuple[int, ...], info: LayerInfo) -> QuantSpec:
        if isinstance(bits, tuple):
            return QuantSpec(bits=max(bits), signed=True, scheme="symmetric", axis=0,
                             bits_per_kernel=bits)
        if self.options.granularity == "kernel":
            return QuantSpec(bits=bits, signed=True, scheme="symmetric", axis=0,
                             bits_per_kernel=(bits,) * info.out_channels)
        return QuantSpec(bits=bits, signed=True, scheme="symmetric")

    @staticmethod
    def _consumer_demand(join: torch.fx.Node, inputs: Mapping[str, torch.fx.Node | None],
                         layer_act: Mapping[str, int], layer_nodes: set[str],
                         join_names: set[str]) -> int | None:
        """Max resolved act width of the quantized layers that read the join's value, looking
        through value-carrying ops (relu, pools, views...) and stopping at layers and joins."""
        best: int | None = None
        seen: set[str] = set()
        stack = [(join, u) for u in join.users]
        while stack:
            src, u = stack.pop()
            if u.name in seen:
                continue
            seen.add(u.name)
            if u.name in layer_nodes:
                if u.name in layer_act and inputs.get(u.name) is src:
                    best = layer_act[u.name] if best is None else max(best, layer_act[u.name])
                continue
            if u.name in join_names or u.op == "output":
                continue
            stack.extend((u, v) for v in u.users)
        return best
