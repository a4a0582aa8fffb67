"""fold-batch-norm: numerics (property test), structure, functional forms, refusals."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qpasses
from passes_registry import PassFailure
from qpasses.passes.fold_batch_norm import analyze, check_bn_folded, fold_weights

from .pipeline_helpers import run_with_stats

BN = nn.modules.batchnorm._BatchNorm


def run(gm, text="graph(fold-batch-norm)"):
    return run_with_stats(gm, text)


def randomize_bn(bn: BN, g: torch.Generator) -> None:
    with torch.no_grad():
        if bn.track_running_stats:
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 2 + 0.05)
        if bn.affine:
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))


def n_bn_nodes(gm) -> int:
    return sum(1 for n in gm.graph.nodes
               if (n.op == "call_module" and isinstance(gm.get_submodule(n.target), BN))
               or n.target in (F.batch_norm, torch.batch_norm))


# --------------------------------------------------------------------------------------------
# Property: fold equivalence over random layers and statistics

LAYERS = {
    "conv1d": (nn.Conv1d, nn.BatchNorm1d, 1), "conv2d": (nn.Conv2d, nn.BatchNorm2d, 2),
    "conv3d": (nn.Conv3d, nn.BatchNorm3d, 3),
    "convt1d": (nn.ConvTranspose1d, nn.BatchNorm1d, 1),
    "convt2d": (nn.ConvTranspose2d, nn.BatchNorm2d, 2),
    "convt3d": (nn.ConvTranspose3d, nn.BatchNorm3d, 3),
    "linear": (nn.Linear, nn.BatchNorm1d, 0),
}


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(sorted(LAYERS)), groups=st.sampled_from([1, 2, 3]),
       cin_per_group=st.integers(1, 3), cout_per_group=st.integers(1, 3),
       kernel=st.integers(1, 3), bias=st.booleans(), affine=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-3, 0.1]), seed=st.integers(0, 2**16))
def test_fold_is_equivalent(kind, groups, cin_per_group, cout_per_group, kernel, bias, affine,
                            eps, seed):
    layer_cls, bn_cls, nd = LAYERS[kind]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if nd == 0:
        cin, cout = cin_per_group * groups, cout_per_group * groups
        layer = layer_cls(cin, cout, bias=bias)
        x = torch.randn(4, cin, generator=g)
    else:
        cin, cout = cin_per_group * groups, cout_per_group * groups
        layer = layer_cls(cin, cout, kernel, groups=groups, bias=bias, padding=kernel // 2)
        x = torch.randn(2, cin, *([5] * nd), generator=g)
    bn = bn_cls(cout, eps=eps, affine=affine)
    randomize_bn(bn, g)
    model = nn.Sequential(layer, bn).eval()
    with torch.no_grad():
        ref = model(x)
    gm, stats = run(qpasses.trace(model, x))
    assert stats["num_folded"] == 1 and stats["num_unfolded"] == 0
    assert n_bn_nodes(gm) == 0
    assert gm.get_submodule("0").bias is not None
    with torch.no_grad():
        out = gm(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))


def test_fold_weights_float64_and_dtype():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=g).to(torch.bfloat16)
    mean, var = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5
    gamma, beta = torch.randn(4, generator=g), torch.randn(4, generator=g)
    w2, b2 = fold_weights(w, None, mean, var, gamma, beta, 1e-5)
    assert w2.dtype == torch.bfloat16 and b2.dtype == torch.bfloat16
    s = gamma.double() / (var.double() + 1e-5).sqrt()
    torch.testing.assert_close(w2, (w.double() * s.view(4, 1, 1, 1)).to(torch.bfloat16))
    torch.testing.assert_close(b2, (beta.double() - mean.double() * s).to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape", [(5, 3, 3, 3), (7, 4), (2, 1, 5), (300, 1, 3, 3)])
def test_fold_weights_rounds_once_from_the_float64_product(dtype, shape):
    """W' = the float64 product w·s rounded once into the weight's dtype, bit for bit, on every
    path (numpy's mixed-type loop for float32/float64, the blocked torch loop otherwise)."""
    g = torch.Generator().manual_seed(sum(shape))
    w = (torch.randn(*shape, generator=g) * 3).to(dtype)
    c = shape[0]
    mean, var = torch.randn(c, generator=g), torch.rand(c, generator=g) * 4 + 1e-3
    gamma, beta = torch.randn(c, generator=g), torch.randn(c, generator=g)
    w2, _ = fold_weights(w, None, mean, var, gamma, beta, 1e-5)
    s = torch.rsqrt(var.double() + 1e-5) * gamma.double()
    want = (w.double() * s.view(-1, *([1] * (w.dim() - 1)))).to(dtype)
    assert w2.dtype == dtype and torch.equal(w2, want)


# --------------------------------------------------------------------------------------------
# Structure


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        self.bn1d = nn.BatchNorm1d(5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.bn1d(self.fc(y.mean((2, 3))))


def _model(cls=ConvBnRelu, seed=0):
    torch.manual_seed(seed)
    m = cls()
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, BN):
            randomize_bn(mod, g)
    return m.eval()


def test_structure_bias_created_and_bn_modules_gone():
    m = _model()
    x = torch.randn(2, 3, 8, 8)
    gm, stats = run(qpasses.trace(m, x))
    assert stats == {"num_folded": 2, "num_unfolded": 0, "num_bias_created": 1}
    assert n_bn_nodes(gm) == 0
    assert isinstance(gm.conv.bias, nn.Parameter) and gm.conv.bias.shape == (8,)
    assert not hasattr(gm, "bn") and not hasattr(gm, "bn1d")
    assert check_bn_folded(gm) == []
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-5)


