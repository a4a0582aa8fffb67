"""Per-candidate error models ("sensitivities") for bit allocation, and the fast weight
quantization-error kernel they share with MixQuant.

A sensitivity maps a :class:`SensitivityRequest` (graph, searchable layers, candidate bit-widths,
granularity) to one ``(items, candidates)`` float64 tensor per layer: row i, column j is the error
of giving item i (the layer, or its output kernel i) candidate j. ``solve-bitwidths`` minimizes the
sum of the chosen entries under a budget. Built in (``register_sensitivity`` adds more):

``quant-error`` (default)
    Squared error ``Σ (Q_b(W) − W)²`` of the layer's weights quantized at b bits with a min/max
    symmetric per-output-channel quantizer (signedness and narrow range from the weight spec), per
    kernel or summed per layer. Data-free, vectorized over candidates (:func:`weight_quant_errors`).
``hessian``
    HAWQ-V2's Hessian-weighted error ``Tr(H)/n · Σ (Q_b(W) − W)²``, with the trace of the loss
    Hessian w.r.t. the layer's (or kernel's) weights estimated by Hutchinson's method with
    Rademacher probes (``probes`` option). Needs data: the first batch of
    ``PassContext.calibration_data`` (a tensor, or a tuple/list whose first item is the input) or
    else ``PassContext.example_inputs``. The loss is ``ctx.config["loss"](output, batch)`` when given;
    otherwise cross-entropy against the model's own argmax predictions for 2-D outputs
    (label-free) and ``0.5·mean(output²)`` for anything else. Negative trace estimates (noise) are
    clamped to 0.
``lambda``
    Distance to a learned fractional bit-width prior (FracBits λ): ``Σ (b − λ)²`` over the item's
    kernels. λ comes from ``ctx.config["fracbits_lambda"]`` (``{layer: float or per-kernel
    list}``) or from a source registered with :func:`register_lambda_source` (the FracBits passes
    register one that reads their trained λ); a layer without λ is an error naming it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from qpasses.errors import NumericsError, QpassesError
from qpasses.ir.layers import LayerInfo, layer_weight
from qpasses.ir.annotations import QuantSpec
from qpasses.numerics import quantizers

__all__ = [
    "SensitivityRequest", "SensitivityError", "register_sensitivity", "sensitivity_names",
    "lookup_sensitivity", "register_lambda_source", "weight_quant_errors", "quant_error",
    "hessian_sensitivity", "lambda_sensitivity", "hutchinson_traces",
]

_CHUNK = 1 << 17  # elements per chunk of the error kernel (fits L2 cache)
_F32_MAX_BITS = 10  # above this, t = x/s needs float64 for a precise fractional part


class SensitivityError(QpassesError):
    """A sensitivity cannot be computed (missing data, loss or λ prior); names what is missing."""


@dataclass(frozen=True)
class SensitivityRequest:
    gm: torch.fx.GraphModule
    layers: tuple[LayerInfo, ...]          # searchable layers, graph order
    specs: tuple[QuantSpec, ...]           # their current weight specs
    candidates: tuple[int, ...]
    granularity: str                       # "layer" or "kernel"
    ctx: Any = None                        # PassContext (data, config)
    options: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"probes": 8}


SensitivityFn = Callable[[SensitivityRequest], list[torch.Tensor]]
_SENSITIVITIES: dict[str, tuple[SensitivityFn, str]] = {}
_LAMBDA_SOURCES: list[Callable[[torch.fx.GraphModule, Any], Mapping[str, Any] | None]] = []


def register_sensitivity(name: str, fn: SensitivityFn, summary: str = "") -> None:
    """Make ``solve-bitwidths{sensitivity=NAME}`` available. ``fn(request)`` returns one
    ``(items, len(candidates))`` tensor per layer of ``request.layers``."""
    _SENSITIVITIES[name] = (fn, summary)


def sensitivity_names() -> list[str]:
    return sorted(_SENSITIVITIES)


def lookup_sensitivity(name: str) -> SensitivityFn:
    return _SENSITIVITIES[name][0]


def register_lambda_source(fn: Callable[[torch.fx.GraphModule, Any], Mapping[str, Any] | None]
                           ) -> None:
    """Hook for FracBits: ``fn(gm, ctx)`` returns ``{layer: λ}`` (float or per-kernel values) or
    None; sources are asked in registration order after ``ctx.config["fracbits_lambda"]``."""
    if fn not in _LAMBDA_SOURCES:
        _LAMBDA_SOURCES.append(fn)


# ---------------------------------------------------------------------------------------------
# The error kernel

@contextlib.contextmanager
def _num_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def weight_quant_errors(weight: torch.Tensor, candidates: Sequence[int], *,
                        scheme: str = "symmetric", narrow: bool = False,
                        per_channel: bool = True, reductions: Sequence[str] = ("sse",),
                        threads: int | None = 1) -> dict[str, torch.Tensor]:
    """Round-trip quantization error of ``weight`` at every candidate bit-width, per kernel.

    The quantizer is :func:`qpasses.numerics.quantizers.quantize_dequantize` with min/max qparams
    (:func:`~qpasses.numerics.quantizers.calc_qparams`) of ``scheme`` (``symmetric``,
    ``asymmetric``, ``asymmetric_signed``, ``unsigned``), per output channel (``per_channel``) or
    per tensor. Returns ``{reduction: (C_out, len(candidates)) float64}`` with reductions
    ``sse`` (``Σ (Ŵ − W)²``) and/or ``sae`` (``Σ |Ŵ − W|``) over each kernel's weights; a layer's
    error is the column sum. Equal to the explicit round trip up to float rounding (rows whose
    error is below 1e-4 quantization steps per weight, i.e. float round-off on exactly
    representable weights such as constant kernels, are reported as 0); vectorized
    (one pass per candidate over cache-sized chunks, no per-candidate copies of the weights).
    A 0-bit candidate quantizes to 0 (error ``Σ W²``).

    ``threads``: torch intra-op threads while the kernel runs (restored after; None keeps the
    current setting). The default 1 is deliberate: the kernel streams cache-sized chunks through
    four element-wise ops, where intra-op parallelism gains little on an idle machine and
    collapses on an oversubscribed one (measured on the 2-core dev machine under load: ResNet-50,
    7 candidates, 0.36 s with 1 thread vs 6-10 s with 2).
    """
    with _num_threads(threads):
        return _weight_quant_errors(weight, candidates, scheme, narrow, per_channel, reductions)


def _weight_quant_errors(weight: torch.Tensor, candidates: Sequence[int], scheme: str,
                         narrow: bool, per_channel: bool, reductions: Sequence[str],
                         ) -> dict[str, torch.Tensor]:
    bad = [r for r in reductions if r not in ("sse", "sae")]
    if bad:
        raise NumericsError(f"unknown reductions {bad}; valid: sse, sae")
    if weight.dim() < 1 or weight.numel() == 0:
        raise NumericsError("weight must be a non-empty tensor with output channels on dim 0")
    x = weight.detach().reshape(weight.shape[0], -1).float()
    c, k = x.shape
    bits = torch.tensor(list(candidates), dtype=torch.int64)
    if per_channel:
        mn, mx = torch.aminmax(x, dim=1)
    else:
        mn, mx = torch.aminmax(x)
        mn, mx = mn.expand(c), mx.expand(c)
    scales, los, his, single = [], [], [], []
    for b in bits.tolist():
        s_b, z_b = quantizers.calc_qparams(mn, mx, int(b), scheme, narrow=narrow)
        qmin, qmax = quantizers.scheme_qrange(int(b), scheme, narrow)
        single.append(qmin == qmax)                  # one level (0 bits, narrow 1 bit): all 0
        scales.append(s_b.float().expand(c))
        los.append((qmin - z_b).float().expand(c))   # clamp bounds of round(x/s): grid − z
        his.append((qmax - z_b).float().expand(c))
    scale, lo, hi = torch.stack(scales), torch.stack(los), torch.stack(his)  # (B, C)
    inv = (1.0 / scale).unsqueeze(-1)           # (B, C, 1); as quantizers: x * (1/s)
    # For symmetric and asymmetric min/max qparams the grid covers round(x/s) for every weight
    # but the row's extremes, which can land half a step outside through float round-off of the
    # scale: the clamp pass is skipped and the extremes' errors are corrected exactly below
    # (all copies of them: counted once per layer). Unsigned schemes take the clamped path.
    clamp_free = scheme in ("symmetric", "asymmetric", "asymmetric_signed")
    if clamp_free:
        n_max = (x == mx[:, None]).sum(dim=1).double()
        n_min = torch.where(mn == mx, 0, (x == mn[:, None]).sum(dim=1)).double()
    out = {r: torch.zeros(c, len(bits), dtype=torch.float64) for r in reductions}
    rows = max(1, _CHUNK // max(k, 1))
    n_rows = min(rows, c)
    t_buf = torch.empty(n_rows, k)
    r_buf = torch.empty(n_rows, k)
    for r0 in range(0, c, rows):
        r1 = min(c, r0 + rows)
        xc = x[r0:r1]
        tt, rr = t_buf[: r1 - r0], r_buf[: r1 - r0]
        for j, b in enumerate(bits.tolist()):
            s2 = scale[j, r0:r1].double()
            if single[j]:                         # pruned: everything quantizes to 0
                if "sse" in out:
                    out["sse"][r0:r1, j] = torch.linalg.vector_norm(xc, dim=1).double() ** 2
                if "sae" in out:
                    out["sae"][r0:r1, j] = xc.abs().sum(dim=1).double()
                continue
            if b > _F32_MAX_BITS:  # wide grids: float64, explicit clamp (float32 scale slop)
                tq = xc.double() * (1.0 / s2[:, None])
                rq = torch.clamp(torch.round(tq), lo[j, r0:r1, None].double(),
                                 hi[j, r0:r1, None].double()).sub_(tq)
                if "sse" in out:
                    out["sse"][r0:r1, j] = torch.linalg.vecdot(rq, rq) * s2 * s2
                if "sae" in out:
                    out["sae"][r0:r1, j] = rq.abs_().sum(dim=1) * s2
                continue
            torch.mul(xc, inv[j, r0:r1], out=tt)  # t = x/s
            torch.round(tt, out=rr)
            if not clamp_free:
                torch.clamp(rr, lo[j, r0:r1, None], hi[j, r0:r1, None], out=rr)
            rr.sub_(tt)                           # (q − z) − x/s: the error in units of s
            fix_sq = fix_ab = 0.0
            if clamp_free:                        # exact error of the extremes (clamped)
                fix_sq, fix_ab = _extreme_fix(mn[r0:r1], mx[r0:r1], n_min[r0:r1],
                                              n_max[r0:r1], inv[j, r0:r1, 0], lo[j, r0:r1],
                                              hi[j, r0:r1])
            # Float round-off of x·(1/s) leaves ~1e-7 steps on exactly representable weights;
            # a row whose error is below 1e-4 steps per weight on average is reported as exact.
            if "sse" in out:
                sq = (torch.linalg.vector_norm(rr, dim=1).double() ** 2 + fix_sq).clamp(min=0)
                out["sse"][r0:r1, j] = torch.where(sq < k * 1e-8, 0.0, sq) * s2 * s2
            if "sae" in out:
                ab = (rr.abs_().sum(dim=1).double() + fix_ab).clamp(min=0)
                out["sae"][r0:r1, j] = torch.where(ab < k * 1e-4, 0.0, ab) * s2
    return out


def _extreme_fix(mn: torch.Tensor, mx: torch.Tensor, n_min: torch.Tensor, n_max: torch.Tensor,
                 inv: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (Δ squared error, Δ abs error), in steps, turning the unclamped error of the
    min/max weights (and their copies) into the clamped one; t is computed as in the kernel."""
    d_sq = torch.zeros(mn.shape[0], dtype=torch.float64)
    d_ab = torch.zeros(mn.shape[0], dtype=torch.float64)
    for v, n in ((mx, n_max), (mn, n_min)):
        t = v * inv
        r = torch.round(t)
        du = (r - t).double()
        dc = (torch.clamp(r, lo, hi) - t).double()
        d_sq += n * (dc * dc - du * du)
        d_ab += n * (dc.abs() - du.abs())
    return d_sq, d_ab


