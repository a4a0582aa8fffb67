"""QAT on the fake-quant graph: gradients reach weights, PACT alpha and LSQ steps; bits and scales
survive state_dict save/load into a freshly prepared graph; DistributedDataParallel (2 processes
started by torch.multiprocessing, gloo, CPU) keeps parameters identical across ranks."""
from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F

import qpasses
from passes_registry import PassContext, PassManager
from qpasses.modules.fake_quant_layers import fake_quant_modules
from tests.models import TinyCNN


def prepare(act_scheme="pact", config=None, calibrate=True, seed=0):
    torch.manual_seed(seed)
    model = TinyCNN().eval()
    gm = qpasses.trace(model, torch.randn(1, 3, 8, 8))
    cfg = f" config={config}" if config else ""
    text = (f"graph(canonicalize,fold-batch-norm,annotate-bitwidths{{weight-bits=4 act-bits=4"
            f"{cfg}}},insert-fake-quant{{act-scheme={act_scheme}}}"
            + (",calibrate)" if calibrate else ")"))
    g = torch.Generator().manual_seed(123)
    batches = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)]
    with PassContext(calibration_data=batches):
        PassManager.parse(text).run(gm)
    return gm


def train_steps(gm, steps=2, seed=1, lr=0.05):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(gm.parameters(), lr=lr, momentum=0.9)
    gm.train()
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=g)
        y = torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("scheme, param", [("pact", "alpha"), ("lsq", "step")])
def test_gradients_reach_weights_and_quantizer_parameters(scheme, param):
    gm = prepare(scheme)
    gm.train()
    # wider than the calibration data, so PACT clips (its alpha gradient lives on clipped values)
    x, y = 3 * torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    F.cross_entropy(gm(x), y).backward()
    for name in ("conv1", "conv2", "fc"):
        w = gm.get_submodule(name).weight
        assert w.grad is not None and w.grad.abs().sum() > 0, name
    qparams = {n: p for n, p in gm.named_parameters() if n.endswith(param)}
    assert qparams and all(p.grad is not None for p in qparams.values())
    assert any(p.grad.abs().sum() > 0 for p in qparams.values())
    before = {n: p.detach().clone() for n, p in qparams.items()}
    train_steps(gm, steps=3)
    assert any(not torch.equal(before[n], p) for n, p in qparams.items())


def test_state_dict_round_trip_into_freshly_prepared_graph(tmp_path):
    cfg = tmp_path / "bits.json"
    cfg.write_text(json.dumps({"conv2": {"weight_bits": [0, 2, 4, 8, 0, 3, 3, 3],
                                         "act_bits": 6}}))
    for scheme in ("affine", "pact", "lsq"):
        src = prepare(scheme, config=str(cfg))
        train_steps(src)
        src.eval()
        buf = io.BytesIO()
        torch.save(src.state_dict(), buf)
        buf.seek(0)
        fresh = prepare(scheme, config=str(cfg), calibrate=False, seed=7)
        fresh.load_state_dict(torch.load(buf))
        fresh.eval()
        a, b = fake_quant_modules(src), fake_quant_modules(fresh)
        assert list(a) == list(b)
        for n in a:
            assert torch.equal(a[n].bits, b[n].bits), n
            sa, za = a[n].qparams()
            sb, zb = b[n].qparams()
            assert torch.equal(sa, sb) and torch.equal(za, zb), n
            assert (a[n].fake_quant_on, a[n].observing) == (b[n].fake_quant_on, b[n].observing)
        assert b["conv2.weight_fake_quant"].bits.tolist() == [0, 2, 4, 8, 0, 3, 3, 3]
        x = torch.randn(4, 3, 8, 8)
        with torch.no_grad():
            assert torch.equal(src(x), fresh(x)), scheme


def test_deepcopy_and_whole_module_pickle():
    import copy
    gm = prepare("lsq")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(copy.deepcopy(gm)(x), gm(x))
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), gm(x))


# ---------------------------------------------------------------------------------------------
# DistributedDataParallel: 2 processes, gloo, CPU


def test_distributed_data_parallel_two_processes(tmp_path):
    from . import ddp_worker
    start = ddp_worker.prepare_pact()
    r0, r1 = ddp_worker.launch("tests.passes.ddp_worker", tmp_path)
    assert list(r0) == list(r1) and any(n.endswith("alpha") for n in r0)
    for n in r0:
        assert torch.equal(r0[n], r1[n]), n
    moved = [n for n, p in start.named_parameters() if not torch.equal(p.detach(), r0[n])]
    assert "conv1.weight" in moved and any(n.endswith("alpha") for n in moved)
