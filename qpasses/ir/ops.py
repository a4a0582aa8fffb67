"""The op table: every family of torch ops the passes recognise, spelled out once.

A traced graph can spell one op several ways (``nn.ReLU`` / ``F.relu`` / ``torch.relu`` /
``x.relu()``; ``torch.cat`` / ``torch.concat`` / ``torch.concatenate``). ``canonicalize`` rewrites
many of them to one spelling, but passes also run on graphs that were not canonicalized, so each
family below lists every spelling of its members, as module types, functions (``call_function``
targets) and method names (``call_method`` targets). Passes and analyses match against these
sets and never keep their own; a family that needs a narrower set (e.g. the splits whose pieces
keep the input's rank) is a separate, named entry here.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# Arithmetic

ADD_FUNCTIONS = frozenset({operator.add, operator.iadd, torch.add})
SUB_FUNCTIONS = frozenset({operator.sub, operator.isub, torch.sub, torch.subtract})
MUL_FUNCTIONS = frozenset({operator.mul, operator.imul, torch.mul, torch.multiply})
DIV_FUNCTIONS = frozenset({operator.truediv, operator.itruediv, torch.div})
ADD_METHODS = frozenset({"add", "add_"})
SUB_METHODS = frozenset({"sub", "sub_"})
MUL_METHODS = frozenset({"mul", "mul_"})
DIV_METHODS = frozenset({"div", "div_"})
BINARY_FUNCTIONS = ADD_FUNCTIONS | SUB_FUNCTIONS | MUL_FUNCTIONS | DIV_FUNCTIONS
# Products as ``call_function`` or ``call_method`` targets.
MUL_TARGETS = MUL_FUNCTIONS | MUL_METHODS
BINARY_METHODS = ADD_METHODS | SUB_METHODS | MUL_METHODS | DIV_METHODS
# Products of two tensors over a contracted dim (act x act in attention: Q·Kᵀ, attention·V).
MATMUL_FUNCTIONS = frozenset({operator.matmul, torch.matmul, torch.bmm})
MATMUL_METHODS = frozenset({"matmul", "bmm"})
MATMUL_TARGETS = MATMUL_FUNCTIONS | MATMUL_METHODS
EINSUM_FUNCTIONS = frozenset({torch.einsum})
# Python arithmetic on ints derived from sizes (``x.size(1) // 2``).
INT_FUNCTIONS = frozenset({operator.floordiv, operator.mul, operator.add, operator.sub,
                           operator.truediv, operator.mod, operator.neg, operator.getitem})

# ---------------------------------------------------------------------------------------------
# Normalizations over the trailing dims and softmax

LAYER_NORM_MODULES: tuple[type, ...] = (nn.LayerNorm,)
LAYER_NORM_FUNCTIONS = frozenset({F.layer_norm})
NORMALIZE_FUNCTIONS = frozenset({F.normalize})       # L2 normalization (IntL2Normalize)
SOFTMAX_MODULES: tuple[type, ...] = (nn.Softmax,)
SOFTMAX_FUNCTIONS = frozenset({torch.softmax, F.softmax})
SOFTMAX_METHODS = frozenset({"softmax"})

# ---------------------------------------------------------------------------------------------
# Joins: several tensors in, one out

CAT_FUNCTIONS = frozenset({torch.cat, torch.concat, torch.concatenate})
STACK_FUNCTIONS = frozenset({torch.stack})

# ---------------------------------------------------------------------------------------------
# Splits: one tensor in, several out

SPLIT_FUNCTIONS = frozenset({torch.split, torch.chunk, torch.unbind, torch.tensor_split})
SPLIT_METHODS = frozenset({"split", "chunk", "unbind", "tensor_split"})
# Splits whose pieces keep the input's rank and cut one dim into contiguous ranges.
RANGE_SPLIT_FUNCTIONS = frozenset({torch.split, torch.chunk})
RANGE_SPLIT_METHODS = frozenset({"split", "chunk"})

# ---------------------------------------------------------------------------------------------
# Shape ops: values move, none changes

RESHAPE_FUNCTIONS = frozenset({torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze})
RESHAPE_METHODS = frozenset({"view", "reshape", "flatten", "squeeze", "unsqueeze"})
PERMUTE_FUNCTIONS = frozenset({torch.transpose, torch.permute, torch.swapaxes, torch.swapdims})
PERMUTE_METHODS = frozenset({"transpose", "permute", "swapaxes", "swapdims"})
# Ops returning their input's values unchanged (same shape).
COPY_FUNCTIONS = frozenset({torch.clone})
COPY_METHODS = frozenset({"contiguous", "clone", "detach"})
# Ops whose values pass through unchanged (only moved): reshapes, permutes, copies, indexing.
PASSTHROUGH_FUNCTIONS = frozenset({torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                                   torch.permute, torch.transpose, torch.t, torch.clone,
                                   torch.detach, operator.getitem, torch.movedim, torch.swapaxes,
                                   torch.roll})
PASSTHROUGH_METHODS = frozenset({"view", "reshape", "flatten", "permute", "transpose", "t",
                                 "contiguous", "squeeze", "unsqueeze", "clone", "detach", "view_as",
                                 "reshape_as", "__getitem__", "movedim", "swapaxes", "roll"})
# Reshapes and copies (function targets and method names together) after which a per-channel
# axis (dim 1, or the last dim) survives when the leading/trailing sizes say so.
SHAPE_ONLY_TARGETS = frozenset({torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                                torch.clone, torch.detach, "view", "reshape", "flatten",
                                "contiguous", "squeeze", "unsqueeze", "clone", "detach", "view_as",
                                "reshape_as"})
# Broadcasts: values repeated, none changes (the integer lowering replays them on the codes of a
# constant, e.g. a class token expanded to the batch).
BROADCAST_FUNCTIONS = frozenset({torch.broadcast_to})
BROADCAST_METHODS = frozenset({"expand", "expand_as", "repeat"})
# Methods that read a tensor's size, not its values.
SHAPE_QUERY_METHODS = frozenset({"size", "dim", "numel", "__len__"})

# ---------------------------------------------------------------------------------------------
# Identity in eval mode

IDENTITY_MODULES: tuple[type, ...] = (nn.Identity,)
DROPOUT_MODULES: tuple[type, ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                     nn.AlphaDropout, nn.FeatureAlphaDropout)
DROPOUT_FUNCTIONS = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                               F.feature_alpha_dropout})
# torch-level spellings take ``train`` instead of ``training``.
DROPOUT_TORCH_FUNCTIONS = frozenset({torch.dropout, torch.alpha_dropout, torch.feature_dropout,
                                     torch.feature_alpha_dropout})
# Everything that is the identity in eval mode.
EVAL_IDENTITY_MODULES: tuple[type, ...] = IDENTITY_MODULES + DROPOUT_MODULES

# ---------------------------------------------------------------------------------------------
# Pools: function -> number of spatial dims

MAX_POOL_FUNCTIONS: dict[Any, int] = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
                                      torch.max_pool1d: 1, torch.max_pool2d: 2,
                                      torch.max_pool3d: 3}
AVG_POOL_FUNCTIONS: dict[Any, int] = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
                                      torch.avg_pool1d: 1}
ADAPTIVE_AVG_POOL_FUNCTIONS: dict[Any, int] = {F.adaptive_avg_pool1d: 1,
                                               F.adaptive_avg_pool2d: 2,
                                               F.adaptive_avg_pool3d: 3,
                                               torch.adaptive_avg_pool1d: 1}
ADAPTIVE_MAX_POOL_FUNCTIONS: dict[Any, int] = {F.adaptive_max_pool1d: 1,
                                               F.adaptive_max_pool2d: 2,
                                               F.adaptive_max_pool3d: 3}
POOL_FUNCTIONS: dict[Any, int] = {**MAX_POOL_FUNCTIONS, **AVG_POOL_FUNCTIONS,
                                  **ADAPTIVE_AVG_POOL_FUNCTIONS, **ADAPTIVE_MAX_POOL_FUNCTIONS}
MAX_POOL_MODULES: dict[type, int] = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
AVG_POOL_MODULES: dict[type, int] = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
ADAPTIVE_AVG_POOL_MODULES: dict[type, int] = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2,
                                              nn.AdaptiveAvgPool3d: 3}
ADAPTIVE_MAX_POOL_MODULES: dict[type, int] = {nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2,
                                              nn.AdaptiveMaxPool3d: 3}
POOL_MODULES: dict[type, int] = {**MAX_POOL_MODULES, **AVG_POOL_MODULES,
                                 **ADAPTIVE_AVG_POOL_MODULES, **ADAPTIVE_MAX_POOL_MODULES}

# ---------------------------------------------------------------------------------------------
# Reductions over dims: function/method -> reduction name

REDUCE_FUNCTIONS: dict[Any, str] = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax",
                                    torch.amin: "amin"}
REDUCE_METHODS: dict[str, str] = {"mean": "mean", "sum": "sum", "amax": "amax", "amin": "amin"}

# ---------------------------------------------------------------------------------------------
# Elementwise activations and clamps

RELU_FUNCTIONS = frozenset({torch.relu, torch.relu_, F.relu, F.relu_})
RELU_METHODS = frozenset({"relu", "relu_"})
CLAMP_FUNCTIONS = frozenset({torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max})
CLAMP_METHODS = frozenset({"clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_",
                           "clamp_max", "clamp_max_"})
# ReLU is a clamp at 0: the methods a lowering folds into an output range.
CLAMP_OR_RELU_METHODS = CLAMP_METHODS | RELU_METHODS
# Clamps with a lower bound (a minimum of 0 makes the output non-negative).
LOWER_CLAMP_FUNCTIONS = frozenset({torch.clamp, torch.clip, torch.clamp_min})
LOWER_CLAMP_METHODS = frozenset({"clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_"})
HARDTANH_FUNCTIONS = frozenset({F.hardtanh, F.hardtanh_})
# Ops applied value by value (activations, clamps, copies, dropout in eval): the channel layout
# is unchanged and a constant channel stays constant.
VALUEWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.SiLU, nn.GELU,
    nn.Tanh, nn.ELU, nn.SELU, nn.CELU, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Hardshrink, nn.Softshrink, nn.Threshold,
    nn.LogSigmoid)
VALUEWISE_FUNCTIONS = frozenset({
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.hardtanh, F.hardtanh_, F.hardswish,
    F.hardsigmoid, torch.sigmoid, F.sigmoid, F.silu, F.gelu, torch.tanh, F.tanh, F.leaky_relu,
    F.elu, F.selu, F.celu, F.mish, F.softplus, F.softsign, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, torch.clamp, torch.clip,
    torch.clamp_min, torch.clamp_max, operator.neg, torch.neg, torch.abs, torch.exp, torch.square,
    torch.sqrt, F.hardshrink, F.softshrink, F.threshold, F.logsigmoid, torch.clone, torch.detach})
VALUEWISE_METHODS = frozenset({"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp",
                               "clamp_", "clip", "clip_", "neg", "abs", "exp", "float", "half",
                               "double", "to"})
BATCH_NORM_MODULES: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
BATCH_NORM_BASE = nn.modules.batchnorm._BatchNorm
# The stock batch-norm forward: a subclass that overrides it may compute anything.
BATCH_NORM_FORWARD = BATCH_NORM_BASE.forward
# Ops that keep each channel separate (channel c of the output depends on channel c of the input
# only): value-by-value ops, per-channel affine ops (batch norm, PReLU) and spatial pools.
CHANNELWISE_MODULES: tuple[type, ...] = (VALUEWISE_MODULES + (nn.PReLU,) + BATCH_NORM_MODULES
                                         + tuple(POOL_MODULES))
CHANNELWISE_FUNCTIONS = VALUEWISE_FUNCTIONS | frozenset(POOL_FUNCTIONS) | {F.batch_norm}
CHANNELWISE_METHODS = VALUEWISE_METHODS | COPY_METHODS

# ---------------------------------------------------------------------------------------------
# Elementwise unary functions by name (target -> name), for ops computed by a lookup table

UNARY_FUNCTIONS: dict[Any, str] = {
    F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", F.silu: "silu", F.gelu: "gelu", torch.tanh: "tanh", F.tanh: "tanh",
    F.elu: "elu", F.leaky_relu: "leaky_relu", F.softplus: "softplus", F.mish: "mish",
    F.selu: "selu", F.celu: "celu", F.hardshrink: "hardshrink", F.softsign: "softsign",
    F.tanhshrink: "tanhshrink", F.logsigmoid: "logsigmoid", torch.exp: "exp", torch.abs: "abs",
    torch.neg: "neg", torch.square: "square",
}
UNARY_METHODS: dict[str, str] = {"sigmoid": "sigmoid", "tanh": "tanh", "exp": "exp", "abs": "abs",
                                 "neg": "neg", "square": "square"}
UNARY_MODULES: dict[type, str] = {
    nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.Sigmoid: "sigmoid",
    nn.SiLU: "silu", nn.GELU: "gelu", nn.Tanh: "tanh", nn.ELU: "elu", nn.LeakyReLU: "leaky_relu",
    nn.Softplus: "softplus", nn.Mish: "mish", nn.SELU: "selu", nn.CELU: "celu",
    nn.Hardshrink: "hardshrink", nn.Softsign: "softsign", nn.Tanhshrink: "tanhshrink",
    nn.LogSigmoid: "logsigmoid",
}
# Output range of the bounded ones.
BOUNDED_RANGES: dict[str, tuple[float, float]] = {"sigmoid": (0.0, 1.0),
                                                  "hardsigmoid": (0.0, 1.0),
                                                  "tanh": (-1.0, 1.0), "softsign": (-1.0, 1.0)}
# Arithmetic with a constant operand (target -> name).
SCALAR_ARITH_FUNCTIONS: dict[Any, str] = {operator.add: "add", operator.sub: "sub",
                                          operator.mul: "mul", operator.truediv: "div",
                                          torch.add: "add", torch.sub: "sub", torch.mul: "mul",
                                          torch.div: "div"}
SCALAR_ARITH_METHODS: dict[str, str] = {"add": "add", "sub": "sub", "mul": "mul", "div": "div"}

# ---------------------------------------------------------------------------------------------
# Sign facts: ops whose output is >= 0 whatever the input (the ones with parameters, Hardtanh and
# clamps, are decided by their bounds)

NONNEGATIVE_MODULES: tuple[type, ...] = (nn.ReLU, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax,
                                         nn.Softmax2d, nn.Softplus)
NONNEGATIVE_FUNCTIONS = frozenset({
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, torch.sigmoid, F.sigmoid, F.hardsigmoid,
    torch.softmax, F.softmax, torch.exp, torch.abs, operator.abs, F.softplus})
NONNEGATIVE_METHODS = frozenset({"relu", "relu_", "sigmoid", "sigmoid_", "softmax", "exp", "abs",
                                 "abs_"})
# Ops whose output is >= 0 when their (first) input is: shape-only, order-statistic and
# averaging ops.
SIGN_PRESERVING_MODULES: tuple[type, ...] = tuple(
    getattr(nn, n) for n in (
        "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d",
        "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d",
        "AdaptiveMaxPool2d", "AdaptiveMaxPool3d", "LPPool1d", "LPPool2d", "Flatten", "Unflatten",
        "Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "PixelShuffle",
        "PixelUnshuffle", "ChannelShuffle", "ZeroPad1d", "ZeroPad2d", "ZeroPad3d")
    if hasattr(nn, n))
SIGN_PRESERVING_FUNCTIONS = frozenset({
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
    torch.t, torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.chunk,
    torch.split, torch.narrow, torch.select, torch.clone, torch.detach, operator.getitem,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.pixel_shuffle, F.pixel_unshuffle, torch.max_pool1d, torch.max_pool2d,
    torch.max_pool3d, torch.avg_pool1d, torch.adaptive_avg_pool1d, torch.adaptive_max_pool1d,
    torch.dropout, torch.channel_shuffle, torch.flip, torch.roll})
SIGN_PRESERVING_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose",
    "t", "contiguous", "squeeze", "unsqueeze", "mean", "sum", "amax", "amin", "max",
    "expand", "expand_as", "repeat", "clone", "detach", "float", "chunk", "split",
    "narrow", "select", "flip", "roll", "__getitem__"})
# Elementwise minimum (any dims): >= 0 when every tensor operand is.
MIN_FUNCTIONS = frozenset({torch.min, torch.minimum})
MIN_METHODS = frozenset({"min", "minimum"})
# Interpolation modes that stay inside the input's value range.
INTERPOLATION_CONVEX_MODES = frozenset({"nearest", "nearest-exact", "linear", "bilinear",
                                        "trilinear", "area"})


def is_stochastic_depth(target: Any) -> bool:
    """torchvision.ops.stochastic_depth (identity when ``training=False``)."""
    return getattr(target, "__name__", None) == "stochastic_depth" and \
        str(getattr(target, "__module__", "")).startswith("torchvision.ops")


def target_name(node: torch.fx.Node) -> str:
    """A readable name of what a node calls (``torch.cat``, ``operator.add``, ``Tensor.view``,
    the module path), for messages and reports."""
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    if node.op != "call_function":
        return str(t)
    name = getattr(t, "__name__", str(t))
    mod = getattr(t, "__module__", None) or ""
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    if mod.startswith("torch"):
        return f"torch.{name}"
    if mod == "_operator":
        return f"operator.{name}"
    return f"{mod}.{name}" if mod else name
