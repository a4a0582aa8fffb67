"""lower-to-int-sim on a tiny hand-made transformer block (LayerNorm, q/k/v linears, Q·Kᵀ, scale,
softmax, attention·V, output linear, residual adds, LayerNorm as F.layer_norm, GELU MLP):

- no float island: matmuls, softmax and both LayerNorms lower to IntMatMul / IntSoftmax /
  IntLayerNorm, the GELU after the linear to an IntLUT; verify-int-sim bit-exact against the
  independent oracle under every contract, and both backends agree on every node;
- emulate-int-sim covers the new modules: deviation 0 after lowering the emulating graph;
- softmax with dtype=float64 stays a reported float island with the reason; a softmax no quantizer
  follows gets the gate-bits grid; Q·Kᵀ feeding softmax without a quantizer keeps the exact
  accumulator grid (fuse-requantize then folds the consumer's requantization into it); softmax
  (nn.Softmax) on a raw accumulator reads a lut-bits intermediate grid;
- print<int-sim-kernels> lists the matmuls, verify-int-sim checks their accumulator width;
- export-onnx refuses the new modules with a typed ExportError naming the node;
- torchvision's VisionTransformer through graph(default): no matmul/softmax/LayerNorm island.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qpasses
from passes_registry import PassContext, PassManager, get_record
from qpasses.ir import ops
from qpasses.ir.fx import insert_module_before
from qpasses.ir.records import INT_SIM_KEY
from qpasses.modules.fake_quant import ActFakeQuant, AffineActFakeQuant
from qpasses.modules.int_sim import Requantize
from qpasses.modules.int_sim_ops import IntLUT
from qpasses.modules.int_sim_transformer import IntLayerNorm, IntMatMul, IntSoftmax
from qpasses.report import report

from .int_sim_helpers import assert_backends_bit_exact

CONTRACTS = ["gemmlowp", "single", "hawq", "float-rne"]


class Block(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2, mlp: int = 32,
                 softmax_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.h, self.softmax_dtype = heads, softmax_dtype
        self.ln1 = nn.LayerNorm(d)
        self.inp = nn.Linear(d, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2_w = nn.Parameter(torch.rand(d) + 0.5)
        self.ln2_b = nn.Parameter(torch.randn(d) * 0.1)
        self.fc1, self.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        x = self.inp(x)
        y = self.ln1(x)
        q = self.q(y).reshape(b, t, self.h, d // self.h).transpose(1, 2)
        k = self.k(y).reshape(b, t, self.h, d // self.h).transpose(1, 2)
        v = self.v(y).reshape(b, t, self.h, d // self.h).transpose(1, 2)
        a = torch.matmul(q, k.transpose(-2, -1)) * 0.35
        a = F.softmax(a, dim=-1, dtype=self.softmax_dtype)
        if self.softmax_dtype is not None:
            a = a.float()
        o = (a @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(o)
        z = F.gelu(self.fc1(F.layer_norm(x, (d,), self.ln2_w, self.ln2_b, 1e-5)))
        return x + self.fc2(z)


def _is_matmul(n: torch.fx.Node) -> bool:
    return (n.op == "call_function" and n.target in ops.MATMUL_FUNCTIONS) or \
        (n.op == "call_method" and n.target in ops.MATMUL_METHODS)


def block_graph(seed: int = 0, *, softmax_fq: bool = True, operand_fq: bool = True,
                softmax_dtype: torch.dtype | None = None):
    """The calibrated fake-quant graph of :class:`Block`, with 8-bit activation quantizers put
    on the matmul operands and after the softmax where insert-fake-quant did not (a fresh copy of
    a cached graph)."""
    gm, x, cal = _block_graph(seed, softmax_fq, operand_fq, softmax_dtype)
    return copy.deepcopy(gm), x, cal


@functools.lru_cache(maxsize=None)
def _block_graph(seed: int, softmax_fq: bool, operand_fq: bool,
                 softmax_dtype: torch.dtype | None):
    torch.manual_seed(seed)
    model = Block(softmax_dtype=softmax_dtype).eval()
    x = torch.randn(2, 5, 16)
    cal = [torch.randn(2, 5, 16) for _ in range(3)]
    gm = qpasses.trace(model, (x,))
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse("graph(canonicalize,annotate-bitwidths{weight-bits=8 act-bits=8},"
                          "insert-fake-quant)").run(gm)
    mods = dict(gm.named_modules())

    def quantized(a: torch.fx.Node) -> bool:
        return a.op == "call_module" and isinstance(mods.get(str(a.target)), ActFakeQuant)

    for n in list(gm.graph.nodes):
        if _is_matmul(n) and operand_fq:
            for a in list(n.args):
                from_softmax = a.op == "call_function" and a.target in ops.SOFTMAX_FUNCTIONS
                if not quantized(a) and (softmax_fq or not from_softmax):
                    insert_module_before(gm, n, a, "extra_fq", f"{n.name}_in",
                                         AffineActFakeQuant(8, "asymmetric", name=n.name))
        if n.op == "call_function" and n.target in ops.SOFTMAX_FUNCTIONS:
            users = list(n.users)
            if softmax_fq and len(users) == 1 and not quantized(users[0]):
                insert_module_before(gm, users[0], n, "extra_fq", f"{n.name}_out",
                                     AffineActFakeQuant(8, "unsigned", name=n.name))
            if not softmax_fq:
                for u in users:
                    if quantized(u):            # drop the quantizer insert-fake-quant put there
                        u.replace_all_uses_with(n)
                        gm.graph.erase_node(u)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse("graph(calibrate)", assume=gm).run(gm)
    return gm, x, cal


def lower(gm, x, cal, opts: str = "", verify: str = "samples=2"):
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse(f"graph(lower-to-int-sim{{{opts}}},verify-int-sim{{{verify}}})",
                          assume=gm).run(gm)
    return gm


def _modules_of(gm, cls):
    mods = dict(gm.named_modules())
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(mods.get(str(n.target)), cls)]


@pytest.mark.parametrize("rounding", CONTRACTS)
def test_block_lowers_without_float_islands_and_verifies_bit_exact(rounding):
    gm, x, cal = block_graph()
    fq = copy.deepcopy(gm)
    lower(gm, x, cal, f"rounding={rounding}")
    assert report(gm)["float_islands"] == []
    assert len(_modules_of(gm, IntMatMul)) == 2
    assert len(_modules_of(gm, IntSoftmax)) == 1
    assert len(_modules_of(gm, IntLayerNorm)) == 2
    gelu = [n for n in gm.graph.nodes if n.name.startswith("gelu")]
    assert gelu and gelu[0] in _modules_of(gm, IntLUT)
    rec = get_record(gm, INT_SIM_KEY)
    assert rec.verify["num_nodes_checked"] > 0        # verify-int-sim raises on any mismatch
    assert rec.stats["num_int_matmuls"] == 2 and rec.stats["num_int_softmax"] == 1
    assert_backends_bit_exact(gm, x)
    # end to end against the fake-quant graph: a few LSB at most on this random block
    with torch.no_grad():
        err = float((fq(x) - gm(x)).abs().max())
        ref = float(fq(x).abs().max())
    assert err <= 0.05 * ref


def test_q_kt_without_quantizer_keeps_the_exact_accumulator_grid_then_fuses():
    gm, x, cal = block_graph()
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse("graph(lower-fake-quant-ops)", assume=gm).run(gm)
    mods = dict(gm.named_modules())
    first = mods[str(_modules_of(gm, IntMatMul)[0].target)]
    assert first.requant is None                       # feeds the scale's table, then softmax
    assert (first.qmin, first.qmax) == (-first.acc_max, first.acc_max)
    second = mods[str(_modules_of(gm, IntMatMul)[1].target)]
    assert second.requant is not None                  # reaches the quantizer before out_proj
    (node,) = [n for n in gm.graph.nodes if n.args and n.args[0] is _modules_of(gm, IntMatMul)[0]]
    assert isinstance(mods[str(node.target)], Requantize)      # onto the lut-bits grid
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse("graph(fuse-requantize,cleanup-int-sim,verify-int-sim{samples=2})",
                          assume=gm).run(gm)
    assert first.requant is not None and first.qmax == 2 ** 15 - 1
    mods = dict(gm.named_modules())
    (user,) = _modules_of(gm, IntMatMul)[0].users          # the table reads the matmul directly
    assert isinstance(mods[str(user.target)], IntLUT)
    assert_backends_bit_exact(gm, x)


def test_softmax_without_quantizer_gets_the_gate_bits_grid():
    gm, x, cal = block_graph(softmax_fq=False)
    lower(gm, x, cal, "gate-bits=10")
    mods = dict(gm.named_modules())
    (sm,) = [mods[str(n.target)] for n in _modules_of(gm, IntSoftmax)]
    assert (sm.qmin, sm.qmax) == (0, 2 ** 10 - 1)
    assert report(gm)["float_islands"] == []


def test_softmax_in_float64_is_a_reported_float_island():
    gm, x, cal = block_graph(softmax_dtype=torch.float64)
    lower(gm, x, cal)
    islands = report(gm)["float_islands"]
    assert any(i["node"] == "softmax" and "dtype=torch.float64" in i["reason"] for i in islands)
    assert not _modules_of(gm, IntSoftmax)


def test_emulation_covers_the_transformer_kernels():
    gm, x, cal = block_graph(seed=1)
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse("graph(emulate-int-sim{rounding=gemmlowp})", assume=gm).run(gm)
    lower(gm, x, cal, "rounding=gemmlowp", "samples=2")
    v = get_record(gm, INT_SIM_KEY).verify
    assert report(gm)["float_islands"] == []
    assert v["max_lsb_diff"] == 0 and v["output_max_abs_diff"] == 0.0


def test_export_refuses_the_transformer_modules_naming_the_node(tmp_path):
    pytest.importorskip("onnx")
    from qpasses.errors import ExportError
    from qpasses.export import export_onnx
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)).eval()
    x = torch.randn(4, 8)
    cal = [torch.randn(4, 8) for _ in range(2)]
    gm = qpasses.trace(model, (x,))
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse("graph(canonicalize,annotate-bitwidths{weight-bits=8 act-bits=8},"
                          "insert-fake-quant,calibrate)").run(gm)
    lower(gm, x, cal)
    (ln,) = _modules_of(gm, IntLayerNorm)
    with pytest.raises(ExportError, match=f"IntLayerNorm.*'{ln.name}'"):
        export_onnx(gm, str(tmp_path / "m.onnx"))


def test_kernel_analysis_lists_the_matmuls_and_verify_checks_their_width(capsys):
    from qpasses.passes.verify_int_sim import AccumulatorOverflowError
    gm, x, cal = block_graph()
    lower(gm, x, cal)
    with PassContext(example_inputs=(x,)):
        PassManager.parse("graph(print<int-sim-kernels>)", assume=gm).run(gm)
    out = capsys.readouterr().out
    assert "matmul" in out and "float32" in out
    mods = dict(gm.named_modules())
    node = _modules_of(gm, IntMatMul)[1]
    mods[str(node.target)].acc_max = 3            # declare a 3-bit accumulator: too narrow
    with pytest.raises(AccumulatorOverflowError, match=f"matmul '{node.name}'"):
        with PassContext(example_inputs=(x,)):
            PassManager.parse("graph(verify-int-sim)", assume=gm).run(gm)


class RawScores(nn.Module):
    """Softmax (an nn.Softmax) straight on Q·Kᵀ (no scale): it reads the wide accumulator."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.softmax(torch.bmm(self.q(x), self.k(x).transpose(1, 2)))
        return self.out(torch.bmm(a, self.v(x)))