def _spec_scheme(spec: QuantSpec) -> tuple[str, bool]:
    if spec.signed:
        return "symmetric", spec.narrow_range
    return "unsigned", False


def quant_error(req: SensitivityRequest) -> list[torch.Tensor]:
    """``quant-error``: per-kernel (or per-layer summed) weight quantization squared error."""
    out = []
    for info, spec in zip(req.layers, req.specs):
        scheme, narrow = _spec_scheme(spec)
        sse = weight_quant_errors(layer_weight(req.gm, info), req.candidates, scheme=scheme,
                                  narrow=narrow, per_channel=True)["sse"]
        out.append(sse if req.granularity == "kernel" else sse.sum(dim=0, keepdim=True))
    return out


# ---------------------------------------------------------------------------------------------
# Hessian (Hutchinson)

def _first_batch(ctx: Any) -> tuple[Any, tuple]:
    """(batch as given, model inputs) from the context's calibration data or example inputs."""
    data = getattr(ctx, "calibration_data", None) if ctx is not None else None
    if data is not None:
        batch = data
        if not isinstance(data, (torch.Tensor, tuple, list)):
            try:
                batch = next(iter(data))
            except StopIteration:
                raise SensitivityError("sensitivity=hessian: PassContext.calibration_data is "
                                       "empty") from None
        if isinstance(batch, torch.Tensor):
            return batch, (batch,)
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            return batch, (batch[0],)
        raise SensitivityError("sensitivity=hessian: calibration_data must yield tensors or "
                               "(input, target) tuples")
    ex = getattr(ctx, "example_inputs", None) if ctx is not None else None
    if ex is None:
        raise SensitivityError("sensitivity=hessian needs data: run the pipeline inside "
                               "PassContext(calibration_data=...) or PassContext("
                               "example_inputs=...)")
    return ex, tuple(ex)


