"""annotate-bitwidths: uniform/per-kernel annotation, FracBits pinning, config precedence, typed
errors, signedness, scale sharing, skip, idempotence, verify-each, report, no model mutation."""
from __future__ import annotations

import copy
import io
import fnmatch
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import qpasses
from passes_registry import (AnalysisManager, OptionError, PassContext, PassManager, fingerprint,
                             graph_properties, lookup_pass, option_infos, parse_pipeline)
from qpasses import get_qmeta
from qpasses.errors import AnnotationError, ConfigError, ConfigWarning
from qpasses.ir.joins import scale_sharing_groups
from qpasses.passes.annotate_bitwidths import (AnnotateBitwidths, nonnegative_nodes,
                                               resolve_layer_bits)
from qpasses.analyses.properties import check_bits_annotated

# ---------------------------------------------------------------------------------------------
# Models


class TinyCNN(nn.Module):
    """conv -> relu -> depthwise conv -> relu -> grouped conv -> pool -> flatten -> linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gconv = nn.Conv2d(8, 12, 1, groups=4)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = F.relu6(self.dw(x))
        x = self.gconv(x)
        x = F.adaptive_avg_pool2d(torch.sigmoid(x), 1)
        return self.fc(torch.flatten(x, 1))


class Seq(nn.Module):
    """A plain chain: no tensor read twice, no joins (act widths are exactly the resolved ones)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                                      nn.Conv2d(4, 6, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(6, 3)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


SEQ_NAMES = ["features.0", "features.2", "features.4", "classifier"]


class Signs(nn.Module):
    """Signedness and joins: relu -> conv (unsigned), add of conv outputs (signed), cat of
    non-negative tensors (unsigned), functional conv/linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 4, 1)
        self.c4 = nn.Conv2d(4, 4, 1)
        self.c5 = nn.Conv2d(4, 4, 1)
        self.c6 = nn.Conv2d(8, 6, 1)
        self.fw = nn.Parameter(torch.randn(3, 6))

    def forward(self, x):
        a = torch.relu(self.c1(x))
        s = self.c2(a) + self.c3(a)              # add without relu: signed join
        e = self.c4(s)                           # reads the join: signed
        p = F.max_pool2d(torch.relu(e), 2)       # non-negative through max-pool
        f = torch.relu(self.c5(p))
        g = torch.cat([p, f], dim=1)             # cat of non-negative tensors: unsigned join
        h = self.c6(g)
        return F.linear(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1), self.fw)


class Functional(nn.Module):
    """Functional conv1d/conv2d/conv3d/linear with parameter weights."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 2, 3))
        self.w2 = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.w3 = nn.Parameter(torch.randn(2, 1, 1, 1, 1))
        self.lw = nn.Parameter(torch.randn(5, 4))
        self.lb = nn.Parameter(torch.randn(5))

    def forward(self, x1, x2, x3):
        a = F.conv1d(x1, self.w1, groups=2)
        b = torch.conv2d(x2, self.w2)
        c = F.conv3d(x3, self.w3)
        return a.sum() + c.sum() + F.linear(b.mean((2, 3)), self.lw, self.lb).sum()


def trace_tiny():
    return qpasses.trace(TinyCNN(), torch.randn(2, 3, 8, 8))


def trace_seq():
    return qpasses.trace(Seq(), torch.randn(1, 3, 8, 8))


def trace_signs():
    return qpasses.trace(Signs(), torch.randn(1, 3, 8, 8))


@pytest.fixture(scope="module")
def resnet_model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


@pytest.fixture
def resnet(resnet_model):
    return qpasses.trace(resnet_model, torch.randn(1, 3, 32, 32))


def annotate(gm, text="annotate-bitwidths", ctx=None):
    """Run one pipeline through the PassManager (verify-each on)."""
    with ctx or PassContext():
        return PassManager.parse(f"graph({text})").run(gm)


def run_direct(gm, **options):
    return AnnotateBitwidths(**options).run(gm, PassContext(), AnalysisManager())


def by_layer(gm):
    nodes = {n.name: n for n in gm.graph.nodes}
    return {info.name: get_qmeta(nodes[info.node]) for info in qpasses.quantizable_layers(gm)}


def node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def write_config(tmp_path, obj, name="bits.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


# ---------------------------------------------------------------------------------------------
# Uniform annotation and FracBits pinning


def test_registered_with_contract():
    cls = lookup_pass("annotate-bitwidths")
    assert cls is AnnotateBitwidths
    assert cls.establishes == frozenset({"bits-annotated"})
    assert "Resolution order" in cls.__doc__ and "Scale sharing" in cls.__doc__
    infos = option_infos(cls.Options)
    assert {i.key: i.default for i in infos} == {
        "act-bits": 8, "config": None, "first-last-bits": 8, "granularity": "layer", "skip": (),
        "weight-bits": 8}
    assert all(i.help for i in infos)


def test_uniform_tiny_cnn_pins_first_and_last():
    gm = annotate(trace_tiny(), "annotate-bitwidths{weight-bits=4 act-bits=3}")
    q = by_layer(gm)
    assert list(q) == ["conv1", "dw", "gconv", "fc"]
    # first layer: weights and input at 8 (FracBits 1.1.11); the image input is signed
    assert (q["conv1"].weight.bits, q["conv1"].act.bits, q["conv1"].act.signed) == (8, 8, True)
    # last layer: weights at 8, input keeps act-bits
    assert (q["fc"].weight.bits, q["fc"].act.bits) == (8, 3)
    for name in ("dw", "gconv"):
        assert (q[name].weight.bits, q[name].act.bits) == (4, 3)
    for meta in q.values():
        assert meta.weight.signed and meta.weight.scheme == "symmetric"
        assert meta.weight.bits_per_kernel is None and meta.weight.axis is None
        assert meta.origin == ("annotate-bitwidths",)
    # relu -> dw, relu6 -> gconv, sigmoid -> pool -> flatten -> fc: unsigned inputs
    for name in ("dw", "gconv", "fc"):
        assert not q[name].act.signed and q[name].act.scheme == "unsigned"
    assert check_bits_annotated(gm) == []
    assert "bits-annotated" in graph_properties(gm)


def test_first_last_bits_none_disables_pinning():
    q = by_layer(annotate(trace_tiny(),
                          "annotate-bitwidths{weight-bits=4 act-bits=3 first-last-bits=none}"))
    assert {(m.w_bits, m.a_bits) for m in q.values()} == {(4, 3)}


def test_resnet18_every_layer_annotated_first_last_pinned(resnet):
    pm = PassManager.parse("graph(annotate-bitwidths{weight-bits=3 act-bits=5 "
                           "first-last-bits=7})")
    gm = pm.run(resnet)
    q = by_layer(gm)
    assert len(q) == 21
    assert all(m.weight is not None and m.act is not None for m in q.values())
    assert (q["conv1"].w_bits, q["conv1"].a_bits) == (7, 7)
    assert (q["fc"].w_bits, q["fc"].a_bits) == (7, 5)
    inner = {k: (m.w_bits, m.a_bits) for k, m in q.items() if k not in ("conv1", "fc")}
    assert set(inner.values()) == {(3, 5)}
    assert not q["fc"].act.signed           # flatten(avgpool(relu))
    assert not q["layer1.0.conv2"].act.signed  # relu(bn1)
    assert q["conv1"].act.signed             # the image
    # every add join carries the shared output spec
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "add"]
    assert len(adds) == 8 and all(get_qmeta(a).output is not None for a in adds)


def test_stats(resnet):
    res = run_direct(resnet, weight_bits=4, act_bits=4, granularity="kernel",
                     skip=("layer4.1.*",))
    assert res.modified
    assert res.stats["num_layers"] == 19
    assert res.stats["num_skipped"] == 2
    assert res.stats["num_per_kernel"] == 19
    assert res.stats["num_pinned"] == 2
    assert res.stats["num_joins"] == 8
    assert res.stats["num_act_conflicts_resolved"] == 0
    assert res.stats["num_share_groups"] >= 8


# ---------------------------------------------------------------------------------------------
# Kernel granularity and per-kernel config lists


def test_kernel_granularity_vectors_have_out_channels_entries(resnet):
    gm = annotate(resnet, "annotate-bitwidths{weight-bits=4 granularity=kernel}")
    infos = {i.name: i for i in qpasses.quantizable_layers(gm)}
    for name, meta in by_layer(gm).items():
        w = meta.weight
        assert w.bits_per_kernel is not None and w.axis == 0
        assert len(w.bits_per_kernel) == infos[name].out_channels
        expected = 8 if name in ("conv1", "fc") else 4
        assert set(w.bits_per_kernel) == {expected} and w.bits == expected
        assert meta.act.bits_per_kernel is None  # activations stay per tensor


def test_kernel_granularity_depthwise_and_grouped():
    gm = annotate(trace_tiny(), "annotate-bitwidths{granularity=kernel weight-bits=2}")
    q = by_layer(gm)
    assert len(q["dw"].weight.bits_per_kernel) == 8
    assert len(q["gconv"].weight.bits_per_kernel) == 12
    assert len(q["fc"].weight.bits_per_kernel) == 5


def test_config_per_kernel_list_with_zero_bits(tmp_path):
    bits = [4, 0, 2, 3, 0, 4, 1, 2]
    path = write_config(tmp_path, {"dw": {"weight_bits": bits}})
    gm = annotate(trace_tiny(), f"annotate-bitwidths{{config={path}}}")
    w = by_layer(gm)["dw"].weight
    assert w.bits_per_kernel == tuple(bits) and w.bits == 4 and w.axis == 0
    row = next(r for r in qpasses.report(gm)["layers"] if r["name"] == "dw")
    assert row["w_bits_per_kernel"] == bits and row["w_bits"] == 4


def test_per_kernel_list_length_mismatch_names_layer_and_length(tmp_path):
    path = write_config(tmp_path, {"layer1.*": {"weight_bits": [4] * 63}})
    with pytest.raises(ConfigError) as info:
        run_direct(qpasses.trace(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32)),
                   config=path)
    msg = str(info.value)
    assert path in msg and "'layer1.*'" in msg and "'layer1.0.conv1'" in msg
    assert "63 entries" in msg and "64 output channels" in msg and "length 64" in msg


