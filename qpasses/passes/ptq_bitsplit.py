"""ptq-bitsplit: Bit-split and stitching post-training weight quantization (docs/algorithms.md,
"Bit-split").

Pipeline position: after ``insert-fake-quant`` (which creates the weight quantizers and their bit
vectors), normally after ``calibrate`` too::

    graph(fold-batch-norm,annotate-bitwidths{weight-bits=3 act-bits=8},insert-fake-quant,
          calibrate{method=mse},ptq-bitsplit{iters=20})

For every quantized conv/linear layer (module layers; functional layers, conv3d and DoReFa weights
are skipped with a warning and keep their min/max weights) the pass

1. collects calibration statistics with forward pre-hooks from ``PassContext.calibration_data``
   (batch forms as in ``calibrate``), up to ``samples`` samples: ``ceil(rows / samples)`` random
   output positions per sample are kept and only their im2col patches are extracted (zero / the
   layer's padding mode applied first; ``rows`` ~ the official K = 12,000), accumulating
   ``A = X^T X`` (float32 per batch, summed in float64) and ``C = Y^T X`` -- never X itself. The
   target Y is the *float* layer's output minus its bias on the *float* model's input. Cost:
   ``rows * N^2`` per layer for A (N = fan-in); ``rows=4096`` is about 3x cheaper on ResNets.

   - ``source=fp`` (default, the paper's ``ec=False``): X is the float model's input (every fake
     quantizer off), so ``C = W A``; one pass over the data for all layers.
   - ``source=quantized`` (``ec=True``, error compensation): X is the layer input computed by the
     already-quantized prefix: layers solved earlier with their bit-split weights and every
     *calibrated* activation quantizer on (uncalibrated ones stay off); Y still comes from the
     float model at the same positions. Two partial forward passes per layer (the forward stops
     at the layer).
2. solves ``min ||Y - X (alpha * Q)^T||`` with :func:`qpasses.algorithms.bitsplit.bitsplit_solve`
   (round-to-nearest at the best MSE clip as the start, ``iters`` alpha + ternary-plane sweeps,
   per-kernel bit-widths grouped, one scale per output channel or per layer with
   ``per-channel=false``), one tqdm step per layer;
3. **writes the result where lowering reads it**: the layer's float weight is replaced by the
   dequantized ``alpha_j * q_j`` (float32, computed exactly as the fake quantizer computes its
   output), the weight quantizer's ``scale`` is frozen to ``alpha`` (zero point 0) with its observer
   off, so fake-quant reproduces the codes ``q`` exactly (checked) and ``round(w / scale)`` gives
   them back bit for bit; ``QMeta.weight.scale`` is re-exported (``calibrate.write_qmeta``). A later
   ``calibrate`` does not overwrite the frozen scale (the quantizer remembers the weight version
   it was frozen for); changing the weight (QAT) or the bits does.

Bits: ``w-bits`` unset (default) uses the annotated bits, per kernel when annotated so; an int
overrides every handled layer's weight bits (quantizer and ``QMeta.weight``, per-kernel vectors
dropped). Bit-split needs >= 2 bits per kernel (0-bit kernels stay pruned).

``bn-reestimate=true`` (as the official code does): afterwards, BatchNorm modules still in the graph (BN not folded)
get their running statistics re-estimated from the calibration data in train mode, no grad, fake
quant on (cumulative average). With BN folded it does nothing.

Per-layer relative reconstruction errors ``||Y - X W_hat^T||^2 / ||Y||^2`` of the start
(round-to-nearest, best MSE clip) and of the result are left in the ``ptq_bitsplit`` graph
record (``BitsplitRecord``).

Errors: no calibration data or an empty iterable (:class:`CalibrationError`), ``w-bits`` < 2 or
1-bit kernels (:class:`OptionError`), a layer whose input no batch reached (:class:`CalibrationError`
naming the layer).
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from passes_registry import Pass, PassResult, PreservedAnalyses, register_pass, set_record
from passes_registry.errors import OptionError

from qpasses.errors import CalibrationError, NumericsError, QpassesWarning
from qpasses.ir.records import BITSPLIT_KEY, BitsplitLayerError, BitsplitRecord
from qpasses.modules.fake_quant import ActFakeQuant, FakeQuantize, WeightFakeQuant
from qpasses.modules.fake_quant_layers import is_fake_quant_layer
from qpasses.ir.layers import LayerInfo, quantizable_layers
from qpasses.ir.annotations import get_qmeta, update_qmeta
from qpasses.algorithms.bitsplit import bitsplit_solve, channel_error, rtn_mse_clip
from qpasses.ir.batches import batch_inputs, calibration_batches
from qpasses.modules.lookup import layer_weight_quantizer, write_qmeta

__all__ = ["PtqBitsplit", "PtqBitsplitOptions"]

PASS_NAME = "ptq-bitsplit"


@dataclass(frozen=True)
class PtqBitsplitOptions:
    w_bits: int | None = field(default=None, metadata={
        "help": "weight bits for every layer (>= 2); unset: the annotated (per-kernel) bits"})
    iters: int = field(default=20, metadata={
        "help": "alpha + bit-plane sweeps per layer (the official code runs 100)"})
    per_channel: bool = field(default=True, metadata={
        "help": "one scale per output channel (false: one per layer)"})
    samples: int = field(default=512, metadata={
        "help": "calibration samples (images) to use at most"})
    rows: int = field(default=12000, metadata={
        "help": "im2col rows per layer to aim for (random positions, rows/samples per sample)"})
    source: Literal["fp", "quantized"] = field(default="fp", metadata={
        "help": "layer inputs from the float model (fp) or from the already-quantized prefix"})
    bn_reestimate: bool = field(default=False, metadata={
        "help": "re-estimate BatchNorm running statistics afterwards (unfolded BN only)"})
    seed: int = field(default=0, metadata={"help": "seed of the position sampling"})

    def __post_init__(self) -> None:
        if self.w_bits is not None and self.w_bits < 2:
            raise OptionError(PASS_NAME, "w-bits",
                              f"must be >= 2 (bit-split splits M-bit weights into M-1 ternary "
                              f"planes, so ternary needs at least 2 bits), got {self.w_bits}")
        if self.w_bits is not None and self.w_bits > 16:
            raise OptionError(PASS_NAME, "w-bits", f"must be <= 16, got {self.w_bits}")
        if self.iters < 0:
            raise OptionError(PASS_NAME, "iters", f"must be >= 0, got {self.iters}")
        if self.samples < 1:
            raise OptionError(PASS_NAME, "samples", f"must be >= 1, got {self.samples}")
        if self.rows < 1:
            raise OptionError(PASS_NAME, "rows", f"must be >= 1, got {self.rows}")


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early."""


