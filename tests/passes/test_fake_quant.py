"""qpasses.modules.fake_quant modules: values against the numerics, per-kernel and 0-bit weights, STE,
PACT/LSQ gradients, modes, state_dict round trips and bad bit-widths (typed, named)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qpasses.errors import CalibrationError, NumericsError
from qpasses.modules.fake_quant import (AffineActFakeQuant, LSQActFakeQuant, PACTActFakeQuant,
                                        WeightFakeQuant, check_bits)
from qpasses.modules.fake_quant_layers import (FakeQuantConv2d, FakeQuantLinear,
                                               fake_quant_modules, set_fake_quant, set_observing,
                                               wrap_layer, wrapper_class)
from qpasses.numerics import dorefa_weight, minmax_qparams, quantize_dequantize


def test_weight_fq_matches_numerics_per_channel_and_per_tensor():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    for per_channel in (True, False):
        for scheme, ns in (("symmetric", "symmetric"), ("asymmetric", "asymmetric_signed")):
            fq = WeightFakeQuant(6, 4, scheme, per_channel=per_channel)
            s, z = minmax_qparams(w, 4, ns, axis=0 if per_channel else None)
            ref = quantize_dequantize(w, s, z, 4, ns, axis=0)
            assert torch.equal(fq(w), ref), (scheme, per_channel)


def test_weight_fq_per_kernel_bits_and_zero_bit_kernels_exact_zero():
    torch.manual_seed(1)
    w = torch.randn(5, 4, 3, 3)
    bits = [8, 0, 2, 4, 0]
    fq = WeightFakeQuant(5, bits)
    out = fq(w)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[4], torch.zeros_like(out[4]))
    for c, b in enumerate(bits):  # equals quantizing each channel alone at its width
        if b == 0:
            continue
        single = WeightFakeQuant(1, b)(w[c:c + 1])
        assert torch.equal(out[c:c + 1], single)
    assert fq.per_kernel and fq.bits.tolist() == bits
    assert torch.isfinite(fq.scale).all() and (fq.scale > 0).all()


def test_weight_fq_dorefa_and_ste_gradient():
    torch.manual_seed(2)
    w = torch.randn(4, 3, 2, 2, requires_grad=True)
    fq = WeightFakeQuant(4, [3, 0, 2, 5], "dorefa")
    out = fq(w)
    assert torch.equal(out.detach(), dorefa_weight(w.detach(), torch.tensor([3, 0, 2, 5])))
    assert torch.equal(out[1].detach(), torch.zeros(3, 2, 2))
    out.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    # symmetric STE: gradient 1 inside the grid range; the full-range grid puts +max at 7.5,
    # which rounds to 8 and clamps to 7 (Distiller SYMMETRIC): only that element is clipped
    w2 = torch.randn(3, 8, requires_grad=True)
    WeightFakeQuant(3, 4)(w2).sum().backward()
    inside = w2.detach() < w2.detach().abs().amax(1, keepdim=True)
    assert torch.equal(w2.grad, inside.float())


def test_weight_scale_tracks_weight_changes_only_when_they_change():
    w = nn.Parameter(torch.randn(4, 3))
    fq = WeightFakeQuant(4, 8)
    fq(w)
    s0 = fq.scale.clone()
    seen = fq._seen
    fq(w)
    assert fq._seen == seen  # unchanged tensor: no recomputation
    with torch.no_grad():
        w.mul_(2)
    fq(w)
    assert torch.allclose(fq.scale, 2 * s0)
    fq.enable_observer(False)
    with torch.no_grad():
        w.mul_(2)
    fq(w)
    assert torch.allclose(fq.scale, 2 * s0)  # frozen


def test_affine_act_fused_path_equals_numerics_and_modes():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 5, 5) * 3
    q = AffineActFakeQuant(8, "asymmetric")
    q.enable_fake_quant(False)
    assert q(x) is x and q.observed  # observe only
    q.enable_observer(False)
    with pytest.raises(CalibrationError, match="never"):
        q.qparams()
    q.init_from_observer()
    q.enable_fake_quant(True)
    s, z = q.qparams()
    ref = quantize_dequantize(x, s, z, 8, "asymmetric")
    assert torch.equal(q(x), ref)
    x2 = x.clone().requires_grad_()
    q(x2).sum().backward()
    assert torch.equal(x2.grad, torch.ones_like(x2))  # min/max range: all inside
    # rounding other than rne takes the numerics path
    q_rha = AffineActFakeQuant(8, "asymmetric", rounding="rha")
    q_rha.observer.observe(x)
    q_rha.init_from_observer()
    q_rha.enable_observer(False)
    assert torch.equal(q_rha(x), quantize_dequantize(x, *q_rha.qparams(), 8, "asymmetric",
                                                     rounding="rha"))


def test_uncalibrated_activation_with_observer_off_is_a_typed_error():
    q = AffineActFakeQuant(8, name="activation_fake_quant.x")
    q.enable_observer(False)
    with pytest.raises(CalibrationError, match="activation_fake_quant.x"):
        q(torch.randn(3))


def test_pact_one_sided_gradients_and_values():
    q = PACTActFakeQuant(2, alpha_init=1.0)
    x = torch.tensor([-1.0, 0.1, 0.4, 0.9, 2.0], requires_grad=True)
    y = q(x)
    # grid {0, 1/3, 2/3, 1}
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 1 / 3, 1.0, 1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    assert q.alpha.grad.item() == pytest.approx(1.0)  # one clipped element
    s, z = q.qparams()
    assert s.item() == pytest.approx(1 / 3) and z.item() == 0


def test_pact_signed_grid_has_zero_and_alpha_gradient():
    q = PACTActFakeQuant(3, signed=True, alpha_init=3.0)
    x = torch.tensor([-5.0, -1.0, 0.0, 1.4, 4.0], requires_grad=True)
    y = q(x)
    assert torch.allclose(y, torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]))  # step 3/3 = 1
    y.sum().backward()
    assert q.alpha.grad.item() == pytest.approx(0.0)  # +1 (above) - 1 (below)
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    with pytest.raises(NumericsError, match="signed PACT needs bits >= 2"):
        PACTActFakeQuant(1, signed=True)


def test_lsq_initializes_step_and_learns():
    torch.manual_seed(4)
    q = LSQActFakeQuant(4)
    x = torch.rand(64, 8, requires_grad=True)
    y = q(x)
    assert q._init and q.initialized.item() == 1
    expected = 2 * x.detach().abs().mean() / 15 ** 0.5
    assert q.step.item() == pytest.approx(expected.item(), rel=1e-6)
    ((y - 0.7) ** 2).sum().backward()
    assert q.step.grad is not None and q.step.grad.item() != 0
    assert x.grad is not None


def test_layer_wrappers_share_parameters_and_keep_class_hierarchy():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    wrapped = wrap_layer(conv, WeightFakeQuant(4, 8))
    assert type(wrapped) is FakeQuantConv2d and isinstance(wrapped, nn.Conv2d)
    assert wrapped.weight is conv.weight and wrapped.bias is conv.bias
    x = torch.randn(1, 3, 6, 6)
    ref = nn.functional.conv2d(x, wrapped.weight_fake_quant(conv.weight), conv.bias, padding=1)
    assert torch.equal(wrapped(x), ref)
    assert set(wrapped.state_dict()) >= {"weight", "bias", "weight_fake_quant.bits",
                                         "weight_fake_quant.scale"}
    assert "weight_fake_quant" not in conv._modules  # the original is untouched
    lin = wrap_layer(nn.Linear(3, 2), WeightFakeQuant(2, 4))
    assert type(lin) is FakeQuantLinear

    class MyConv(nn.Conv2d):  # a subclass without its own forward: dynamic wrapper
        pass

    class StdConv(nn.Conv2d):  # overrides forward: cannot be wrapped
        def forward(self, x):
            return super().forward(x) * 2

    assert issubclass(wrapper_class(MyConv), MyConv)
    assert wrapper_class(StdConv) is None
    with pytest.raises(NumericsError, match="overrides forward"):
        wrap_layer(StdConv(1, 1, 1), WeightFakeQuant(1, 8))


def test_state_dict_round_trip_restores_bits_scales_and_modes():
    torch.manual_seed(5)
    x = torch.randn(4, 6)
    a = AffineActFakeQuant(6, "asymmetric_signed")
    a(x)
    a.enable_observer(False)
    w = WeightFakeQuant(3, [2, 0, 7])
    w(torch.randn(3, 6))
    p = PACTActFakeQuant(5, alpha_init=2.5)
    src = nn.ModuleDict({"a": a, "w": w, "p": p})
    fresh = nn.ModuleDict({"a": AffineActFakeQuant(8, "asymmetric_signed"),
                           "w": WeightFakeQuant(3, 8), "p": PACTActFakeQuant(8)})
    fresh.load_state_dict(src.state_dict())
    assert fresh["a"].num_bits == 6 and not fresh["a"].observing
    assert torch.equal(fresh["a"](x), a(x))
    assert fresh["w"].bits.tolist() == [2, 0, 7] and fresh["w"].per_kernel
    assert torch.equal(fresh["w"].scale, w.scale)
    assert fresh["p"].num_bits == 5 and fresh["p"].alpha.item() == 2.5


def test_whole_model_mode_helpers():
    m = nn.ModuleDict({"a": AffineActFakeQuant(8), "w": WeightFakeQuant(2, 8)})
    assert list(fake_quant_modules(m)) == ["a", "w"]
    set_fake_quant(m, False, weights=False)
    assert not m["a"].fake_quant_on and m["w"].fake_quant_on
    set_observing(m, False)
    assert not m["a"].observing and not m["w"].observing
    assert m["a"].observer_enabled.item() == 0


# ---------------------------------------------------------------------------------------------
# bad bit-widths: typed errors naming the quantizer and the option


@pytest.mark.parametrize("bits, fragment", [
    (33, "bits=33 is outside the valid range 0..32"),
    (-1, "bits=-1 is outside"),
    (4.5, "bits=4.5 is fractional"),
    ([4, 2.5, 8], "fractional"),
    (True, "got a bool"),
    ("eight", "must be an int"),
    ([[4, 4]], "1-D"),
])
def test_bad_weight_bits_are_typed_and_named(bits, fragment):
    with pytest.raises(NumericsError) as info:
        WeightFakeQuant(3, bits, name="layer1.0.conv1")
    assert fragment in str(info.value) and "layer1.0.conv1" in str(info.value)


def test_per_kernel_list_of_wrong_length_names_layer_and_channels():
    with pytest.raises(NumericsError, match=r"'fc'.*2 per-kernel entries.*5 output channels"):
        WeightFakeQuant(5, [4, 4], name="fc")


def test_bad_activation_bits():
    with pytest.raises(NumericsError, match=r"'act.x'.*bits=0 is outside.*weights only"):
        AffineActFakeQuant(0, name="act.x")
    with pytest.raises(NumericsError, match="fractional"):
        PACTActFakeQuant(3.5)
    with pytest.raises(NumericsError, match="single int"):
        LSQActFakeQuant([4, 4])
    q = AffineActFakeQuant(8, name="act.y")
    with pytest.raises(NumericsError, match="act.y.*bits=40"):
        q.set_bits(40)
    assert check_bits(4.0).item() == 4  # integral floats are accepted


def test_bad_scheme_and_rounding():
    with pytest.raises(NumericsError, match="weight scheme 'lsq'"):
        WeightFakeQuant(2, 8, "lsq")
    with pytest.raises(NumericsError, match="rounding 'up'"):
        AffineActFakeQuant(8, rounding="up")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 8), min_size=1, max_size=6), st.integers(0, 2**16))
def test_per_kernel_weight_fq_idempotent_in_range_zero_bits(bits, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(len(bits), 5, generator=g)
    fq = WeightFakeQuant(len(bits), bits)
    out = fq(w)
    fq.enable_observer(False)
    assert torch.equal(fq(out), out)  # quantize o dequantize is idempotent
    for c, b in enumerate(bits):
        if b == 0:
            assert torch.equal(out[c], torch.zeros(5))
        else:
            # full-range symmetric grid: -max lands on -(2^(b-1) - 1/2) and may round outward
            bound = w[c].abs().max() * (1 + 1 / (2 ** b - 1)) * (1 + 1e-6)
            assert out[c].abs().max() <= bound


def test_fast_path_is_bit_identical_to_torch_fused_kernels():
    from qpasses.numerics.fast_fake_quant import fast_fake_quant
    torch.manual_seed(6)
    g = torch.randn(3, 4, 5)
    for zp in (torch.tensor([7]), None):
        x = (torch.randn(3, 4, 5) * 4).requires_grad_()
        ours = fast_fake_quant(x, torch.tensor([0.1]), zp, 0, 15)
        ours.backward(g)
        g_ours, x.grad = x.grad.clone(), None
        ref = torch.fake_quantize_per_tensor_affine(
            x, torch.tensor([0.1]), zp if zp is not None else torch.tensor([0]), 0, 15)
        ref.backward(g)
        assert torch.equal(ours, ref) and torch.equal(g_ours, x.grad)
    for axis in (0, 1):
        w = torch.randn(4, 6, 3, requires_grad=True)
        c = w.shape[axis]
        sc = torch.rand(c) * 0.1 + 0.05
        zp = torch.arange(c, dtype=torch.int32) - 1
        gw = torch.randn(4, 6, 3)
        ours = fast_fake_quant(w, sc, zp, -8, 7, axis=axis)
        ours.backward(gw)
        g_ours, w.grad = w.grad.clone(), None
        ref = torch.fake_quantize_per_channel_affine(w, sc, zp, axis, -8, 7)
        ref.backward(gw)
        assert torch.equal(ours, ref) and torch.equal(g_ours, w.grad), axis
    with torch.no_grad():  # inference path (no mask) gives the same values
        assert torch.equal(fast_fake_quant(w, sc, zp, -8, 7, axis=1), ref)
