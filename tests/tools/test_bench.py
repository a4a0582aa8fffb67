"""tools/bench.py runs its sections and writes JSON (on a tiny model, one repeat)."""
from __future__ import annotations

import json

import pytest

import tests.fake_passes  # noqa: F401  (registers the test-* passes)
from passes_registry import PassManager
from tools import bench
from tools.bench_flow import FLOAT_FORWARD, LOWERING, PTQ_PIPELINE, named_pipeline_passes

TINY = ["--repeat", "1", "--warmup", "0", "--model", "tests.models:tiny_cnn", "--image-size", "8",
        "--batch", "2"]


def test_ptq_flow_section_times_the_whole_flow_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--only", "ptq-flow", *TINY, "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "tiny_cnn torch.ao: total" in text and "ratio vs torch.ao" in text
    data = json.loads(out.read_text())
    (sec,) = data["sections"]
    assert sec["name"] == "ptq-flow" and sec["skipped"] is None
    rows = {r["what"]: r for r in sec["rows"]}
    total = rows["tiny_cnn ours: total"]
    assert total["median_s"] > 0 and total["ratio"] > 0
    # the per-pass breakdown covers every pass of the flow, the lowering's passes grouped under it
    for name in ("canonicalize", "fold-batch-norm", "dce", "annotate-bitwidths",
                 "insert-fake-quant", "calibrate", LOWERING, f"{LOWERING}: fuse-requantize"):
        assert rows[f"tiny_cnn ours: {name}"]["median_s"] >= 0, name
    lowering = [r["median_s"] for w, r in rows.items()
                if w.startswith(f"tiny_cnn ours: {LOWERING}: ")]
    assert rows[f"tiny_cnn ours: {LOWERING}"]["median_s"] == pytest.approx(sum(lowering))
    parts = [r["median_s"] for w, r in rows.items()
             if w.startswith("tiny_cnn ours: ") and not w.endswith(": total")
             and not w.startswith(f"tiny_cnn ours: {LOWERING}: ")]
    assert total["median_s"] == pytest.approx(sum(parts))
    ao = [rows[f"tiny_cnn torch.ao: {k}"]["median_s"]
          for k in ("prepare_fx (x86 qconfig mapping)", "calibration forward", "convert_fx")]
    assert rows["tiny_cnn torch.ao: total"]["median_s"] == pytest.approx(sum(ao))
    assert rows[f"tiny_cnn float model: {FLOAT_FORWARD}"]["median_s"] > 0   # the reference
    assert any("peak RSS growth while lowering" in n and "MiB" in n for n in sec["notes"])


def test_the_lowering_expands_to_the_passes_the_breakdown_groups():
    names = named_pipeline_passes(PassManager.parse(PTQ_PIPELINE), LOWERING)
    assert "lower-fake-quant-ops" in names and "calibrate" not in names
    assert named_pipeline_passes(PassManager.parse("graph(dce)"), LOWERING) == frozenset()


def test_sections_are_listed_and_the_partial_fold_section_is_gone(capsys):
    assert bench.main(["--list"]) == 0
    text = capsys.readouterr().out
    assert "ptq-flow" in text and "fold-vs-torchao" not in text


def test_a_pipeline_that_does_not_build_skips_the_section(capsys):
    rc = bench.main(["--only", "ptq-flow", *TINY, "--pipeline", "graph(no-such-pass)"])
    assert rc == 0 and "skipped: pipeline does not build" in capsys.readouterr().out


def test_a_bad_size_is_a_typed_error(capsys):
    rc = bench.main(["--only", "ptq-flow", *TINY[:-2], "--batch", "0"])
    assert rc == 2 and "--batch must be >= 1" in capsys.readouterr().err


def test_ort_int8_section_at_a_tiny_size(monkeypatch, capsys):
    import tools.bench_ort
    monkeypatch.setattr(tools.bench_ort, "ORT_MODEL", "resnet18")
    rc = bench.main(["--only", "ort-int8", "--repeat", "1", "--warmup", "0", "--batch", "1",
                     "--image-size", "32"])
    assert rc == 0
    text = capsys.readouterr().out
    for what in ("ours: QOperator export in onnxruntime", "onnxruntime quantize_static (QDQ)",
                 "torch.ao convert_fx (fbgemm int8)", "int-sim fast (ours)"):
        assert what in text


def test_int_sim_vit_section_at_a_tiny_size(capsys):
    rc = bench.main(["--only", "int-sim-vit", "--repeat", "1", "--warmup", "0", "--batch", "1",
                     "--image-size", "32"])
    assert rc == 0
    text = capsys.readouterr().out
    for what in ("fp32", "fake-quant graph (ours)", "int-sim fast", "0 float islands",
                 "100.0% of"):
        assert what in text, what


def test_verify_section_times_the_check_against_one_forward(tmp_path):
    out = tmp_path / "bench.json"
    rc = bench.main(["--only", "verify-int-sim", *TINY, "--json", str(out)])
    assert rc == 0
    (sec,) = json.loads(out.read_text())["sections"]
    rows = {r["what"]: r for r in sec["rows"]}
    fwd = rows["tests.models:tiny_cnn int-sim forward"]
    ver = rows["tests.models:tiny_cnn verify-int-sim"]
    assert fwd["median_s"] > 0 and fwd["ratio"] == 1.0
    assert ver["ratio"] == pytest.approx(ver["median_s"] / fwd["median_s"])
    assert any("process CPU median" in n for n in sec["notes"])
