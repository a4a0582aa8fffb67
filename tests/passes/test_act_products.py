"""Act x act products (attention after canonicalize) through annotate-bitwidths, insert-fake-quant,
calibrate, the solvers and the cost model; parameter-owning leaves reported as float islands.

The MACs are checked against an independent count: torch's FlopCounterMode on the *original*
model (FLOPs = 2 · MACs for conv/linear/matmul/SDPA). Convention difference: the report counts
per sample (like conv/linear, the batch dim is not counted), FlopCounterMode the whole batch, so
report MACs = FLOPs / 2 / batch. torch's MultiheadAttention fast path
(``torch._native_multi_head_attention``) is invisible to FlopCounterMode, so it is disabled there.
"""
from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import qpasses
from passes_registry import PassContext, PassManager
from qpasses.ir.annotations import get_qmeta
from qpasses.modules.lookup import is_act_fq_node
from qpasses.report import report

from .pipeline_helpers import run_with_stats

torch.set_num_threads(1)
PRE = "canonicalize,fold-batch-norm,dce,annotate-bitwidths{weight-bits=4 act-bits=6}"


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2,
                                                num_heads=2, hidden_dim=32, mlp_dim=64,
                                                num_classes=10).eval()


def _run(model, x, text, **ctx):
    gm = qpasses.trace(model, x)
    with PassContext(example_inputs=(x,), **ctx):
        PassManager.parse(f"graph({text})").run(gm)
    return gm


def _products(gm):
    return [n for n in gm.graph.nodes if n.target is torch.matmul]


def test_default_pipeline_up_to_calibrate_on_a_tiny_vit():
    x = torch.randn(2, 3, 32, 32)
    cal = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    gm = _run(tiny_vit(), x, PRE + ",insert-fake-quant{weight-scheme=symmetric per-channel=true},"
              "calibrate", calibration_data=cal)
    prods = _products(gm)
    assert len(prods) == 4
    for p in prods:
        q = get_qmeta(p)
        assert q.act is not None and q.act.bits == 6 and q.float_island is None, p.name
        assert len(p.args) == 2 and all(is_act_fq_node(gm, a) for a in p.args), p.name
        for a in p.args:  # calibrated: the operand quantizers have a range
            assert get_qmeta(a).output.scale is not None, a.name
    rep = report(gm)
    assert rep["float_islands"] == []
    rows = [r for r in rep["layers"] if r["op"] == "matmul"]
    assert [r["name"] for r in rows] == [p.name for p in prods]
    for r in rows:
        assert r["a_bits"] == 6 and r["params"] == 0 and r["size_bits"] == 0
        assert r["bitops"] == r["macs"] * 6 * 6
    names = {r["name"] for r in rep["layers"]}
    assert "encoder.layers.encoder_layer_0.self_attention.q_proj" in names
    with torch.no_grad():
        assert torch.isfinite(gm(x)).all()


def test_insert_fake_quant_reuses_an_operand_quantizer_and_is_idempotent():
    class XXt(nn.Module):  # x @ x^T: a layer and both operands read the same tensor
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return torch.matmul(y, y.transpose(-2, -1)) + self.fc(y).sum()

    x = torch.randn(2, 3, 4)
    gm = _run(XXt().eval(), x, "annotate-bitwidths{first-last-bits=none},insert-fake-quant")
    (p,) = _products(gm)
    a, bt = p.args
    assert is_act_fq_node(gm, a) and is_act_fq_node(gm, bt)
    fc_calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "fc"]
    assert fc_calls[1].args[0] is a  # the second fc reads y: one quantizer, shared
    n_before = len(gm.graph.nodes)
    with PassContext(example_inputs=(x,)):
        res = PassManager.parse("graph(insert-fake-quant)", assume=gm).run(gm)
    assert len(res.graph.nodes) == n_before


def test_undecomposed_attention_is_a_listed_float_island():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)
            self.register_buffer("mask", torch.zeros(4, 4, dtype=torch.bool))

        def forward(self, x):
            return self.fc(self.attn(x, x, x, attn_mask=self.mask, need_weights=False)[0])

    x = torch.randn(2, 4, 8)
    gm = qpasses.trace(Masked().eval(), x)
    gm, stats = run_with_stats(gm, "graph(canonicalize,annotate-bitwidths)")
    assert stats["num_float_leaves"] == 1
    (island,) = report(gm)["float_islands"]
    assert island["op"] == "MultiheadAttention"
    assert island["reason"] == ("nn.MultiheadAttention not decomposed: attn_mask is given "
                                "(masked attention is not decomposed)")
    # re-running with the same options changes nothing
    with PassContext(verify_each=True):
        res = PassManager.parse("graph(annotate-bitwidths)").run(gm)
    assert report(res)["float_islands"] == [island]
    # not canonicalized at all: it says what to run
    class Plain(Masked):
        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0])

    gm2 = qpasses.trace(Plain().eval(), x)
    gm2, _ = run_with_stats(gm2, "graph(annotate-bitwidths)")
    assert "run canonicalize first" in report(gm2)["float_islands"][0]["reason"]