# ---------------------------------------------------------------------------------------------
# Config precedence


def test_config_later_globs_override_earlier(resnet, tmp_path):
    path = write_config(tmp_path, {"layer1.*.conv1": {"weight_bits": 3},
                                   "layer1.0.conv1": {"weight_bits": 5},
                                   "fc": {"weight_bits": 4, "act_bits": 6},
                                   "conv1": {"act_bits": 2}})
    q = by_layer(annotate(copy.deepcopy(resnet), f"annotate-bitwidths{{config={path}}}"))
    assert q["layer1.0.conv1"].w_bits == 5       # the later, more specific entry wins
    assert q["layer1.1.conv1"].w_bits == 3
    assert (q["fc"].w_bits, q["fc"].a_bits) == (4, 6)       # config beats first/last pinning
    assert (q["conv1"].w_bits, q["conv1"].a_bits) == (8, 2)  # keys resolve independently
    assert q["layer1.0.conv2"].w_bits == 8                   # untouched: default
    # reversed order: the general glob now comes last and wins (unlike Distiller, reference
    # 6.1.8, where the first matching pattern wins)
    path2 = write_config(tmp_path, {"layer1.0.conv1": {"weight_bits": 5},
                                    "layer1.*.conv1": {"weight_bits": 3}}, "rev.json")
    q = by_layer(annotate(resnet, f"annotate-bitwidths{{config={path2}}}"))
    assert q["layer1.0.conv1"].w_bits == 3


