"""canonicalize's swin-* rules (qpasses.ir.swin_rules) and the integer lowering of what they emit:

- torchvision's swin_t / swin_v2_t at the zoo's input size keep their outputs (float tolerance)
  and no wrapped Swin function is left;
- ShiftedWindowAttention(V2) on sizes that need padding, a kept shift, a shift dropped because the
  window covers the input, odd PatchMerging inputs: outputs preserved, the user's module untouched;
- calls the rule cannot specialize stay (with the reason);
- a tiny torchvision SwinTransformer through graph(default): no float island, padding lowered to
  IntPad with the zero-point code, verify-int-sim bit-exact.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qpasses
from passes_registry import PassContext, PassManager, get_record
from qpasses.ir.records import INT_SIM_KEY
from qpasses.ir.swin_rules import window_attention_reason
from qpasses.modules.int_sim_pad import IntPad

tvswin = pytest.importorskip("torchvision.models.swin_transformer")

WRAPPED = ("shifted_window_attention", "_get_relative_position_bias", "_patch_merging_pad")


def _wrapped_calls(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_function"
            and getattr(n.target, "__name__", "") in WRAPPED]


def _canonicalize(m: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    gm = qpasses.trace(m, (x,))
    assert _wrapped_calls(gm)
    with PassContext(example_inputs=(x,)):
        PassManager.parse("graph(canonicalize,dce)").run(gm)
    return gm


@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_zoo_swin_canonicalized_preserves_outputs(name):
    from tools.zoo_models import build
    torch.set_num_threads(1)
    model, x = build(name)
    with torch.no_grad():
        ref = model(x)
        gm = _canonicalize(model, x)
        out = gm(x)
    assert _wrapped_calls(gm) == []
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


class _Block(nn.Module):
    def __init__(self, dim, window, shift, heads, v2):
        super().__init__()
        cls = tvswin.ShiftedWindowAttentionV2 if v2 else tvswin.ShiftedWindowAttention
        self.attn = cls(dim, window, shift, heads)
        self.merge = (tvswin.PatchMergingV2 if v2 else tvswin.PatchMerging)(dim)

    def forward(self, x):
        return self.merge(self.attn(x))


@settings(deadline=None, max_examples=8, derandomize=True)
@given(h=st.integers(2, 9), w=st.integers(2, 9), window=st.sampled_from([(3, 3), (4, 2)]),
       shift=st.sampled_from([(0, 0), (1, 1), (2, 1)]), v2=st.booleans(), batch=st.integers(1, 2))
def test_window_attention_rewrite_matches_the_function(h, w, window, shift, v2, batch):
    torch.manual_seed(h * 10 + w)
    m = _Block(8, list(window), list(shift), 2, v2).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)       # non-zero biases / tables (v2's k bias too)
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(batch, h, w, 8)
    with torch.no_grad():
        ref = m(x)
        gm = _canonicalize(m, x)
        out = gm(x)
        out2 = gm(torch.cat([x, x]))                 # the batch dimension stays dynamic
    assert _wrapped_calls(gm) == []
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out2, torch.cat([ref, ref]), rtol=1e-5, atol=1e-5)
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


def test_training_with_dropout_stays_a_call_with_a_reason():
    m = tvswin.ShiftedWindowAttention(8, [4, 4], [2, 2], 2, attention_dropout=0.1).train()
    x = torch.randn(1, 8, 8, 8)
    gm = torch.fx.symbolic_trace(m)
    from torch.fx.passes.shape_prop import ShapeProp
    ShapeProp(gm).propagate(x)
    node = next(n for n in gm.graph.nodes if n.name == "shifted_window_attention")
    assert "dropout" in window_attention_reason(gm, node)
    with PassContext(example_inputs=(x,)):
        PassManager.parse("graph(canonicalize)").run(gm)
    assert "shifted_window_attention" in _wrapped_calls(gm)


def test_tiny_swin_lowers_without_float_islands():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = tvswin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                               window_size=[4, 4], num_classes=10).eval()
    x = torch.randn(2, 3, 20, 20)     # 5x5 tokens: padded to 8x8, shifted windows kept
    cal = [torch.randn(2, 3, 20, 20) for _ in range(2)]
    gm = qpasses.trace(m, (x,))
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse("graph(default)").run(gm)      # lowers and verifies bit-exact
    rec = get_record(gm, INT_SIM_KEY)
    assert list(rec.float_islands) == []
    pads = [mod for mod in gm.modules() if isinstance(mod, IntPad)]
    assert len(pads) == 5                                # 2 attention, 3 patch-merging pads
    assert rec.verify is not None and rec.verify["local_max_lsb_diff"] <= 1


class _PadNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0, self.ln, self.fc = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)
        nn.init.constant_(self.ln.bias, 1.0)             # an asymmetric range: zero point != 0

    def forward(self, x):
        return self.fc(torch.nn.functional.pad(self.ln(self.fc0(x)), (0, 0, 1, 2)))


def test_zero_padding_uses_the_zero_point_code():
    torch.manual_seed(0)
    m = _PadNet().eval()
    x = torch.randn(2, 5, 4)
    gm = qpasses.trace(m, (x,))
    with PassContext(example_inputs=(x,), calibration_data=[x]):
        PassManager.parse("graph(default)").run(gm)      # verify-int-sim: bit-exact vs oracle
    rec = get_record(gm, INT_SIM_KEY)
    assert list(rec.float_islands) == []
    (pad,) = [mod for mod in gm.modules() if isinstance(mod, IntPad)]
    # the LayerNorm lands on the linear's input grid (the padding commutes with its quantizer):
    # the padding code is that grid's zero point
    assert pad.code != 0 and pad.qmin <= pad.code <= pad.qmax
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and
                n.args and n.args[0].target == "int_sim.pad"
                and type(gm.get_submodule(str(n.target))).__name__ == "Requantize"]
    with torch.no_grad():
        out, ref = gm(x), m(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0.05)
    # padded rows: fc(0) = fc's bias, as in float
    torch.testing.assert_close(out[:, [0, -2, -1]], m.fc.bias.expand(2, 3, 3), rtol=0, atol=0.02)