def _loss(ctx: Any, output: Any, batch: Any) -> torch.Tensor:
    config = getattr(ctx, "config", None) or {}
    fn = config.get("loss")
    if fn is not None:
        loss = fn(output, batch)
    elif isinstance(output, torch.Tensor) and output.dim() == 2 and output.is_floating_point():
        loss = F.cross_entropy(output, output.detach().argmax(dim=1))
    elif isinstance(output, torch.Tensor):
        loss = 0.5 * output.pow(2).mean()
    else:
        raise SensitivityError("sensitivity=hessian: the model output is not a tensor; give a "
                               "loss as PassContext(config={'loss': fn(output, batch)})")
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise SensitivityError("sensitivity=hessian: the loss must be a scalar tensor")
    return loss


def hutchinson_traces(gm: torch.fx.GraphModule, layers: Sequence[LayerInfo], ctx: Any,
                      probes: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """Per-kernel Hutchinson estimates of the loss Hessian's diagonal blocks' traces:
    ``E_v[Σ_{i ∈ kernel} v_i (Hv)_i]`` with Rademacher v, one ``(C_out,)`` tensor per layer."""
    if probes < 1:
        raise NumericsError(f"probes must be >= 1, got {probes}")
    batch, inputs = _first_batch(ctx)
    params = [layer_weight(gm, info) for info in layers]
    flags = [p.requires_grad for p in params]
    was_training = gm.training
    gen = torch.Generator().manual_seed(seed)
    try:
        gm.eval()
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            loss = _loss(ctx, gm(*inputs), batch)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            traces = [torch.zeros(p.shape[0], dtype=torch.float64) for p in params]
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            for _ in range(probes):
                vs = [torch.randint(0, 2, params[i].shape, generator=gen).to(params[i].dtype)
                      * 2 - 1 for i in live]
                hv = torch.autograd.grad([grads[i] for i in live], [params[i] for i in live],
                                         grad_outputs=vs, retain_graph=True, allow_unused=True)
                for i, v, h in zip(live, vs, hv):
                    if h is not None:
                        traces[i] += (v * h).reshape(v.shape[0], -1).sum(dim=1).double()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        gm.train(was_training)
    return [t / probes for t in traces]


def hessian_sensitivity(req: SensitivityRequest) -> list[torch.Tensor]:
    """``hessian``: ``Tr(H)/n · Σ (Q_b(W) − W)²`` per kernel or per layer (HAWQ-V2)."""
    probes = int(req.options.get("probes", 8))
    traces = hutchinson_traces(req.gm, req.layers, req.ctx, probes,
                               seed=int(getattr(req.ctx, "seed", 0) or 0))
    out = []
    for info, spec, tr in zip(req.layers, req.specs, traces):
        scheme, narrow = _spec_scheme(spec)
        sse = weight_quant_errors(layer_weight(req.gm, info), req.candidates, scheme=scheme,
                                  narrow=narrow)["sse"]
        per_kernel_n = info.fan_in
        tr = tr.clamp(min=0)
        if req.granularity == "kernel":
            out.append(sse * (tr / per_kernel_n)[:, None])
        else:
            avg = tr.sum() / (per_kernel_n * info.out_channels)
            out.append(sse.sum(dim=0, keepdim=True) * avg)
    return out


# ---------------------------------------------------------------------------------------------
# λ prior (FracBits)

def _lambda_map(req: SensitivityRequest) -> Mapping[str, Any]:
    config = getattr(req.ctx, "config", None) or {}
    if "fracbits_lambda" in config:
        return config["fracbits_lambda"]
    for source in _LAMBDA_SOURCES:
        found = source(req.gm, req.ctx)
        if found:
            return found
    raise SensitivityError(
        "sensitivity=lambda needs learned fractional bit-widths: train with insert-fracbits "
        "(its λ are found automatically once FracBits registers its source) or pass "
        "PassContext(config={'fracbits_lambda': {layer: λ or [λ per kernel]}})")


def lambda_sensitivity(req: SensitivityRequest) -> list[torch.Tensor]:
    """``lambda``: ``Σ_k (b − λ_k)²`` over the item's kernels (the FracBits freeze prior)."""
    lam_map = _lambda_map(req)
    cand = torch.tensor(req.candidates, dtype=torch.float64)
    out = []
    for info in req.layers:
        if info.name not in lam_map:
            raise SensitivityError(f"sensitivity=lambda: no λ for layer '{info.name}' "
                                   f"(ctx.config['fracbits_lambda'] has {len(lam_map)} layers)")
        lam = torch.as_tensor(lam_map[info.name], dtype=torch.float64).detach().flatten()
        if lam.numel() not in (1, info.out_channels):
            raise SensitivityError(f"sensitivity=lambda: layer '{info.name}' has {lam.numel()} "
                                   f"λ values for {info.out_channels} kernels")
        lam = lam.expand(info.out_channels)
        err = (cand[None, :] - lam[:, None]) ** 2           # (C_out, B)
        out.append(err if req.granularity == "kernel" else err.sum(dim=0, keepdim=True))
    return out


register_sensitivity("quant-error", quant_error,
                     "weight quantization squared error (per-channel min/max symmetric)")
register_sensitivity("hessian", hessian_sensitivity,
                     "Hessian-trace-weighted quantization error (Hutchinson, needs data)")
register_sensitivity("lambda", lambda_sensitivity,
                     "squared distance to learned FracBits λ (ctx.config['fracbits_lambda'])")
