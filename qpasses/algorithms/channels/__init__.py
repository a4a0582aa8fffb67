"""Channel propagation on FX graphs: which channels of which tensors and parameters must be
pruned together. Used by the ``channel-groups`` analysis and by ``prune-zero-bit-channels``.

Built on the FX graph itself, without autograd tracing, so fake-quant graphs work (the
dependency graph of "DepGraph: Towards Any Structural Pruning" traces autograd and breaks on
them). Every output channel of a conv/linear layer is an *atom*; the walk over the graph
records, for every tensor, which atom sits at each position of its channel dimension, and
unions atoms that must be removed together (union-find). A *channel class* (the pruning unit) is
one equivalence class of atoms; a *group* is a set of classes whose producers are connected
(networkx components), listed with every member that holds them.

Coupling rules (how a node maps or couples channels):

- conv / linear, groups = 1: producer of fresh atoms on its output (dim 0 of weight and bias);
  consumer of its input's atoms (dim 1 of weight). Several calls of one weight (shared modules,
  tied weights) couple their outputs and their inputs position by position.
- grouped and depthwise conv: input block ``k`` and output block ``k`` are one unit (a conv
  group is removed whole, so ``groups`` stays uniform); for depthwise convs that is channel ``j``
  in, channel ``j`` out.
- BatchNorm (all four statistics and the affine pair), PReLU with one slope per channel, and
  quantizer modules declaring per-channel state: per-channel parameters sliced with the channel.
- elementwise ops (activations, dropout, identity, dtype casts, per-tensor activation
  quantizers, contiguous/clone): pass-through.
- binary elementwise ops (add, sub, mul, div; residual adds, squeeze-and-excitation multiplies):
  all operands' channels are coupled position by position; a Python scalar or a size-1
  broadcast operand couples nothing; a ``get_attr`` operand with one value per channel becomes a
  member (sliced with the channel).
- concat along the channel dim: offset ranges; along another dim: operands coupled.
- split / chunk along the channel dim: offset ranges (the pruner rewrites the sizes); along
  another dim: every piece keeps the channels.
- view / reshape / flatten / squeeze / unsqueeze: row-major index mapping from shapes
  (``flatten -> linear`` maps channel ``c`` to the block ``[c*HW, (c+1)*HW)``). A view that splits
  the channel dim into several dims (channel shuffle) yields a multi-dim block; its channels are
  coupled along every axis but the last, so pruning keeps the block rectangular and the view's
  size arguments stay valid. transpose / permute move or permute the block (shuffle = view,
  transpose, view: a permutation mapping).
- pooling (max/avg/adaptive, modules or functions) and mean/sum over non-channel dims:
  pass-through.
- ``size()`` / ``.shape`` results may only feed integer arithmetic and view/reshape sizes.

Anything else that touches a channel (unknown modules and functions, slicing, a reduction over
the channel dim, graph outputs, graph inputs, constants concatenated in) makes the affected
classes unprunable, with the node named as the reason: never wrong, at worst conservative.
"""
from qpasses.algorithms.channels.groups import (ChannelGroup, ChannelGroups, Member,
                                                TensorChannels, build_groups)
from qpasses.algorithms.channels.state import IntState, TensorState, TupleState, reshape_mapping
from qpasses.algorithms.channels.walker import ChannelWalker, no_gc

__all__ = ["ChannelWalker", "ChannelGroups", "ChannelGroup", "Member", "TensorChannels",
           "TensorState", "TupleState", "IntState", "build_groups", "reshape_mapping", "no_gc"]