GLOB_POOL = ["*", "features.*", "features.0", "features.[24]", "classifier", "*.4", "f*",
             "*[0-9]", "features.?"]
_entry = st.fixed_dictionaries({}, optional={"weight_bits": st.integers(1, 8),
                                              "act_bits": st.integers(1, 8)})


def reference_bits(name, entries, weight_bits, act_bits, fl):
    """Brute force: for each key, the LAST matching entry that sets it, else the pinning rule,
    else the default."""
    first, last = name == SEQ_NAMES[0], name == SEQ_NAMES[-1]
    out = []
    for key, default, pinned in (("weight_bits", weight_bits, fl is not None and (first or last)),
                                 ("act_bits", act_bits, fl is not None and first)):
        hits = [e[key] for g, e in entries if fnmatch.fnmatchcase(name, g) and key in e]
        out.append(hits[-1] if hits else (fl if pinned else default))
    return tuple(out)


@pytest.fixture(scope="module")
def seq_gm():
    return trace_seq()


@pytest.fixture(scope="module")
def cfg_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cfg")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(globs=st.lists(st.sampled_from(GLOB_POOL), unique=True, max_size=6),
       data=st.data(), weight_bits=st.integers(1, 8), act_bits=st.integers(1, 8),
       fl=st.sampled_from([None, 8, 6]))