def test_user_model_not_mutated():
    m = _model()
    params = {k: v for k, v in m.state_dict(keep_vars=True).items()}
    values = {k: v.detach().clone() for k, v in params.items()}
    x = torch.randn(2, 3, 8, 8)
    run(qpasses.trace(m, x))
    after = m.state_dict(keep_vars=True)
    assert set(after) == set(params)
    for k in params:
        assert after[k] is params[k] and torch.equal(after[k], values[k])
    assert m.conv.bias is None and isinstance(m.bn, nn.BatchNorm2d)


@pytest.mark.parametrize("layer", [nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(3, 4, 3, groups=1),
                                   nn.Linear(3, 4)], ids=["conv", "convt", "linear"])
def test_float64_model_not_mutated(layer):
    # .to(float64) of a float64 weight is no copy: the fold must still not write into it
    bn = nn.BatchNorm2d(4) if not isinstance(layer, nn.Linear) else nn.BatchNorm1d(4)
    randomize_bn(bn, torch.Generator().manual_seed(3))
    m = nn.Sequential(layer, bn).double().eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64) if not isinstance(layer, nn.Linear) \
        else torch.randn(2, 3, dtype=torch.float64)
    gm = qpasses.trace(m, x)
    old_weight = gm.get_submodule("0").weight       # the pass must not write into it
    old_value = old_weight.detach().clone()
    gm, stats = run(gm)
    assert stats["num_folded"] == 1
    assert gm.get_submodule("0").weight is not old_weight
    assert torch.equal(old_weight, old_value)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x))


def test_checker_reports_foldable_bn():
    gm = qpasses.trace(_model(), torch.randn(1, 3, 8, 8))
    problems = check_bn_folded(gm)
    assert len(problems) == 2 and "'bn'" in problems[0] and "'conv'" in problems[0]


def test_no_bn_is_unmodified():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    gm, stats = run(qpasses.trace(m, torch.randn(1, 3, 8, 8)))
    assert stats == {"num_folded": 0, "num_unfolded": 0, "num_bias_created": 0}


# --------------------------------------------------------------------------------------------
# Functional forms


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3, generator=g) * 0.3)
        self.fc_weight = nn.Parameter(torch.randn(4, 6, generator=g) * 0.3)
        self.fc_bias = nn.Parameter(torch.randn(4, generator=g))
        for name, n in (("a", 6), ("b", 4)):
            self.register_buffer(f"{name}_mean", torch.randn(n, generator=g))
            self.register_buffer(f"{name}_var", torch.rand(n, generator=g) + 0.5)
            setattr(self, f"{name}_gamma", nn.Parameter(torch.randn(n, generator=g)))
            setattr(self, f"{name}_beta", nn.Parameter(torch.randn(n, generator=g)))

    def forward(self, x):
        y = F.conv2d(x, self.w, None, 1, 1)
        y = F.batch_norm(y, self.a_mean, self.a_var, self.a_gamma, self.a_beta, False, 0.1, 1e-3)
        y = F.relu(y).mean((2, 3))
        y = F.linear(y, self.fc_weight, self.fc_bias)
        return torch.batch_norm(y, self.b_gamma, self.b_beta, self.b_mean, self.b_var, False,
                                0.1, 1e-5, False)


