"""Named pipelines (usable wherever a pass name is: ``graph(ptq-int8{clip=percentile})``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from passes_registry import register_pipeline

__all__ = ["DefaultOptions", "PtqInt8Options", "default", "ptq_int8"]


@dataclass(frozen=True)
class PtqInt8Options:
    clip: Literal["minmax", "avg", "percentile", "mse", "aciq", "kl"] = field(
        default="minmax", metadata={
            "help": "activation clip mode (Distiller NONE=minmax, AVG=avg, ACIQ=aciq, plus "
                    "percentile, MSE-optimal and KL/entropy); weights always use min/max"})


def ptq_int8(opts: PtqInt8Options) -> str:
    """Distiller-style range-linear W8A8 post-training quantization (docs/algorithms.md,
    "Range-linear PTQ").

    canonicalize, fold BN into the preceding conv/linear, 8-bit weights and activations on every
    layer (no first/last pinning), per-channel symmetric weights, asymmetric (zero-point)
    activations observed with the clip mode, then calibration on ``PassContext.calibration_data``.
    The logits are not quantized (activation quantizers sit on layer inputs), which is Distiller's
    "do not clip the final FC output" advice. To fine-tune or evaluate on exactly what the
    integer graph computes, append ``emulate-int-sim`` (with the contract you will lower with).
    """
    return ("graph(canonicalize,fold-batch-norm,"
            "annotate-bitwidths{weight-bits=8 act-bits=8 first-last-bits=none},"
            "insert-fake-quant{weight-scheme=symmetric per-channel=true act-scheme=affine "
            f"observer={opts.clip}}},calibrate{{method={opts.clip}}})")


register_pipeline("ptq-int8", ptq_int8, options=PtqInt8Options,
                  summary="Distiller range-linear W8A8 PTQ: fold BN, per-channel symmetric "
                          "weights, asymmetric activations, calibrate with a clip mode")


@dataclass(frozen=True)
class DefaultOptions:
    weight_bits: int = field(default=4, metadata={"help": "weight bit-width of inner layers"})
    act_bits: int = field(default=8, metadata={"help": "activation bit-width of inner layers"})
    first_last_bits: int = field(default=8, metadata={
        "help": "bit-width of the first layer (weights and input) and the last layer's weights"})


def default(opts: DefaultOptions) -> str:
    """The default mixed-precision pipeline (what ``make demo`` runs).

    Canonicalize, fold BN, clean up, then W4A8 with the first and last layers pinned at 8 bits
    (FracBits' convention), per-channel symmetric fake-quant, calibration on
    ``PassContext.calibration_data``, lowering to the integer-only graph (fast exact kernels,
    gemmlowp rounding) and a bit-exact check of that graph against the integer reference, which
    prints the int-sim vs fake-quant agreement. For QAT whose reported accuracy is the deployed
    one, run ``emulate-int-sim`` after ``calibrate`` (the default's fake-quant graph differs from
    the integer graph by up to a few LSB at low bits), train, then lower with the same contract;
    the FracBits/GMPQ "after search" flows do the same after ``freeze-fracbits`` /
    ``select-gmpq-policy`` and ``calibrate``.
    """
    return ("graph(canonicalize,fold-batch-norm,dce,"
            f"annotate-bitwidths{{weight-bits={opts.weight_bits} act-bits={opts.act_bits} "
            f"first-last-bits={opts.first_last_bits}}},"
            "insert-fake-quant{weight-scheme=symmetric per-channel=true},calibrate,"
            "lower-to-int-sim,verify-int-sim{print})")


register_pipeline("default", default, options=DefaultOptions,
                  summary="default mixed-precision pipeline: fold BN, W4A8 with 8-bit first/last "
                          "layers, fake-quant, calibrate, lower to int-sim, verify bit-exactness")