def test_config_precedence_matches_brute_force(seq_gm, cfg_dir, globs, data, weight_bits,
                                               act_bits, fl):
    entries = [(g, data.draw(_entry)) for g in globs]
    path = cfg_dir / "p.json"
    path.write_text(json.dumps(dict(entries)))  # dict keeps the drawn order
    run_direct(seq_gm, weight_bits=weight_bits, act_bits=act_bits, first_last_bits=fl,
               config=str(path))
    got = {k: (m.w_bits, m.a_bits) for k, m in by_layer(seq_gm).items()}
    want = {n: reference_bits(n, entries, weight_bits, act_bits, fl) for n in SEQ_NAMES}
    assert got == want
    # the pure resolver agrees too
    from qpasses.passes.annotate_bitwidths import ConfigEntry
    res = resolve_layer_bits(SEQ_NAMES, weight_bits=weight_bits, act_bits=act_bits,
                             first_last_bits=fl, first={SEQ_NAMES[0]}, last={SEQ_NAMES[-1]},
                             entries=[ConfigEntry(g, e.get("weight_bits"), e.get("act_bits"))
                                      for g, e in entries])
    assert {n: (b.weight, b.act) for n, b in res.items()} == want


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_glob_warns_with_closest_layer_names(resnet, tmp_path):
    path = write_config(tmp_path, {"layer1.0.conv1": {"weight_bits": 4},
                                   "layer1.0.cnv2": {"weight_bits": 4}})
    with pytest.warns(ConfigWarning) as record:
        gm = annotate(resnet, f"annotate-bitwidths{{config={path}}}")
    msg = next(str(w.message) for w in record if issubclass(w.category, ConfigWarning))
    assert "glob 'layer1.0.cnv2' matches no layer" in msg and path in msg
    assert "'layer1.0.conv2'" in msg
    closest = msg.split("closest layer names: ")[1].split(" (")[0]
    assert closest.count("'") == 10  # five names
    assert msg.startswith("annotate-bitwidths: ")
    # the entries that did match still apply
    node = next(n for n in gm.graph.nodes if n.target == "layer1.0.conv1")
    assert get_qmeta(node).w_bits == 4