def test_softmax_of_a_raw_accumulator_reads_an_intermediate_grid():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8)
    cal = [torch.randn(2, 6, 8) for _ in range(2)]
    gm = qpasses.trace(RawScores().eval(), (x,))
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse("graph(canonicalize,annotate-bitwidths{weight-bits=8 act-bits=8},"
                          "insert-fake-quant,calibrate)").run(gm)
    lower(gm, x, cal, "rounding=single")
    assert report(gm)["float_islands"] == []
    mods = dict(gm.named_modules())
    (sm,) = _modules_of(gm, IntSoftmax)
    mm = mods[str(sm.args[0].target)]       # the intermediate-grid requantization, fused
    assert isinstance(mm, IntMatMul) and mm.requant is not None and mm.qmax == 2 ** 15 - 1
    assert mods[str(sm.target)].table.numel() == 2 ** 16 - 1     # the 16-bit lut-bits grid
    assert_backends_bit_exact(gm, x)


def test_torchvision_vit_lowers_without_transformer_float_islands():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2,
                                             num_heads=2, hidden_dim=32, mlp_dim=64,
                                             num_classes=10).eval()
    nn.init.normal_(m.heads.head.weight, std=0.3)      # torchvision starts the head at zero
    x = torch.randn(2, 3, 32, 32)
    cal = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    gm = qpasses.trace(m, (x,))
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse("graph(default)").run(gm)      # lowers and verifies bit-exact
    rec = get_record(gm, INT_SIM_KEY)
    assert [i for i in rec.float_islands
            if any(k in i["op"].lower() for k in ("matmul", "softmax", "norm"))] == []
    assert rec.stats["num_int_layer_norms"] == 5 and rec.stats["num_int_matmuls"] == 4
    assert rec.stats["num_int_softmax"] == 2
    # bit-exact against the oracle (verify raises otherwise); each op within 1 LSB of fake-quant
    assert rec.verify is not None and rec.verify["local_max_lsb_diff"] <= 1
