"""Removing channels whose weights have 0 bits, the algorithm behind ``prune-zero-bit-channels``
(FracBits: Mixed Precision Quantization via Fractional Bit-Widths, Sec. 3.5; docs/algorithms.md,
"FracBits").

A 0-bit kernel quantizes to exactly zero, so its output channel carries only the layer's bias: a
constant. ``prune-zero-bit-channels`` removes a channel class (see
``qpasses.algorithms.channels``) when

1. every producer kernel of the class has 0 bits (``QMeta.weight.bits_per_kernel``, or a whole
   layer at 0 bits); classes where only some producers are 0-bit are kept and reported;
2. the analysis found no unsupported node on the way (the node is reported);
3. the constant the class carries is accounted for exactly at every consumer: it is 0 where a
   conv/linear reads it (e.g. bias <= 0 followed by ReLU), or it is folded into the consumer's
   bias: ``b' = b + sum_k W_eff[:, j, k] * c`` where ``W_eff`` is the weight as the layer computes
   with it (after its weight fake-quantizer, with 0-bit kernels zero). Folding is exact for
   linear layers and for convolutions without zero padding (1x1 included); a padded conv sees
   fewer terms on the border, so ``mode=exact`` keeps such channels and ``mode=fold-constant``
   folds them anyway and reports the largest output deviation measured on
   ``PassContext.example_inputs``. Constants are propagated through BatchNorm, activations,
   quantizers, pooling, residual adds, SE multiplies, concat/split/shuffle/flatten exactly as
   those nodes compute them (each node is evaluated on a probe tensor);
4. removing it does not leave any tensor or layer without channels (one channel is kept and the
   reason logged).

What is shrunk: conv/linear weights (dim 0 for removed outputs, dim 1 for removed inputs, whole
groups for grouped/depthwise convs with ``groups`` updated), biases, BatchNorm statistics and
affine, per-channel parameters (PReLU, elementwise ``get_attr`` operands), split sizes (chunk
becomes split), literal view sizes, ``QMeta.weight`` (``bits_per_kernel``, per-channel
``scale``/``zero_point``), ``QMeta.pruned_channels`` (the ORIGINAL indices, so repeated runs
compose), ``tensor_meta`` (arithmetically, then by shape propagation when
``PassContext.example_inputs`` is given) and quantizer state.

Quantizer modules (duck typing, so any quantizer library works): a child module of a layer with
``is_weight_quantizer = True`` is the layer's weight quantizer: if it has ``prune_channels(keep)``
that is called with the kept output-channel indices (a LongTensor); otherwise every direct
parameter/buffer whose leading dim equals the layer's old output-channel count is sliced, the
attributes ``num_channels``/``num_features``/``out_channels`` are updated when they held that
count, and the module's ``load_state_dict`` hooks run (qpasses' fake-quant modules refresh their
caches there). Activation quantizers in the channel path must be per-tensor, or declare their
per-channel tensors in ``per_channel_tensors`` (names of direct parameters/buffers sliced along
dim 0); otherwise the analysis keeps their channels; an activation quantizer that is still
observing makes the constants through it unknown (kept). A weight quantizer that keeps observing
(qpasses' weight fake-quant tracks the weights) would re-derive its ranges from the pruned
weights; when that changes the kept kernels' quantized values, the pass freezes it at its
pre-pruning ranges (``enable_observer(False)``; listed in the run record) so outputs stay equal.
DoReFa weights are normalized by the largest magnitude of the whole tensor: the channel holding
it is kept (``num_kept_quantizer``).

Semantics on a float graph: a 0-bit kernel is treated as computing with zero weights (what any
weight quantizer makes of it); the float graph itself still multiplies by the float weights until
quantizers are inserted, so compare a pruned float graph with the unpruned one whose 0-bit
kernels are zeroed.

Layout: ``ChannelIndex`` holds the lookups, ``ChannelPruner.plan()`` decides (a ``PrunePlan``),
``ChannelSurgery.apply(plan)`` carries it out.
"""
from qpasses.algorithms.pruning.index import ChannelIndex, PrunePlan
from qpasses.algorithms.pruning.planner import ChannelPruner
from qpasses.algorithms.pruning.surgery import ChannelSurgery
from qpasses.algorithms.pruning.tensors import is_observing, zero_bit_kernels

__all__ = ["ChannelIndex", "PrunePlan", "ChannelPruner", "ChannelSurgery", "is_observing",
           "zero_bit_kernels"]