@dataclass
class _Layer:
    info: LayerInfo
    mod: nn.Module
    wq: WeightFakeQuant
    index: int
    groups: int = 1
    A: Tensor | None = None      # (G, Ng, Ng)
    B: Tensor | None = None      # (G, Ng, Ng) X_fp^T X_q (source=quantized)
    yy: Tensor | None = None     # (M,)
    rows: int = 0


def _rows(layer: _Layer, x: Tensor, per_sample: int, gen_seed: int) -> Tensor:
    """im2col rows of a layer input at random positions: (G, K, Ng) float32 (Gram products are
    taken per batch in float32 and summed in float64)."""
    mod = layer.mod
    x = x.detach()
    if x.dim() == 0 or x.shape[0] == 0:
        return torch.zeros(layer.groups, 0, mod.weight[0].numel())
    if isinstance(mod, nn.Linear):
        b = x.shape[0]
        cols = x.reshape(b, -1, x.shape[-1])                  # (B, L, N)
        g = 1
    else:
        conv1d = isinstance(mod, nn.Conv1d)
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            x = F.pad(x, tuple(mod._reversed_padding_repeated_twice),
                      mode="constant" if mod.padding_mode == "zeros" else mod.padding_mode)
            pad: Any = (0, 0)
        else:
            pad = (0, mod.padding[0]) if conv1d else tuple(mod.padding)
        if conv1d:
            x = x.unsqueeze(2)
            k, d, s = (1, mod.kernel_size[0]), (1, mod.dilation[0]), (1, mod.stride[0])
        else:
            k, d, s = mod.kernel_size, mod.dilation, mod.stride
        g = mod.groups
        bsz, c, h, w = x.shape
        ho = (h + 2 * pad[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
        wo = (w + 2 * pad[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
        if per_sample < ho * wo:
            # only the sampled patches (same order as F.unfold: C, kh, kw), no full im2col
            gen = torch.Generator().manual_seed(gen_seed)
            idx = torch.rand(bsz, ho * wo, generator=gen).argsort(1)[:, :per_sample]
            idx = idx.to(x.device)
            xp = F.pad(x, (pad[1], pad[1], pad[0], pad[0]))
            hs = (idx // wo)[:, :, None] * s[0] + torch.arange(k[0], device=x.device) * d[0]
            ws = (idx % wo)[:, :, None] * s[1] + torch.arange(k[1], device=x.device) * d[1]
            bi = torch.arange(bsz, device=x.device)[:, None, None, None, None]
            ci = torch.arange(c, device=x.device)[None, None, :, None, None]
            patches = xp[bi, ci, hs[:, :, None, :, None], ws[:, :, None, None, :]]
            n = c * k[0] * k[1]
            return patches.reshape(-1, g, n // g).transpose(0, 1).float()
        cols = F.unfold(x, k, dilation=d, padding=pad, stride=s).transpose(1, 2)  # (B, L, N)
    b, length, n = cols.shape
    if per_sample < length:
        gen = torch.Generator().manual_seed(gen_seed)
        idx = torch.rand(b, length, generator=gen).argsort(1)[:, :per_sample].to(cols.device)
        cols = cols.gather(1, idx[:, :, None].expand(-1, -1, n))
    return cols.reshape(-1, g, n // g).transpose(0, 1).float()


@register_pass
class PtqBitsplit(Pass):
    """Bit-split and stitching PTQ of the weights of every fake-quantized conv/linear layer
    (details, bit and scale bookkeeping, errors: module docstring). Requires
    ``fake-quant-inserted``. Stats: ``num_layers``, ``num_skipped``, ``num_samples``,
    ``collect_ms`` / ``solve_ms`` (time collecting statistics / solving)."""
    name = PASS_NAME
    summary = "bit-split & stitching post-training weight quantization (response reconstruction)"
    Options = PtqBitsplitOptions
    requires = frozenset({"fake-quant-inserted"})
    preserves = PreservedAnalyses.none()
    writes_records = frozenset({BITSPLIT_KEY})

    # ----------------------------------------------------------------------------------------------

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        opts: PtqBitsplitOptions = self.options
        data = calibration_batches(ctx, self.name)
        layers, skipped = self._layers(gm)
        if opts.w_bits is not None:
            nodes = {n.name: n for n in gm.graph.nodes}
            for L in layers:
                L.wq.set_bits(opts.w_bits)
                node = nodes[L.info.node]
                spec = get_qmeta(node).weight
                if spec is not None:
                    update_qmeta(node, origin=self.name,
                                 weight=spec.replace(bits=opts.w_bits, bits_per_kernel=None,
                                                     scale=None, zero_point=None))
        for L in layers:
            bits = L.wq.bits
            if bool((bits == 1).any()):
                raise OptionError(self.name, "w-bits",
                                  f"layer '{L.info.name}' has 1-bit kernels; bit-split needs >= 2 "
                                  "bits per kernel (ternary planes); re-annotate with >= 2 bits "
                                  "or set w-bits")
        quantizers = {n: m for n, m in gm.named_modules() if isinstance(m, FakeQuantize)}
        saved = {n: (q.fake_quant_on, q.observing) for n, q in quantizers.items()}
        was_training = gm.training
        errors: dict[str, BitsplitLayerError] = {}
        n_samples = 0
        t_collect = t_solve = 0.0
        try:
            gm.eval()
            for q in quantizers.values():
                q.enable_observer(False)
            t0 = time.perf_counter()
            if opts.source == "fp":
                n_samples = self._collect_fp(gm, ctx, data, layers, quantizers)
            t_collect += time.perf_counter() - t0
            bar = tqdm(layers, desc=self.name, unit="layer", leave=False,
                       disable=not (bool(getattr(ctx, "progress", False)) and sys.stderr.isatty()))
            for L in bar:
                bar.set_postfix_str(L.info.name)
                t0 = time.perf_counter()
                if opts.source == "quantized":
                    n_samples = self._collect_quantized(gm, ctx, data, L, layers, quantizers)
                t1 = time.perf_counter()
                errors[L.info.name] = self._solve(L)
                L.A = L.B = None  # free the statistics
                t_collect += t1 - t0
                t_solve += time.perf_counter() - t1
        finally:
            for n, q in quantizers.items():
                q.enable_fake_quant(saved[n][0])
                if not (isinstance(q, WeightFakeQuant) and any(L.wq is q for L in layers)):
                    q.enable_observer(saved[n][1])
            gm.train(was_training)
        for L in layers:
            L.wq.enable_fake_quant(True)
        write_qmeta(gm, origin=self.name)
        set_record(gm, BITSPLIT_KEY, BitsplitRecord(errors))
        if opts.bn_reestimate:
            self._bn_reestimate(gm, ctx, data)
        return PassResult(modified=True, stats={"num_layers": len(layers),
                                                "num_skipped": skipped,
                                                "num_samples": n_samples,
                                                "collect_ms": int(1000 * t_collect),
                                                "solve_ms": int(1000 * t_solve)})

    # -- layers -----------------------------------------------------------------------------------

    def _layers(self, gm: torch.fx.GraphModule) -> tuple[list[_Layer], int]:
        nodes = {n.name: n for n in gm.graph.nodes}
        out: list[_Layer] = []
        skipped = 0
        for info in quantizable_layers(gm):
            node = nodes[info.node]
            if get_qmeta(node).float_island is not None:
                continue
            wq = layer_weight_quantizer(gm, node)
            if wq is None:
                continue
            mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
            why = None
            if mod is None or not is_fake_quant_layer(mod):
                why = "a functional layer (no module to hook)"
            elif isinstance(mod, nn.Conv3d):
                why = "conv3d is not supported"
            elif wq.scheme == "dorefa":
                why = "DoReFa weights have no scale to optimise"
            if why is not None:
                warnings.warn(f"{self.name}: layer '{info.name}' is left as is: {why}",
                              QpassesWarning, stacklevel=2)
                skipped += 1
                continue
            out.append(_Layer(info, mod, wq, len(out),  # type: ignore[arg-type]
                              groups=getattr(mod, "groups", 1)))
        return out, skipped

    # -- data -------------------------------------------------------------------------------------

    def _batches(self, gm: torch.fx.GraphModule, data: Iterable) -> Iterable[tuple[int, tuple]]:
        opts: PtqBitsplitOptions = self.options
        k = max(1, sum(1 for n in gm.graph.nodes if n.op == "placeholder"))
        device = next((t.device for t in list(gm.parameters()) + list(gm.buffers())),
                      torch.device("cpu"))
        seen = 0
        for i, batch in enumerate(data):
            inputs = batch_inputs(batch, i, k)
            left = opts.samples - seen
            inputs = tuple(t[:left].to(device) for t in inputs)
            for j, t in enumerate(inputs):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise CalibrationError(f"calibration batch {i} (input {j}) contains NaN/inf "
                                           "values; clean the data")
            yield i, inputs
            seen += int(inputs[0].shape[0]) if inputs[0].dim() > 0 else 1
            if seen >= opts.samples:
                break

    def _per_sample(self) -> int:
        opts: PtqBitsplitOptions = self.options
        return max(1, math.ceil(opts.rows / opts.samples))

    def _seed(self, batch: int, layer: int) -> int:
        return (self.options.seed * 1_000_003 + batch * 7919 + layer) % (2**62)

    def _collect_fp(self, gm: torch.fx.GraphModule, ctx: Any, data: Iterable,
                    layers: list[_Layer], quantizers: dict[str, FakeQuantize]) -> int:
        for q in quantizers.values():
            q.enable_fake_quant(False)
        state = {"batch": 0}
        per_sample = self._per_sample()

        def hook(L: _Layer) -> Any:
            def fn(mod: nn.Module, args: tuple) -> None:
                cols = _rows(L, args[0], per_sample, self._seed(state["batch"], L.index))
                a = (cols.transpose(1, 2) @ cols).double()
                L.A = a if L.A is None else L.A + a
                L.rows += cols.shape[1]
            return fn

        handles = [L.mod.register_forward_pre_hook(hook(L)) for L in layers]
        n = nb = 0
        try:
            with torch.no_grad():
                for i, inputs in self._batches(gm, data):
                    state["batch"] = i
                    gm(*inputs)
                    n += int(inputs[0].shape[0])
                    nb += 1
        finally:
            for h in handles:
                h.remove()
        if nb == 0:
            raise CalibrationError("PassContext(calibration_data=...) yielded no batches; give "
                                   "at least one batch")
        for L in layers:
            self._check_seen(L)
            w = L.mod.weight.detach().double().reshape(L.groups, -1, L.A.shape[-1])  # type: ignore
            L.B = None
            L.yy = ((w @ L.A) * w).sum(-1).reshape(-1)                             # type: ignore
        return n

    def _check_seen(self, L: _Layer) -> None:
        if L.A is None or L.rows == 0:
            raise CalibrationError(
                f"{self.name}: the input of layer '{L.info.name}' was never observed: no "
                "calibration batch reached it (a branch the data never took); feed data that "
                "exercises it, or leave the layer in float")

    def _collect_quantized(self, gm: torch.fx.GraphModule, ctx: Any, data: Iterable, L: _Layer,
                           layers: list[_Layer], quantizers: dict[str, FakeQuantize]) -> int:
        per_sample = self._per_sample()
        solved = {id(o.wq) for o in layers if o.index < L.index}
        captured: dict[str, Tensor] = {}

        def fn(mod: nn.Module, args: tuple) -> None:
            captured["x"] = args[0]
            raise _Stop

        def run(inputs: tuple, quantized: bool) -> Tensor | None:
            for q in quantizers.values():
                if not quantized:
                    q.enable_fake_quant(False)
                elif isinstance(q, WeightFakeQuant):
                    q.enable_fake_quant(id(q) in solved)
                elif isinstance(q, ActFakeQuant):
                    q.enable_fake_quant(not q.calibration_problems())
            captured.clear()
            try:
                gm(*inputs)
            except _Stop:
                pass
            return captured.get("x")

        h = L.mod.register_forward_pre_hook(fn)
        n = nb = 0
        L.A = L.B = L.yy = None
        w = L.mod.weight.detach().double()
        try:
            with torch.no_grad():
                for i, inputs in self._batches(gm, data):
                    n += int(inputs[0].shape[0])
                    nb += 1
                    x_fp = run(inputs, False)
                    if x_fp is None:
                        continue
                    x_q = run(inputs, True)
                    seed = self._seed(i, L.index)
                    c_fp = _rows(L, x_fp, per_sample, seed)
                    c_q = _rows(L, x_q, per_sample, seed)  # type: ignore[arg-type]
                    a = (c_q.transpose(1, 2) @ c_q).double()
                    bm = (c_fp.transpose(1, 2) @ c_q).double()
                    y = c_fp.double() @ w.reshape(L.groups, -1, c_fp.shape[-1]).transpose(1, 2)
                    yy = (y * y).sum(1).reshape(-1)
                    L.A = a if L.A is None else L.A + a
                    L.B = bm if L.B is None else L.B + bm
                    L.yy = yy if L.yy is None else L.yy + yy
                    L.rows += c_q.shape[1]
        finally:
            h.remove()
        if nb == 0:
            raise CalibrationError("PassContext(calibration_data=...) yielded no batches; give "
                                   "at least one batch")
        self._check_seen(L)
        return n

    # -- solve and write --------------------------------------------------------------------------

    def _solve(self, L: _Layer) -> BitsplitLayerError:
        opts: PtqBitsplitOptions = self.options
        weight = L.mod.weight
        w = weight.detach().double().reshape(weight.shape[0], -1)
        m, n = w.shape
        g = L.groups
        mg = m // g
        bits = L.wq.bits.detach().cpu().to(torch.int64)
        q = torch.zeros(m, n, dtype=torch.int64)
        alpha = torch.ones(m, dtype=torch.float64)
        e0 = torch.zeros(m, dtype=torch.float64)
        e1 = torch.zeros(m, dtype=torch.float64)
        A_all = L.A.cpu()  # type: ignore[union-attr]
        for gi in range(g):          # groups > 1 (e.g. depthwise) are solved one group at a time
            sl = slice(gi * mg, (gi + 1) * mg)
            A = A_all[gi]
            wg = w[sl].cpu()
            C = wg @ (L.B[gi].cpu() if L.B is not None else A)
            dtype = torch.float64 if n <= 1024 else torch.float32
            yy = L.yy[sl].cpu()  # type: ignore[index]
            q0, a0 = rtn_mse_clip(wg, bits[sl])
            res = bitsplit_solve(A, C, bits[sl], iters=opts.iters, per_channel=opts.per_channel,
                                 init=(q0, a0), yy=yy, dtype=dtype)
            q[sl], alpha[sl] = res.q, res.alpha.double()
            e0[sl] = channel_error(A, C, a0.double()[:, None] * q0.double(), yy)
            e1[sl] = channel_error(A, C, res.alpha.double()[:, None] * res.q.double(), yy)
        self._write(L, q, alpha)
        yy = float(L.yy.sum()) if L.yy is not None else 0.0  # type: ignore[union-attr]
        denom = yy if yy > 0 else 1.0
        return BitsplitLayerError(rtn=float(e0.sum()) / denom, bitsplit=float(e1.sum()) / denom,
                                  rows=float(L.rows))

    def _write(self, L: _Layer, q: Tensor, alpha: Tensor) -> None:
        weight = L.mod.weight
        wq = L.wq
        dev, dt = weight.device, weight.dtype
        a32 = alpha.to(torch.float32)
        if not bool(torch.isfinite(a32).all()) or not bool((a32 > 0).all()):
            raise NumericsError(f"{self.name}: layer '{L.info.name}' got invalid scales")
        new_w = (q.to(torch.float32) * a32[:, None]).reshape(weight.shape)
        with torch.no_grad():
            weight.copy_(new_w.to(dev, dt))
            wq.scale.copy_(a32.to(wq.scale.device, wq.scale.dtype))
            wq.zero_point.zero_()
        wq.enable_observer(False)
        wq._ready = True
        wq.mark_observed(weight)
        was = wq.fake_quant_on
        wq.enable_fake_quant(True)
        with torch.no_grad():
            out = wq(weight)
        wq.enable_fake_quant(was)
        if not torch.equal(out, weight):
            raise NumericsError(f"{self.name}: layer '{L.info.name}': the weight quantizer does "
                                "not reproduce the bit-split codes (internal error)")

    # -- BN re-estimation -------------------------------------------------------------------------

    def _bn_reestimate(self, gm: torch.fx.GraphModule, ctx: Any, data: Iterable) -> None:
        bns = [m for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return
        quantizers = [m for m in gm.modules() if isinstance(m, FakeQuantize)]
        saved_obs = [q.observing for q in quantizers]
        saved_mom = [b.momentum for b in bns]
        was_training = gm.training
        try:
            for q in quantizers:
                q.enable_observer(False)
            for b in bns:
                b.reset_running_stats()
                b.momentum = None
            gm.eval()
            for b in bns:
                b.train()
            with torch.no_grad():
                for _, inputs in self._batches(gm, data):
                    gm(*inputs)
        finally:
            for q, o in zip(quantizers, saved_obs):
                q.enable_observer(o)
            for b, mom in zip(bns, saved_mom):
                b.momentum = mom
            gm.train(was_training)
