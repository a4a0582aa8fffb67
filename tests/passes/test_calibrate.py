"""calibrate and ptq-int8: every clip method, batch forms, frozen scales in quantizers and QMeta,
the calibrated property, typed errors (no data, NaN/inf, empty, bad batches, unobserved
quantizer, calibrate before insert)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qpasses
from passes_registry import PassContext, PassManager, PropertyError, graph_properties
from qpasses import get_qmeta
from qpasses.errors import CalibrationError
from qpasses.modules.fake_quant import ActFakeQuant, WeightFakeQuant
from qpasses.modules.fake_quant_layers import fake_quant_modules
from qpasses.numerics import KLObserver, PercentileObserver
from qpasses.ir.batches import batch_inputs
from qpasses.modules.lookup import write_qmeta
from qpasses.modules.lookup import layer_act_fq_node, layer_weight_quantizer
from qpasses.analyses.properties import check_calibrated
from tests.models import TinyCNN

PREP = ("canonicalize,fold-batch-norm,annotate-bitwidths{weight-bits=8 act-bits=8 "
        "first-last-bits=none},insert-fake-quant")


def data(n=3, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n)]


def prepared(seed=0, text=PREP):
    torch.manual_seed(seed)
    model = TinyCNN().eval()
    gm = qpasses.trace(model, torch.randn(1, 3, 8, 8))
    PassManager.parse(f"graph({text})").run(gm)
    return model, gm


def calibrate(gm, options="", batches=None, **ctx):
    text = f"graph(calibrate{{{options}}})" if options else "graph(calibrate)"
    with PassContext(calibration_data=data() if batches is None else batches, **ctx):
        return PassManager.parse(text, assume=gm).run(gm)


def layer_nodes(gm):
    nodes = {n.name: n for n in gm.graph.nodes}
    return {i.name: nodes[i.node] for i in qpasses.quantizable_layers(gm)}


def test_ptq_int8_pipeline_freezes_scales_into_quantizers_and_qmeta():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = qpasses.trace(model, x)
    with PassContext(example_inputs=(x,), calibration_data=data()):
        PassManager.parse("graph(ptq-int8)").run(gm)
    assert {"calibrated", "fake-quant-inserted", "bits-annotated"} <= graph_properties(gm)
    assert check_calibrated(gm) == []
    for name, node in layer_nodes(gm).items():
        q = get_qmeta(node)
        wq = layer_weight_quantizer(gm, node)
        assert q.weight.scale == tuple(wq.scale.tolist()) and len(q.weight.scale) == \
            wq.num_channels and q.weight.zero_point == (0,) * wq.num_channels
        act = gm.get_submodule(layer_act_fq_node(gm, node).target)
        assert q.act.scale == (act.scale.item(),)
        assert q.act.zero_point == (act.zero_point.item(),)
        assert not act.observing and act.fake_quant_on
    add = next(n for n in gm.graph.nodes if n.name == "add")
    assert get_qmeta(add).output.scale is not None
    # W8A8 stays close to the float model
    xs = torch.cat(data())
    with torch.no_grad():
        ref, out = model(xs), gm(xs)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("method", ["minmax", "moving-average", "avg", "percentile", "mse",
                                    "aciq", "kl"])
def test_every_clip_method_gives_finite_positive_scales(method):
    _, gm = prepared()
    calibrate(gm, f"method={method}")
    assert check_calibrated(gm) == []
    scales = [m.scale.item() for m in gm.modules() if isinstance(m, ActFakeQuant)]
    assert scales and all(s > 0 for s in scales)
    with torch.no_grad():
        assert torch.isfinite(gm(data()[0])).all()


def test_method_replaces_observers_and_clipping_narrows_the_range():
    _, gm = prepared()
    calibrate(gm, "method=minmax")
    wide = {n: m.scale.item() for n, m in fake_quant_modules(gm).items()
            if isinstance(m, ActFakeQuant)}
    calibrate(gm, "method=percentile percentile=99.0")
    narrow = {n: m.scale.item() for n, m in fake_quant_modules(gm).items()
              if isinstance(m, ActFakeQuant)}
    assert all(isinstance(m.observer, PercentileObserver) for m in gm.modules()
               if isinstance(m, ActFakeQuant))
    assert all(narrow[n] <= wide[n] * (1 + 1e-6) for n in wide)
    assert any(narrow[n] < wide[n] for n in wide)
    _, gm2 = prepared(text=PREP + "{observer=kl}")
    calibrate(gm2)  # method=inserted keeps the observers chosen at insertion
    assert all(isinstance(m.observer, KLObserver) for m in gm2.modules()
               if isinstance(m, ActFakeQuant))


@pytest.mark.parametrize("form", ["tensors", "tuples", "lists", "dict-x", "dict-input",
                                  "generator", "dataloader"])
def test_batch_forms(form):
    xs = data()
    batches = {
        "tensors": xs,
        "tuples": [(x, torch.zeros(4)) for x in xs],
        "lists": [[x, torch.zeros(4)] for x in xs],
        "dict-x": [{"x": x, "y": 0} for x in xs],
        "dict-input": [{"input": x} for x in xs],
        "generator": (x for x in xs),
        "dataloader": DataLoader(TensorDataset(torch.cat(xs), torch.zeros(12)), batch_size=4),
    }[form]
    _, gm = prepared()
    calibrate(gm, batches=batches)
    _, ref = prepared()
    calibrate(ref)
    for (n, a), (_, b) in zip(fake_quant_modules(gm).items(), fake_quant_modules(ref).items()):
        assert torch.equal(a.scale, b.scale), n


def test_num_batches_limits_consumption_and_progress_flag():
    consumed = []

    def gen():
        for i, x in enumerate(data(5)):
            consumed.append(i)
            yield x
    _, gm = prepared()
    with PassContext(calibration_data=gen(), progress=True, statistics=False):
        PassManager.parse("graph(calibrate{num-batches=2})", assume=gm).run(gm)
    assert consumed == [0, 1]  # stops at the limit without pulling a third batch
    assert check_calibrated(gm) == []


def test_train_mode_restored_and_qat_after_calibration_tracks_weights():
    _, gm = prepared()
    gm.train()
    calibrate(gm)
    assert gm.training
    conv2 = gm.get_submodule("conv2")
    s0 = conv2.weight_fake_quant.scale.clone()
    opt = torch.optim.SGD(gm.parameters(), lr=0.5)
    gm(data()[0]).square().mean().backward()
    opt.step()
    gm(data()[0])
    assert not torch.equal(conv2.weight_fake_quant.scale, s0)  # weight ranges follow the weights
    n = write_qmeta(gm)
    assert n > 0
    node = layer_nodes(gm)["conv2"]
    assert get_qmeta(node).weight.scale == tuple(conv2.weight_fake_quant.scale.tolist())


def test_pact_and_lsq_are_initialized_from_the_observer():
    _, gm = prepared(text=PREP + "{act-scheme=pact}")
    calibrate(gm)
    for m in gm.modules():
        if isinstance(m, ActFakeQuant):
            assert m.alpha.item() != 8.0 and m.alpha.item() > 0
    _, gm = prepared(text=PREP + "{act-scheme=lsq}")
    calibrate(gm)
    assert check_calibrated(gm) == []
    assert all(m._init for m in gm.modules() if isinstance(m, ActFakeQuant))


def test_trained_keeps_learned_pact_clips_and_needs_no_data():
    _, gm = prepared(text=PREP + "{act-scheme=pact}")
    pacts = {n: m for n, m in gm.named_modules() if isinstance(m, ActFakeQuant)}
    with torch.no_grad():                  # what QAT left: clips the observers would not give
        for i, m in enumerate(pacts.values()):
            m.alpha.fill_(3.0 + i)
    y_trained = gm(data()[0])
    with PassContext():                    # no calibration data needed
        PassManager.parse("graph(calibrate{method=trained})", assume=gm).run(gm)
    assert check_calibrated(gm) == [] and "calibrated" in graph_properties(gm)
    for i, m in enumerate(pacts.values()):
        assert m.alpha.item() == 3.0 + i and not m.observing
    assert torch.equal(gm(data()[0]), y_trained)          # the trained model, unchanged
    # QMeta carries the trained grids: 8-bit PACT, alpha/255 on [0, alpha] or alpha/127 signed
    scales = {get_qmeta(n).act.scale[0] for n in layer_nodes(gm).values()
              if get_qmeta(n).act is not None and get_qmeta(n).act.scale is not None}
    want = [(3.0 + i) / levels for i in range(len(pacts)) for levels in (255, 127)]
    assert scales and all(any(abs(s - w) < 1e-6 for w in want) for s in scales)
    # re-observing would have replaced the clips by the float model's ranges
    calibrate(gm)
    assert any(m.alpha.item() != 3.0 + i for i, m in enumerate(pacts.values()))


def test_trained_refuses_a_quantizer_that_never_saw_data():
    _, gm = prepared()                     # affine observers, never run
    with PassContext(), pytest.raises(CalibrationError, match=r"method=trained.*method=inserted"):
        PassManager.parse("graph(calibrate{method=trained})", assume=gm).run(gm)


# ---------------------------------------------------------------------------------------------
# errors


def test_calibrate_before_insert_is_a_property_error_at_build_time():
    with pytest.raises(PropertyError, match="'calibrate'.*requires property "
                                            "'fake-quant-inserted'.*insert-fake-quant"):
        PassManager.parse("graph(annotate-bitwidths,calibrate)", assume=())


def test_no_calibration_data_names_the_option():
    _, gm = prepared()
    with pytest.raises(CalibrationError, match=r"PassContext\(calibration_data=\.\.\.\)"):
        PassManager.parse("graph(calibrate)", assume=gm).run(gm, PassContext())
    # the failed run left the graph usable (modes restored)
    assert all(m.fake_quant_on for m in fake_quant_modules(gm).values())


@pytest.mark.parametrize("bad, what", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_nan_or_inf_batch_names_the_batch(bad, what):
    _, gm = prepared()
    xs = data(4)
    xs[2][0, 0, 0, 0] = bad
    with pytest.raises(CalibrationError, match=f"calibration batch 2 \\(input 0\\) contains {what}"):
        calibrate(gm, batches=xs)


@pytest.mark.parametrize("batches, fragment", [
    ([], "yielded no batches"),
    (torch.randn(4, 3, 8, 8), r"wrap a single batch in a list"),
    (5, "must be an iterable"),
    (["not a tensor"], "calibration batch 0 is a str"),
    ([{"label": torch.zeros(1)}], "batch 0 is a dict without an input key"),
])
def test_bad_calibration_data(batches, fragment):
    _, gm = prepared()
    with pytest.raises(CalibrationError, match=fragment):
        calibrate(gm, batches=batches)


def test_unobserved_quantizer_names_the_layer():
    _, gm = prepared()
    fc = layer_nodes(gm)["fc"]
    fq = fc.args[0]
    fc.replace_input_with(fq, fq.args[0])  # the data no longer reaches fc's input quantizer
    gm.graph.erase_node(fq)
    gm.recompile()
    with pytest.raises(CalibrationError, match=r"quantizer 'activation_fake_quant\.flatten' "
                                               r"\(input of layer 'fc'\) was never observed"):
        PassManager.parse("graph(calibrate)", assume={"fake-quant-inserted"}).run(
            gm, PassContext(calibration_data=data()))


def test_batch_inputs_helper():
    x = torch.randn(2, 3)
    assert batch_inputs(x, 0, 1)[0] is x
    assert batch_inputs((x, x + 1, 5), 0, 2)[1].equal(x + 1)
    assert batch_inputs({"inputs": (x, x)}, 0, 2)[0] is x
    with pytest.raises(CalibrationError, match="does not hold 2 input"):
        batch_inputs((x,), 3, 2)


def test_weight_quantizers_only_graph_and_multi_input_model():
    class TwoIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(5, 3)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    m = TwoIn()
    gm = qpasses.trace(m, (torch.randn(2, 4), torch.randn(2, 5)))
    PassManager.parse("graph(annotate-bitwidths,insert-fake-quant)").run(gm)
    batches = [(torch.randn(3, 4), torch.randn(3, 5), torch.zeros(3)) for _ in range(2)]
    calibrate(gm, batches=batches)
    assert check_calibrated(gm) == []
    assert all(isinstance(q, WeightFakeQuant) or q.observed
               for q in fake_quant_modules(gm).values())