def test_functional_forms():
    m = Functional().eval()
    x = torch.randn(2, 3, 8, 8)
    gm, stats = run(qpasses.trace(m, x))
    assert stats["num_folded"] == 2 and stats["num_bias_created"] == 1
    assert n_bn_nodes(gm) == 0
    conv = next(n for n in gm.graph.nodes if n.target is F.conv2d)
    assert conv.args[2] is not None and conv.args[2].op == "get_attr"
    assert conv.args[2].meta["tensor_meta"].shape == (6,)
    assert isinstance(gm.get_parameter(conv.args[2].target), nn.Parameter)
    # the BN statistics are no longer read
    assert not any(n.op == "get_attr" and "mean" in str(n.target) for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-5)
    # the user's functional weights are untouched
    assert m.w.grad is None and torch.equal(m.w, Functional().w)


# --------------------------------------------------------------------------------------------
# Training mode


def test_training_mode_bn_is_refused():
    gm = qpasses.trace(_model(), torch.randn(2, 3, 8, 8))
    gm.bn.train()
    with pytest.raises(PassFailure) as e:
        run(gm)
    err = e.value
    assert err.node == "bn" and err.pass_name == "fold-batch-norm"
    assert "training mode" in str(err) and "use-running-stats" in str(err) and "'bn'" in str(err)


def test_use_running_stats_folds_training_bn():
    m = _model()
    x = torch.randn(2, 3, 8, 8)
    gm = qpasses.trace(m, x)
    gm.train()
    gm, stats = run(gm, "graph(fold-batch-norm{use-running-stats=true})")
    assert stats["num_folded"] == 2
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-5)


def test_training_mode_unfoldable_bn_is_not_an_error():
    m = nn.Sequential(nn.BatchNorm2d(3)).eval()
    gm = qpasses.trace(m, torch.randn(2, 3, 4, 4))
    gm.train()
    gm, stats = run(gm)
    assert stats == {"num_folded": 0, "num_unfolded": 1, "num_bias_created": 0}


# --------------------------------------------------------------------------------------------
# BatchNorms that must stay


class Unfoldable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)                 # standalone, on the input
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn_add = nn.BatchNorm2d(3)                # after an add
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn_two = nn.BatchNorm2d(3)                # conv2's output has another user
        self.shared = nn.Conv2d(3, 3, 1)
        self.bn_shared = nn.BatchNorm2d(3)             # conv module called twice
        self.fc = nn.Linear(4, 4)
        self.bn_seq = nn.BatchNorm1d(3)                # Linear on (N, 3, 4): BN sees dim 1 = 3
        self.bn_batch = nn.BatchNorm2d(3, track_running_stats=False)  # batch statistics

    def forward(self, x):
        y = self.bn_in(x)
        y = self.bn_add(self.conv(y) + x)
        z = self.conv2(y)
        y = self.bn_two(z) + z
        y = self.bn_shared(self.shared(y)) + self.shared(x)
        s = self.bn_seq(self.fc(y.flatten(2)))
        return s, self.bn_batch(self.conv(x))


def test_unfoldable_bns_stay_and_are_counted():
    m = _model(Unfoldable)
    x = torch.randn(2, 3, 2, 2)
    gm = qpasses.trace(m, x)
    candidates, reasons = analyze(gm)
    assert candidates == []
    assert set(reasons) == {"bn_in", "bn_add", "bn_two", "bn_shared", "bn_seq", "bn_batch"}
    assert "other users" in reasons["bn_two"] and "shared" in reasons["bn_shared"]
    assert "track_running_stats" in reasons["bn_batch"]
    assert "not a convolution or linear" in reasons["bn_add"]
    gm, stats = run(gm)
    assert stats == {"num_folded": 0, "num_unfolded": 6, "num_bias_created": 0}
    assert n_bn_nodes(gm) == 6
    with torch.no_grad():
        for a, b in zip(gm(x), m(x)):
            torch.testing.assert_close(a, b)


def test_subclass_with_custom_forward_is_not_folded():
    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True))
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    torch.manual_seed(0)
    m = nn.Sequential(StdConv(3, 4, 3), nn.BatchNorm2d(4)).eval()
    gm = qpasses.trace(m, torch.randn(1, 3, 6, 6), leaf_modules=[StdConv])
    _, stats = run(gm)
    assert stats["num_folded"] == 0 and stats["num_unfolded"] == 1


def test_copy_of_traced_graph_is_independent():
    m = _model()
    x = torch.randn(2, 3, 8, 8)
    gm = qpasses.trace(m, x)
    keep = copy.deepcopy(gm)
    run(gm)
    assert n_bn_nodes(keep) == 2
    with torch.no_grad():
        torch.testing.assert_close(keep(x), m(x))