@pytest.mark.parametrize("content, fragment", [
    ("{", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ("3", "got a JSON number"),
    ('{"fc": 4}', "entry 'fc' must be an object"),
    ('{"fc": {"weight_bit": 4}}', "unknown key 'weight_bit' (did you mean 'weight_bits'?)"),
    ('{"fc": {"weight_bits": "4"}}', "\"weight_bits\" must be an int in 1..32"),
    ('{"fc": {"weight_bits": 4.5}}', "got 4.5"),
    ('{"fc": {"weight_bits": 0}}', "\"weight_bits\" must be an int in 1..32"),
    ('{"fc": {"weight_bits": true}}', "got true"),
    ('{"fc": {"act_bits": 33}}', "\"act_bits\" must be an int in 1..32"),
    ('{"fc": {"act_bits": 0}}', "\"act_bits\" must be an int in 1..32"),
    ('{"fc": {"act_bits": [4]}}', "\"act_bits\" must be an int"),
    ('{"fc": {"weight_bits": []}}', "per-kernel list"),
    ('{"fc": {"weight_bits": [4, 33, 2, 1, 1]}}', "\"weight_bits\"[1] is 33"),
    ('{"fc": {"weight_bits": [4, -1, 2, 1, 1]}}', "\"weight_bits\"[1] is -1"),
    ('{"fc": {"weight_bits": 4}, "fc": {"act_bits": 4}}', "glob 'fc' appears twice"),
    ('{"": {"weight_bits": 4}}', "empty layer-name glob"),
])
def test_config_errors_are_typed_and_name_file_and_entry(tmp_path, content, fragment):
    path = write_config(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        run_direct(trace_tiny(), config=path)
    assert fragment in str(info.value)
    assert path in str(info.value)


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="no such file"):
        run_direct(trace_tiny(), config=missing)


@pytest.mark.parametrize("text, option", [
    ("weight-bits=0", "weight-bits"), ("weight-bits=33", "weight-bits"),
    ("act-bits=0", "act-bits"), ("act-bits=-2", "act-bits"),
    ("first-last-bits=0", "first-last-bits"), ("granularity=channel", "granularity"),
    ("weight-bits=4.5", "weight-bits"),
])
def test_option_errors(text, option):
    with pytest.raises(OptionError) as info:
        PassManager.parse(f"graph(annotate-bitwidths{{{text}}})")
    assert info.value.option == option and info.value.pass_name == "annotate-bitwidths"
    with pytest.raises(OptionError):
        AnnotateBitwidths(**{option.replace("-", "_"): 0 if "bits" in option else "channel"})


def test_skip_glob_matching_nothing_is_an_option_error():
    with pytest.raises(OptionError) as info:
        run_direct(trace_tiny(), skip=("conv9",))
    assert info.value.option == "skip" and "'conv1'" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Signedness


def test_unsigned_after_relu_signed_after_add_without_relu():
    gm = annotate(trace_signs(), "annotate-bitwidths{first-last-bits=none act-bits=4}")
    q = by_layer(gm)
    assert q["c1"].act.signed                      # network input
    assert not q["c2"].act.signed and not q["c3"].act.signed   # relu output
    assert q["c4"].act.signed                      # add of two conv outputs, no relu
    assert not q["c5"].act.signed                  # max-pool of relu
    assert not q["c6"].act.signed                  # cat of non-negative tensors
    assert q["fw"].act.signed                      # linear after avgpool of a conv: signed
    add = node(gm, "add")
    cat = node(gm, "cat")
    assert get_qmeta(add).output == q["c4"].act and get_qmeta(add).output.signed
    assert get_qmeta(cat).output == q["c6"].act and not get_qmeta(cat).output.signed


class _Ops(nn.Module):
    def forward(self, x):
        r = torch.relu(x)
        return (F.hardtanh(x, 0.0, 6.0), F.hardtanh(x), torch.clamp(x, min=0),
                torch.clamp(x, max=1), r.view(-1), r + r, r + 1, r - 1, torch.add(r, r, alpha=-1), r * 2,
                torch.cat([r, x]), torch.cat([r, r], dim=-1), F.interpolate(r, scale_factor=2.0),
                F.interpolate(r, scale_factor=2.0, mode="bicubic"), r.clamp(min=0.5),
                torch.sigmoid(x) - 0.5, F.max_pool2d(r, 2)[:, :1], x.relu().mean(1),
                F.pad(r, (1, 1)), F.pad(r, (1, 1), value=-1.0), torch.min(r, x), torch.max(r, x),
                torch.min(r, 1)[0], r.min(x))


def test_nonnegative_nodes_rules_and_soundness():
    gm = qpasses.trace(_Ops(), torch.randn(1, 2, 4, 4))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    nonneg = nonnegative_nodes(gm)
    claimed = [o.name in nonneg for o in out]
    assert claimed == [True, False, True, False, True, True, True, False, False, True, False, True,
                       True, False, True, False, True, True, True, False, False, True, True,
                       False]
    # soundness on data: everything claimed non-negative is
    vals = {}
    interp = torch.fx.Interpreter(gm)
    orig = interp.run_node

    def record(n):
        v = orig(n)
        vals[n.name] = v
        return v
    interp.run_node = record
    interp.run(torch.randn(3, 2, 4, 4) * 5)
    for name in nonneg:
        v = vals[name]
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            assert v.min() >= 0, name


def test_nonneg_claims_hold_on_resnet_data(resnet):
    nonneg = nonnegative_nodes(resnet)
    assert {"relu", "maxpool", "avgpool", "flatten"} <= nonneg
    assert not {"x", "add", "layer1_0_bn2", "conv1"} & nonneg
    interp = torch.fx.Interpreter(resnet)
    orig, bad = interp.run_node, []

    def record(n):
        v = orig(n)
        if n.name in nonneg and isinstance(v, torch.Tensor) and v.min() < 0:
            bad.append(n.name)
        return v
    interp.run_node = record
    interp.run(torch.randn(2, 3, 32, 32))
    assert bad == []


# ---------------------------------------------------------------------------------------------
# Scale sharing


def test_layers_reading_one_tensor_share_act_spec(resnet, tmp_path):
    # downsample and conv1 of layer2.0 read the same tensor; give them different act bits
    path = write_config(tmp_path, {"layer2.0.conv1": {"act_bits": 3},
                                   "layer2.0.downsample.0": {"act_bits": 6}})
    gm = copy.deepcopy(resnet)
    with pytest.warns(UserWarning, match=r"'layer2.0.conv1' \(3 -> 6\)"):
        res = run_direct(gm, act_bits=4, config=path)
    q = by_layer(gm)
    assert q["layer2.0.conv1"].act == q["layer2.0.downsample.0"].act
    assert q["layer2.0.conv1"].a_bits == 6
    # two groups disagree: {layer1_1_relu_1} (3 vs 6) and add_1's group, whose consumers
    # (the two layer2.0 layers, through relu) now demand 6 while layer1.1.conv1 demands 4
    assert res.stats["num_act_conflicts_resolved"] == 2
    assert q["layer1.1.conv1"].a_bits == 6
    assert ("layer1_1_relu_1",) in scale_sharing_groups(gm)
    # same setting without a conflict: no warning, no conflict
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "annotate-bitwidths: .* BatchNorm")   # unfolded BN
        res = run_direct(copy.deepcopy(resnet), act_bits=4)
    assert res.stats["num_act_conflicts_resolved"] == 0


