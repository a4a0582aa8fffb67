"""Memory of lower-to-int-sim: the typed LoweringMemoryError (predicted before a layer, converted
from the allocator's failure inside it), the kept fake-quant graph sharing the weights, and the
zero-kernel cache of the bias passes."""
from __future__ import annotations

import resource

import pytest
import torch
from torch import nn

import qpasses.algorithms.lowering.layers as layers_mod
import qpasses.algorithms.lowering.memory as memory
from passes_registry import PassContext, PassManager, get_record
from qpasses.algorithms.lowering.biases import zero_kernels
from qpasses.errors import LoweringMemoryError, PassFailure
from qpasses.modules.fake_quant import WeightFakeQuant
from qpasses.ir.records import INT_SIM_KEY
from qpasses.modules.int_sim_layers import IntLayer

from tests.passes.int_sim_helpers import calibrated, lower, randomize


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _graph():
    return calibrated(randomize(Net()), (2, 3, 6, 6), batches=1)


def _run(gm, x, cal):
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse("graph(lower-to-int-sim)", assume=gm).run(gm)


@pytest.mark.parametrize("codes", ["quantizer", "checked"])
def test_predicted_shortage_raises_before_the_layer(monkeypatch, codes):
    gm, x, cal = _graph()
    per_weight = 1                                 # 8-bit symmetric codes straight from w
    if codes == "checked":                         # fake-quantized weight + codes
        monkeypatch.setattr(WeightFakeQuant, "integer_codes_bytes", lambda self, w: None)
        per_weight = memory.LAYER_BYTES_PER_WEIGHT
    monkeypatch.setattr(memory, "available_bytes", lambda: 100)
    monkeypatch.setattr(memory, "CHECK_FROM_BYTES", 0)          # check even this tiny layer
    with pytest.raises(LoweringMemoryError) as ei:
        _run(gm, x, cal)
    e = ei.value
    assert isinstance(e, MemoryError) and isinstance(e, PassFailure)
    assert e.layer == "conv" and e.bytes_needed == per_weight * 8 * 3 * 9
    assert e.bytes_available == 100 and e.pass_name == "lower-fake-quant-ops"
    assert f"lowering layer 'conv' needs {e.bytes_needed} bytes" in str(e) and \
        "keep-fake-quant" in str(e)


def test_small_layers_are_not_checked_ahead(monkeypatch):
    gm, x, cal = _graph()
    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
    _run(gm, x, cal)                      # 1.3 KB < CHECK_FROM_BYTES: lowered, nothing read


@pytest.mark.parametrize("where", ["quantizer codes", "checked codes"])
def test_allocator_failure_is_converted_at_the_layer(monkeypatch, where):
    gm, x, cal = _graph()

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 123456789 bytes. Error code "
                           "12 (Cannot allocate memory)")
    if where == "checked codes":           # the long way: fake-quantize, then check the grid
        monkeypatch.setattr(WeightFakeQuant, "integer_codes", lambda self, w: None)
        monkeypatch.setattr(layers_mod, "weight_codes", oom)
    else:
        monkeypatch.setattr(WeightFakeQuant, "integer_codes", oom)
    with pytest.raises(LoweringMemoryError) as ei:
        _run(gm, x, cal)
    assert ei.value.layer == "conv" and ei.value.bytes_needed == 123456789
    assert ei.value.node == "conv" and "DefaultCPUAllocator" in str(ei.value)


def test_other_runtime_errors_are_not_memory_errors(monkeypatch):
    gm, x, cal = _graph()

    def boom(*a, **k):
        raise RuntimeError("something else")
    monkeypatch.setattr(WeightFakeQuant, "integer_codes", boom)
    with pytest.raises(PassFailure) as ei:
        _run(gm, x, cal)
    assert not isinstance(ei.value, LoweringMemoryError) and "internal error" in str(ei.value)


def test_available_bytes_respects_rlimits(monkeypatch):
    avail = memory.available_bytes()
    assert avail is None or avail > 0
    status = memory._kib_fields("/proc/self/status", ("VmSize",))
    if avail is None or "VmSize" not in status:
        pytest.skip("no /proc")
    real = resource.getrlimit

    def fake(which):
        if which == resource.RLIMIT_AS:
            return (status["VmSize"] + 4096, resource.RLIM_INFINITY)
        return real(which)
    monkeypatch.setattr(memory.resource, "getrlimit", fake)
    assert memory.available_bytes() < 64 * 2 ** 20    # VmSize moves a little between reads


def test_kept_fake_quant_graph_shares_weights_and_is_untouched():
    gm, x, cal = _graph()
    fq, gm = lower(gm, x, cal, verify="samples=2")
    rec = get_record(gm, INT_SIM_KEY)
    kept = rec.fake_quant
    assert INT_SIM_KEY not in kept.meta
    layer = gm.get_submodule("conv")
    assert isinstance(layer, IntLayer)
    assert not isinstance(kept.get_submodule("conv"), IntLayer)     # still the fake-quant layer
    assert kept.get_submodule("conv").weight is layer.weight         # shared, not copied
    with torch.no_grad():
        assert torch.equal(kept(x), fq(x))                            # the graph as it was
    assert rec.verify["num_samples"] == 2


def test_zero_kernel_cache_follows_the_codes():
    gm, x, cal = _graph()
    _, gm = lower(gm, x, cal)
    layer = gm.get_submodule("conv")
    assert not bool(zero_kernels(layer).any())
    with torch.no_grad():
        layer.w_q[3].fill_(int(layer.w_zp.reshape(-1)[3 % layer.w_zp.numel()]))  # in place
    z = zero_kernels(layer)
    assert z.tolist() == [i == 3 for i in range(8)]


@pytest.mark.parametrize("codes", ["quantizer", "checked"])
def test_the_predicted_bytes_bound_the_measured_peak_and_are_close_to_it(monkeypatch, codes):
    # one big layer (8M weights: 32 MiB of float32), peak RSS growth while it is lowered, with
    # the codes from the quantizer (1 byte per weight) or fake-quantized and checked (6)
    from tools.bench_flow import reset_peak_rss, status_kib
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 4096)).eval()
    gm, x, cal = calibrated(model, (2, 2048), batches=1)
    n = 2048 * 4096
    wfq = gm.get_submodule("0").weight_fake_quant
    per_weight = wfq.integer_codes_bytes(gm.get_submodule("0").weight)
    assert per_weight == 1
    if codes == "checked":
        monkeypatch.setattr(WeightFakeQuant, "integer_codes", lambda self, w: None)
        per_weight = memory.LAYER_BYTES_PER_WEIGHT
    if not reset_peak_rss() or status_kib("VmRSS") is None:
        pytest.skip("peak RSS cannot be reset here (needs Linux /proc/self/clear_refs)")
    start = status_kib("VmRSS")
    _run(gm, x, cal)
    grown = (status_kib("VmHWM") - start) * 1024
    need = memory.layer_bytes(n, per_weight)
    assert grown <= need + 4 * 2 ** 20                        # sound (4 MiB of other state)
    assert need <= 2 * grown                                  # and not a gross overestimate
