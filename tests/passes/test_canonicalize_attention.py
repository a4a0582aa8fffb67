"""canonicalize's ``multihead-attention`` rule: nn.MultiheadAttention -> q/k/v/out_proj linears,
matmul, softmax (qpasses.ir.attention_rules). Numeric equivalence (hypothesis), shapes on the new
nodes, dynamic batch, the user's model untouched, what stays a leaf, and torchvision's ViT-B/16."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qpasses
from passes_registry import PassManager
from qpasses.ir.attention_rules import undecomposed_reason
from qpasses.ir.canonical_rules import check_canonical
from qpasses.ir.fx import node_shape

from .pipeline_helpers import run_with_stats

torch.set_num_threads(1)


class Attend(nn.Module):
    """One MultiheadAttention call; ``cross``: key/value come from a second input."""

    def __init__(self, mha: nn.MultiheadAttention, cross: bool, need_weights: bool,
                 average: bool = True, **call_kwargs):
        super().__init__()
        self.mha, self.cross, self.need_weights, self.average = mha, cross, need_weights, average
        self.call_kwargs = call_kwargs

    def forward(self, x, mem):
        k = mem if self.cross else x
        v = mem.flip(-2) if self.cross else x  # cross: query, key and value are three nodes
        out, w = self.mha(x, k, v, need_weights=self.need_weights,
                          average_attn_weights=self.average, **self.call_kwargs)
        return (out, w) if self.need_weights else out


def _inputs(batch_first: bool, n: int, lq: int, ls: int, e: int, kdim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, lq, e, generator=g)
    mem = torch.randn(n, ls, kdim, generator=g)
    if not batch_first:
        x, mem = x.transpose(0, 1).contiguous(), mem.transpose(0, 1).contiguous()
    return x, mem


def _mha(e, heads, batch_first, kdim=None, bias=True, seed=0):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(e, heads, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias)
    with torch.no_grad():  # non-zero biases so that folding the scale into them is tested
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def _canonicalize(model, inputs):
    gm = qpasses.trace(model, inputs)
    gm, stats = run_with_stats(gm, "graph(canonicalize,dce)")
    return gm, stats


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


@settings(deadline=None, max_examples=12, derandomize=True)
@given(head_dim=st.sampled_from([1, 3, 8]), heads=st.sampled_from([1, 2, 4]),
       batch_first=st.booleans(), cross=st.booleans(), need_weights=st.booleans(),
       average=st.booleans(), other_kdim=st.booleans(), bias=st.booleans(),
       n=st.integers(1, 3), lq=st.integers(1, 5), ls=st.integers(1, 5))
def test_decomposed_attention_matches_the_module(head_dim, heads, batch_first, cross,
                                                  need_weights, average, other_kdim, bias, n, lq,
                                                  ls):
    e = head_dim * heads
    kdim = e + 3 if (cross and other_kdim) else None
    model = Attend(_mha(e, heads, batch_first, kdim=kdim, bias=bias), cross, need_weights,
                   average).eval()
    x, mem = _inputs(batch_first, n, lq, ls if cross else lq, e, kdim or e, seed=lq * 7 + ls)
    before = copy.deepcopy(model.state_dict())
    gm, stats = _canonicalize(model, (x, mem))
    assert stats["num_multihead_attention"] == 1
    assert not any(isinstance(m, nn.MultiheadAttention) for m in gm.modules())
    assert check_canonical(gm) == []
    with torch.no_grad():
        ref, got = _outputs(model(x, mem)), _outputs(gm(x, mem))
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(b.abs().max())))
    # the user's module is untouched (the graph owns copies of the weights)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # every tensor-valued new node carries its traced shape
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_function") or \
                (node.op == "call_method" and node.target != "size"):
            assert node_shape(node) is not None, node.name


def test_modules_names_scale_folding_and_dynamic_batch():
    mha = _mha(8, 2, batch_first=True)
    model = Attend(mha, cross=False, need_weights=False)
    x, mem = _inputs(True, 2, 4, 4, 8, 8, seed=1)
    gm, _ = _canonicalize(model, (x, mem))
    mods = dict(gm.named_modules())
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert type(mods[f"mha.{p}"]) is nn.Linear, p
    wq = mha.in_proj_weight[:8] / 2.0  # head_dim 4: 1/sqrt(4) folded into q_proj
    torch.testing.assert_close(mods["mha.q_proj"].weight, wq)
    torch.testing.assert_close(mods["mha.q_proj"].bias, mha.in_proj_bias[:8] / 2.0)
    torch.testing.assert_close(mods["mha.k_proj"].weight, mha.in_proj_weight[8:16])
    matmuls = [n for n in gm.graph.nodes if n.target is torch.matmul]
    assert [node_shape(n) for n in matmuls] == [(2, 2, 4, 4), (2, 2, 4, 4)]
    x5 = torch.randn(5, 4, 8)  # another batch size: the shapes are read with x.size()
    with torch.no_grad():
        torch.testing.assert_close(gm(x5, x5), model(x5, x5), rtol=1e-5, atol=1e-5)


def test_shared_module_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = _mha(6, 3, batch_first=True)

        def forward(self, x):
            y = self.mha(x, x, x, need_weights=False)[0]
            return self.mha(y, x, x)[0]

    model = Twice().eval()
    x = torch.randn(2, 3, 6)
    gm, stats = _canonicalize(model, (x,))
    assert stats["num_multihead_attention"] == 1  # one rewrite decomposes both calls
    assert sum(n.target is torch.matmul for n in gm.graph.nodes) == 4
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["attn_mask", "key_padding_mask", "is_causal", "bias_kv",
                                  "zero_attn", "training_dropout", "unbatched"])
def test_unsupported_calls_stay_a_leaf(case):
    kw, mha_kw, x = {}, {}, torch.randn(2, 3, 4)
    if case == "attn_mask":
        kw["attn_mask"] = torch.zeros(3, 3, dtype=torch.bool)
    elif case == "key_padding_mask":
        kw["key_padding_mask"] = torch.zeros(2, 3, dtype=torch.bool)
    elif case == "is_causal":
        kw = {"attn_mask": torch.ones(3, 3).triu(1).bool(), "is_causal": True}
    elif case == "bias_kv":
        mha_kw["add_bias_kv"] = True
    elif case == "zero_attn":
        mha_kw["add_zero_attn"] = True
    elif case == "unbatched":
        x = torch.randn(3, 4)
    mha = nn.MultiheadAttention(4, 2, batch_first=True, dropout=0.1, **mha_kw).eval()
    model = Attend(mha, cross=False, need_weights=False, **kw).eval()
    gm = qpasses.trace(model, (x, x))
    if case == "training_dropout":
        gm.get_submodule("mha").train()
    gm, stats = run_with_stats(gm, "graph(canonicalize)")
    assert stats["num_multihead_attention"] == 0
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert isinstance(gm.get_submodule(str(node.target)), nn.MultiheadAttention)
    reason = undecomposed_reason(gm, node)
    assert reason is not None and reason.startswith("nn.MultiheadAttention not decomposed")
    assert check_canonical(gm) == []


def test_vit_b_16_canonicalized_preserves_outputs():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32).eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
    x = torch.randn(1, 3, 32, 32)
    gm = qpasses.trace(model, x)
    gm = PassManager.parse("graph(canonicalize,fold-batch-norm,dce)").run(gm)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in gm.modules())
    assert sum(n.target is torch.matmul for n in gm.graph.nodes) == 24
    with torch.no_grad():
        ref, got = model(x), gm(x)
    assert float(ref.abs().max()) > 1e-3
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