def test_add_join_inputs_and_output_share_one_spec(resnet):
    gm = annotate(resnet, "annotate-bitwidths{act-bits=4}")
    q = by_layer(gm)
    groups = scale_sharing_groups(gm)
    # block layer1.1: input layer1_0_relu_1 is read by layer1.1.conv1 and is the identity of add_1
    assert ("layer1_0_relu_1", "layer1_1_bn2", "add_1") in groups
    spec = get_qmeta(node(gm, "add_1")).output
    assert spec == q["layer1.1.conv1"].act
    # the identity is post-relu but joins a signed residual add: one (signed) spec for all
    assert spec.signed and spec.bits == 4
    # layer1.0: the max-pool output is read by conv1 and is the identity of the first add
    assert get_qmeta(node(gm, "add")).output == q["layer1.0.conv1"].act
    # every group: all layers reading a member and all joins in it carry one identical spec
    nodes = {n.name: n for n in gm.graph.nodes}
    readers = {}
    for info in qpasses.quantizable_layers(gm):
        readers.setdefault(nodes[info.node].args[0].name, []).append(q[info.name].act)
    for g in groups:
        specs = {s for m in g for s in readers.get(m, [])}
        specs |= {get_qmeta(nodes[m]).output for m in g if get_qmeta(nodes[m]).output}
        assert len(specs) == 1, g


def test_join_takes_max_of_involved_widths(resnet, tmp_path):
    # layer2.0.conv1 consumes add_1 (through relu): the add's group {layer1_0_relu_1,
    # layer1_1_bn2, add_1} is raised to 6, so layer1.1.conv1 (reading layer1_0_relu_1) is too
    path = write_config(tmp_path, {"layer2.0.*": {"act_bits": 6}})
    gm = resnet
    res = run_direct(gm, act_bits=4, config=path)
    q = by_layer(gm)
    assert get_qmeta(node(gm, "add_1")).output.bits == 6
    assert q["layer1.1.conv1"].a_bits == 6
    assert q["layer1.0.conv1"].a_bits == 4 and get_qmeta(node(gm, "add")).output.bits == 4
    assert res.stats["num_act_conflicts_resolved"] >= 1


def test_cat_join_group():
    gm = annotate(trace_signs(), "annotate-bitwidths{act-bits=4}")
    groups = scale_sharing_groups(gm)
    assert ("max_pool2d", "relu_2", "cat") in groups
    assert ("relu", ) in groups  # read by c2 and c3 only
    q = by_layer(gm)
    assert q["c2"].act == q["c3"].act and q["c5"].act == q["c6"].act


# ---------------------------------------------------------------------------------------------
# Skip, idempotence, verify-each, report, functional forms, model not mutated


def test_skip_leaves_float_islands_and_can_be_undone(resnet):
    gm = annotate(resnet, "annotate-bitwidths{skip={layer1.*,fc}}")
    q = by_layer(gm)
    for name in ("layer1.0.conv1", "layer1.1.conv2", "fc"):
        assert q[name].weight is None and q[name].act is None
        assert q[name].float_island.startswith("skipped by annotate-bitwidths{skip=")
    assert q["layer1.0.conv1"].float_island == "skipped by annotate-bitwidths{skip=layer1.*}"
    assert q["layer2.0.conv1"].w_bits == 8
    assert check_bits_annotated(gm) == []
    rows = {r["name"]: r for r in qpasses.report(gm)["layers"]}
    assert rows["fc"]["w_bits"] is None and rows["fc"]["a_bits"] is None
    annotate(gm, "annotate-bitwidths")
    q = by_layer(gm)
    assert q["fc"].float_island is None and q["fc"].w_bits == 8


