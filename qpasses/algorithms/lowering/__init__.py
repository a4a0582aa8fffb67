"""The graph rewrite behind ``lower-to-int-sim``: calibrated fake-quant graph → integer graph.

The builder walks the fake-quant graph once, in topological order, and gives every value a
*representation* (:class:`Rep`): an integer tensor on a known grid (:class:`QType`: scale per tensor
or per channel, zero point, declared range) or a float tensor. Requantization is lazy — a value
keeps the finest exact grid it has (a conv accumulator at scale ``s_x·s_w[c]``, a pooled window sum
at ``s/L``, a pending ReLU/ReLU6/clamp in real units) until a consumer needs another grid, which is
where the fake-quant graph has a quantizer. So every requantization of the integer graph sits where
the fake-quant graph rounds, with one rounding, and fused activations are exact clamps of the
output range.

Rules (fake-quant node → integer nodes):

- activation fake quantizer on a float value: :class:`Quantize` (the input quantize, or the exit of
  a float island); on an integer value: nothing when the value already lies on the quantizer's grid,
  an :class:`IntClamp` when only the range differs, else a :class:`Requantize` with the pending
  clamp folded into its output range (fused into the producing conv/linear when it is its only
  consumer).
- conv (1-3d, stride, padding, dilation, groups, depthwise) / linear with fake-quant weights and a
  quantized input: :class:`IntLayer` with integer weights taken from the weight quantizer's own
  output (and checked to lie exactly on the grid; DoReFa's float32 ``2·(k/L) − 1`` within
  float32 rounding of it), per-kernel bits and per-channel scales, int32 bias
  ``rne(b/(s_x·s_w))`` (fbgemm's float bias under ``float-rne``), and the fast kernel its exactness
  bound allows.
- relu/relu6/hardtanh/clamp: a pending clamp (free); max pool: :class:`IntMaxPool` (keeps the
  pending clamp: max commutes with it); average / adaptive-average pool and ``mean`` over trailing dims:
  :class:`IntAvgPoolSum` (window sums times ``L·2^k/count``: ``k`` fractional bits of the mean
  where gemmlowp's double rounding would cost more than 1/64 LSB, see ``ClampPoolRules``);
  flatten/view/reshape/permute/transpose/squeeze/unsqueeze/contiguous/getitem/dropout/identity/
  stochastic depth (eval): pass-through.
- add / cat joins: :class:`IntAdd` / :class:`IntCat` onto the join's output quantizer grid (exact
  integer add when all scales agree, which ``join-scales=shared`` guarantees); a tensor product
  feeding a quantizer: :class:`IntMul`.
- elementwise nonlinearities (hardswish, hardsigmoid, sigmoid, SiLU, GELU, tanh, ELU, leaky ReLU,
  softplus, mish, and arithmetic with a constant) on ≤ 16-bit codes whose value reaches a quantizer:
  :class:`IntLUT` producing that quantizer's codes directly (bit-identical to the fake-quant float32
  computation). When the input is an accumulator (conv → hardswish), it is first requantized onto a
  ``lut-bits`` intermediate grid whose range comes from calibration data (or the proven accumulator
  bound); when the output reaches no quantizer (e.g. a squeeze-excitation gate feeding a product),
  bounded functions (sigmoid, hardsigmoid, tanh) get a ``gate-bits`` output grid on their exact
  range.
- matmul of two integer activations, softmax and LayerNorm (``transformer``): :class:`IntMatMul`
  (exact accumulator, requantized onto the quantizer it reaches or kept at ``s_a·s_b``),
  :class:`IntSoftmax` (exponent table, Q30 division) and :class:`IntLayerNorm` (integer mean and
  variance, exact square root, γ/β folded into a fixed-point requantization), ``F.normalize``
  (p=2) to :class:`IntL2Normalize` (the same arithmetic without mean and affine); wide or
  per-channel inputs go through a ``lut-bits`` intermediate grid first.
- per-channel affine ops with constant operands (eval-mode BatchNorm not after a conv,
  ``x * param``, ``x + param``, ``x - c``, ``c - x``, ``x / c``; ``affine``): :class:`IntAffine`, one
  requantization with a signed multiplier and an integer bias per channel onto the quantizer the
  value reaches through clamps and shape ops (the clamps fold into its range), else a ``lut-bits``
  grid. A per-channel accumulator moved by permute/transpose/movedim (or a reshape that keeps its
  channel dim whole) keeps its grid, the channel axis moved with it.
- constants (``constants``): a value computed from parameters and buffers only is evaluated at
  lowering; under an activation quantizer (a class token, a position embedding) it becomes
  :class:`IntConstant` codes, the shape ops after it that read runtime shapes (``expand`` to the
  batch) replayed on the codes; a float constant operand of an add/cat goes onto the join's grid.
- anything else: a float island — the integer inputs are dequantized, the op runs in float, and the
  next quantizer quantizes again; the node carries ``QMeta.float_island`` with the reason.
- graph outputs: :class:`Dequantize` (per channel for a raw accumulator, e.g. logits).

The rewrite runs as the passes of the ``lower-to-int-sim`` pipeline: the builder
(:mod:`~qpasses.algorithms.lowering.builder`, with the rules by family in ``layers``, ``pools``,
``shapes``, ``joins``, ``luts`` and ``transformer``), then requantization fusion (``fusion``), fractional bias bits
and exact zero-kernel constants (``biases``) and the removal of what became unused (``cleanup``).
The op spellings are in ``ops``, the int-sim record in ``record``.
"""