def test_custom_parameter_module_is_a_listed_float_island():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(5))

        def forward(self, x):
            return x * self.gain

    model = nn.Sequential(nn.Linear(5, 5), Scale(), nn.LayerNorm(5), nn.Linear(5, 2)).eval()
    gm = qpasses.trace(model, torch.randn(2, 5), leaf_modules=[Scale])
    gm, stats = run_with_stats(gm, "graph(annotate-bitwidths)")
    islands = report(gm)["float_islands"]
    assert islands == [{"node": "_1", "op": "Scale", "reason": "no integer kernel for Scale"}]
    assert stats["num_float_leaves"] == 1 and stats["num_act_products"] == 0


def _flop_macs(model, x):
    fc = FlopCounterMode(display=False)
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused path is invisible to the counter
    try:
        with fc, torch.no_grad():
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return fc.get_total_flops() / 2


@pytest.mark.parametrize("name,batch", [("tiny", 1), ("tiny", 3), ("vit_b_16", 1)])
def test_report_macs_equal_an_independent_flop_count(name, batch):
    model = (tiny_vit() if name == "tiny"
             else torchvision.models.vit_b_16(image_size=32).eval())
    x = torch.randn(batch, 3, 32, 32)
    gm = _run(model, x, PRE)
    rep = report(gm)
    flops_macs = _flop_macs(model, x)
    assert rep["totals"]["macs"] * batch == flops_macs
    prods = [r for r in rep["layers"] if r["op"] == "matmul"]
    layers = 2 if name == "tiny" else 12
    assert len(prods) == 2 * layers
    # the products alone: 2 · heads · tokens² · head_dim = 2 · tokens² · hidden per layer
    hidden = 32 if name == "tiny" else 768
    assert sum(r["macs"] for r in prods) == layers * 2 * 5 * 5 * hidden
    # BitOPs of the products: MACs · a · a (act-bits=6 on both operands)
    assert sum(r["bitops"] for r in prods) == 36 * sum(r["macs"] for r in prods)


def test_solvers_budget_the_report_total_with_products():
    x = torch.randn(1, 3, 32, 32)
    for extra in ("", " act-candidates={4,8}"):
        gm = _run(tiny_vit(), x, PRE + f",solve-bitwidths{{target-bitops=0.008{extra}}}")
        total = report(gm)["totals"]["bitops"]
        assert 0.99 * 8e6 <= total <= 8e6, (extra, total)


@pytest.mark.parametrize("tail", ["insert-fracbits,freeze-fracbits",
                                  "insert-gmpq-supernet,select-gmpq-policy"])
def test_searches_run_on_decomposed_attention(tail):
    gm = _run(tiny_vit(), torch.randn(1, 3, 32, 32), PRE + "," + tail)
    rep = report(gm)
    assert len([r for r in rep["layers"] if r["op"] == "matmul"]) == 4
    assert rep["float_islands"] == []


def test_prune_zero_bit_channels_runs_on_decomposed_attention(tmp_path):
    mlp = "encoder.layers.encoder_layer_0.mlp.0"
    q = "encoder.layers.encoder_layer_0.self_attention.q_proj"
    cfg = tmp_path / "bits.json"
    cfg.write_text(json.dumps({mlp: {"weight_bits": [0, 0] + [4] * 62},
                               q: {"weight_bits": [0] + [4] * 31}}))
    x = torch.randn(1, 3, 32, 32)
    gm = _run(tiny_vit(), x, f"canonicalize,fold-batch-norm,dce,annotate-bitwidths{{config={cfg}}},"
              "prune-zero-bit-channels,dce")
    assert gm.get_submodule(mlp).weight.shape == (62, 32)   # removed
    assert gm.get_submodule(q).weight.shape == (32, 32)     # kept: heads are split by a reshape
    assert len(_products(gm)) == 4
    with torch.no_grad():
        assert gm(x).shape == (1, 10)


def test_acc_width_lists_products_with_a_sound_worst_case():
    """print<acc-width>/check-acc-width see attention's matmuls before lowering: their worst case
    over any zero points of the act grid bounds every accumulator the integer graph computes."""
    x = torch.randn(2, 3, 32, 32)
    gm = _run(tiny_vit(), x, PRE + ",insert-fake-quant{weight-scheme=symmetric per-channel=true},"
              "calibrate", calibration_data=[x])
    from passes_registry import AnalysisManager
    acc = AnalysisManager().get("acc-width", gm)
    prods = {p.name: p for p in acc.products}
    assert set(prods) == {p.name for p in _products(gm)}
    for r in prods.values():
        m = 2 ** 6 - 1                      # |q − z| <= 2^b − 1 for any zero point on the grid
        assert r.acc_bits == (r.fan_in * m * m).bit_length() + 1, r
    rep = {r["name"]: r for r in report(gm)["layers"]}
    assert all(rep[n]["acc_bits"] == prods[n].acc_bits for n in prods)
    lowered = _run(tiny_vit(), x, PRE + ",insert-fake-quant{weight-scheme=symmetric "
                   "per-channel=true},calibrate,lower-to-int-sim", calibration_data=[x])
    from qpasses.modules.int_sim_transformer import IntMatMul
    for name, mod in lowered.named_modules():
        if isinstance(mod, IntMatMul):
            node = next(n for n in lowered.graph.nodes if n.op == "call_module" and n.target == name)
            assert mod.acc_bits <= prods[node.name].acc_bits, (name, mod.acc_bits)
    _, stats = run_with_stats(gm, "graph(check-acc-width{target=16})")
    assert stats["num_over_target"] >= len(prods)