@pytest.mark.filterwarnings("ignore:annotate-bitwidths. config act_bits raised")
def test_idempotent_second_run_reports_unmodified(resnet, tmp_path):
    path = write_config(tmp_path, {"layer3.*": {"weight_bits": 2, "act_bits": 3}})
    opts = dict(weight_bits=4, act_bits=5, granularity="kernel", config=path, skip=("fc",))
    assert run_direct(resnet, **opts).modified
    before = fingerprint(resnet)
    second = run_direct(resnet, **opts)
    assert not second.modified and fingerprint(resnet) == before
    # through the manager with verify-each (which checks the modified claim against fingerprints)
    annotate(resnet, f"annotate-bitwidths{{weight-bits=4 act-bits=5 granularity=kernel "
                     f"config={path} skip=fc}}")
    assert run_direct(resnet, **{**opts, "act_bits": 6}).modified


def test_verify_each_and_preserved_structure_and_weights(resnet):
    import tests.fake_passes  # noqa: F401  (registers test-infra-node-count)
    before = fingerprint(resnet)
    ctx = PassContext(verify_each=True, check_preservation=True, print_stream=io.StringIO())
    # the structure-only analysis cached before the pass is kept and re-checked after it
    gm = annotate(resnet, "print<test-infra-node-count>,annotate-bitwidths{weight-bits=2},"
                          "print<test-infra-node-count>", ctx)
    after = fingerprint(gm)
    assert after["structure"] == before["structure"] and after["weights"] == before["weights"]
    assert after["annotations"] != before["annotations"]


def test_pipeline_text_round_trips():
    text = ("graph(annotate-bitwidths{act-bits=4 config=\"my dir/bits.json\" first-last-bits=none "
            "granularity=kernel skip={layer1.*,fc} weight-bits=3})")
    p = parse_pipeline(text)
    assert parse_pipeline(p.to_text()) == p
    assert p.to_text() == text


def test_report_shows_bits(tmp_path):
    path = write_config(tmp_path, {"gconv": {"weight_bits": [2] * 6 + [3] * 6}})
    gm = annotate(trace_tiny(), f"annotate-bitwidths{{weight-bits=4 act-bits=5 config={path}}}")
    rows = {r["name"]: r for r in qpasses.report(gm)["layers"]}
    assert (rows["conv1"]["w_bits"], rows["conv1"]["a_bits"]) == (8, 8)
    assert (rows["dw"]["w_bits"], rows["dw"]["a_bits"], rows["dw"]["w_bits_per_kernel"]) == \
        (4, 5, None)
    assert rows["gconv"]["w_bits_per_kernel"] == [2] * 6 + [3] * 6 and rows["gconv"]["w_bits"] == 3
    assert (rows["fc"]["w_bits"], rows["fc"]["a_bits"]) == (8, 5)
    table = qpasses.format_table(qpasses.report(gm))
    assert "2-3 (avg 2.50)" in table


def test_functional_layers_annotated():
    gm = qpasses.trace(Functional(), (torch.randn(1, 4, 7), torch.randn(1, 3, 5, 5),
                                      torch.randn(1, 1, 2, 2, 2)))
    gm = annotate(gm, "annotate-bitwidths{weight-bits=3 act-bits=3 first-last-bits=none "
                      "granularity=kernel}")
    q = by_layer(gm)
    assert set(q) == {"w1", "w2", "w3", "lw"}
    assert len(q["w1"].weight.bits_per_kernel) == 6 and len(q["lw"].weight.bits_per_kernel) == 5
    assert all(m.w_bits == 3 and m.a_bits == 3 for m in q.values())


def test_users_model_is_never_mutated():
    model = TinyCNN()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gm = qpasses.trace(model, torch.randn(1, 3, 8, 8))
    annotate(gm, "annotate-bitwidths{weight-bits=2 granularity=kernel}")
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert model.training  # trace works on an eval-mode copy
    x = torch.randn(1, 3, 8, 8)
    assert torch.allclose(gm(x), model.eval()(x))
