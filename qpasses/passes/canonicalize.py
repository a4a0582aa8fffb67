"""canonicalize: rewrite equivalent operator spellings to one canonical form per operation.

The rule table, the fixpoint driver and the ``canonical`` checker are in
:mod:`qpasses.ir.canonical_rules`; this module registers the pass and the property.
"""
from __future__ import annotations

from typing import Any

import torch.fx

from passes_registry import Pass, PassResult, PreservedAnalyses, register_pass, register_property

from qpasses.ir.canonical_rules import RULES, check_canonical, rewrite_to_fixpoint, rule_stat_key


@register_pass
class Canonicalize(Pass):
    """Rewrite equivalent operator spellings to one canonical form.

    Later pattern passes then match one form per operation. Canonical forms are ``call_function``
    nodes on public torch callables, never modules: they are stateless, carry their parameters
    visibly in ``args`` (hardtanh bounds, gelu approximation), need no submodule, and are what the
    functional spellings (``F.relu``, ``x + y``) already trace to. Out-of-place always:

    - activations: ``torch.relu``, ``F.relu6`` (also hardtanh(0, 6), clamp(0, 6)),
      ``F.hardtanh(x, lo, hi)``, ``torch.sigmoid``, ``torch.tanh``, ``F.hardsigmoid``,
      ``F.hardswish``, ``F.silu``, ``F.gelu(x[, approximate='tanh'])``,
      ``F.leaky_relu(x, slope)``; ``clamp(min=0)`` becomes ``torch.relu``;
    - ``torch.flatten(x, start[, end])`` with non-negative dims, from ``nn.Flatten``,
      ``x.flatten``, and ``x.view/reshape(x.size(0), -1)`` or ``(-1, C*H*W)`` where the traced
      shapes prove it is a flatten from dim 1;
    - ``operator.add/sub/mul/truediv`` from ``torch.add`` (alpha=1), ``x.add``, ``x.add_``,
      ``operator.iadd`` and the like;
    - ``torch.cat(list, dim)`` from ``torch.concat``/``torch.concatenate``/keyword forms;
    - ``nn.Identity`` and eval-mode dropout are removed;
    - ``nn.MultiheadAttention`` (batched inputs, no masks, eval mode or dropout 0) is decomposed
      (:mod:`qpasses.ir.attention_rules`): plain ``nn.Linear`` ``q_proj``/``k_proj``/``v_proj``/
      ``out_proj`` at the module's path (copies of its weights; **1/sqrt(head_dim) is folded into
      q_proj's weight and bias**), head split (reshape + transpose),
      ``torch.matmul(q, k.transpose(-2, -1))``, ``torch.softmax(.., -1)``,
      ``torch.matmul(attn, v)``, head merge, ``out_proj``; the attention weights, when read, are
      ``attn.mean(1)`` (or per head). Sizes are read with ``x.size()``, so the batch stays dynamic.
    - a two-operand ``torch.einsum`` that is a (batched) matrix product (batch, contracted and
      free indices only; :mod:`qpasses.ir.einsum_rules`) becomes ``permute``/``flatten`` of each
      operand, ``torch.matmul`` and ``unflatten``/``permute`` of the result (MaxViT's
      ``"B G H I D, B G H J D -> B G H I J"`` is ``torch.matmul(q, k.transpose(3, 4))``); other
      einsums (traces, diagonals, sums over one operand, outer products, 3+ operands,
      broadcasting) stay and ``annotate-bitwidths`` reports them as float islands.
    - torchvision Swin's ``torch.fx.wrap``ped functions (:mod:`qpasses.ir.swin_rules`), specialized
      with the traced shapes exactly as the function's Python runs: ``shifted_window_attention``
      becomes ``F.pad`` (sizes not a multiple of the window), ``torch.roll`` (a shift the window
      does not cover), window partition (reshape/permute), plain ``nn.Linear`` ``qkv.q/k/v``
      (copies of the qkv rows, **head_dim^-0.5 folded into q**) and ``proj``, ``torch.matmul``,
      ``+ relative_position_bias``, ``+ shift_mask`` (a buffer computed now, on the calling
      module), ``torch.softmax``, window merge, reverse roll, crop; V2's cosine attention keeps
      ``F.normalize`` and ``clamp(logit_scale).exp()``. ``_get_relative_position_bias`` becomes
      ``table[index].reshape().permute().unsqueeze(0)`` (a constant subgraph) and
      ``_patch_merging_pad`` becomes ``F.pad`` + four strided slices + ``torch.cat``.

    The rule table is ``RULES``; statistics count hits per rule (``num_relu``...) and in total
    (``num_rewrites``).

    Requires: -. Establishes: canonical. Preserves: nothing.

    Example: graph(canonicalize,fold-batch-norm,dce)

    Rationale:
    - An in-place op (``relu_``, ``inplace=True``, ``x += y`` as ``iadd``) becomes out-of-place
      only when its operand is a fresh tensor (made by a computing op, not an input, attribute
      or view) that no earlier user aliases; later readers of the operand are redirected to the
      result. Otherwise the mutation is observable elsewhere and the node is left as it is.
    - An in-place binary op is rewritten only when both operands have the same dtype: ``x + y``
      could promote where ``x.add_(y)`` keeps ``x``'s dtype.
    - ``clamp`` becomes relu/relu6 only on floating-point tensors.
    - ``view``/``reshape`` become flatten only when the traced shapes prove it; a constant
      batch size (``x.view(1, -1)``) is left alone because it is not a flatten for other batches.
    - Dropout is removed only in eval mode (module ``training`` False, or an explicit
      ``training=False``); ``F.dropout``'s default ``training=True`` keeps it.
    - Module subclasses are left alone (exact types only): their forward may differ.
    - Attention with ``attn_mask``/``key_padding_mask``/``is_causal``, ``add_bias_kv``,
      ``add_zero_attn``, dropout in training mode or unbatched inputs stays a leaf;
      ``annotate-bitwidths`` reports it as a float island with that reason. Three projections,
      not one ``3E`` linear and a chunk: each is one chain linear -> reshape -> transpose ->
      quantizer, which the integer lowering handles.
    - A Swin attention call stays when its input has no traced 4-d shape, in training mode with
      dropout, or when its qkv/proj weights are not ``<module>.weight``/``.bias`` pairs read by
      this call only (``qpasses.ir.swin_rules.window_attention_reason`` says which).
    """
    name = "canonicalize"
    summary = "Rewrite equivalent operator spellings to one canonical form"
    establishes = frozenset({"canonical"})
    preserves = PreservedAnalyses.none()

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        hits = rewrite_to_fixpoint(gm)
        stats = {rule_stat_key(r.name): hits.get(r.name, 0) for r in RULES}
        stats["num_rewrites"] = sum(hits.values())
        return PassResult(modified=bool(hits), stats=stats)


__all__ = ["Canonicalize"]


register_property("canonical", check_canonical,
                  summary="one spelling per operation: no canonicalization rule applies")
