"""tools/dump_graph.py, called in-process on tiny models."""
from __future__ import annotations

import json

import pytest

import tests.fake_passes  # noqa: F401  (registers the test-* passes)
from qpasses.cli import load_model, parse_input_shape, resolve_pipeline_text
from qpasses.errors import InputError
from tools import dump_graph

TINY = "tests.models:tiny_cnn"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_table_format():
    text = dump_graph.dump(TINY, "1,3,8,8")
    assert "model: TinyCNN" in text
    for layer in ("conv1", "conv2", "fc", "TOTAL"):
        assert layer in text


def test_json_format_follows_the_report_schema():
    rep = json.loads(dump_graph.dump(TINY, "1,3,8,8", fmt="json"))
    assert set(rep) == {"model", "pipeline", "layers", "totals", "passes", "float_islands"}
    assert [r["name"] for r in rep["layers"]] == ["conv1", "conv2", "fc"]
    keys = {"name", "op", "w_bits", "w_bits_per_kernel", "a_bits", "macs", "params", "bitops",
            "size_bits", "acc_bits", "acc_bits_data", "pruned_channels", "integer"}
    assert all(set(r) == keys for r in rep["layers"])
    assert rep["layers"][0]["macs"] == 8 * 3 * 9 * 8 * 8
    assert set(rep["totals"]) == {"macs", "params", "bitops", "size_bits"}


def test_fxir_format_has_header_and_one_line_per_node():
    text = dump_graph.dump(TINY, "1,3,8,8", pipeline="graph(test-relu-to-sigmoid)",
                           fmt="fxir")
    lines = text.splitlines()
    assert lines[0] == "// graph(test-relu-to-sigmoid{limit=-1})"
    assert lines[1] == "graph {" and lines[-1] == "}"
    assert "  %x = placeholder : f32[1,3,8,8]" in lines
    assert "  %conv1 = call_module[conv1](%x) : f32[1,8,8,8]" in lines
    assert any("sigmoid" in ln for ln in lines) and not any("relu](" in ln for ln in lines)


def test_pipeline_run_is_recorded_in_the_json_report():
    rep = json.loads(dump_graph.dump(TINY, "1,3,8,8", pipeline="graph(test-noop)",
                                     fmt="json"))
    assert rep["pipeline"] == "graph(test-noop)"
    assert [p["name"] for p in rep["passes"]] == ["test-noop"]


def test_dot_format():
    text = dump_graph.dump(TINY, "1,3,8,8", fmt="dot")
    assert text.startswith("digraph G {") and text.endswith("}")
    assert '"conv1" -> "bn1";' in text
    assert '"x" [label="x\\nplaceholder\\nf32[1,3,8,8]"' in text
    assert text == dump_graph.dump(TINY, "1,3,8,8", fmt="dot")  # deterministic


def test_main_writes_out_and_plot(tmp_path, capsys):
    out, png = tmp_path / "g.fxir", tmp_path / "sub" / "bits.png"
    rc = dump_graph.main(["--model", TINY, "--input-shape", "1,3,8,8", "--format", "fxir",
                          "--out", str(out), "--plot", str(png)])
    assert rc == 0
    assert capsys.readouterr().out == ""
    assert out.read_text().startswith("graph {")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_plot_with_per_kernel_bits(tmp_path):
    rep = {"model": "m", "pipeline": "graph(x)", "layers": [
        {"name": "a", "w_bits": 4, "w_bits_per_kernel": [2, 4, 3], "a_bits": 8},
        {"name": "b", "w_bits": 8, "w_bits_per_kernel": None, "a_bits": None},
        {"name": "c", "w_bits": None, "w_bits_per_kernel": None, "a_bits": None}]}
    path = dump_graph.plot_bits(rep, str(tmp_path / "p.png"))
    assert open(path, "rb").read(8) == PNG_MAGIC


def test_factory_may_return_example_inputs():
    gm, inputs = dump_graph.build("tests.models:tiny_cnn_with_inputs")
    assert tuple(inputs[0].shape) == (2, 3, 6, 6)
    assert "f32[2,3,6,6]" in dump_graph.render(gm, "fxir")


def test_seed_makes_random_init_deterministic():
    a, _ = load_model(TINY, seed=3)
    b, _ = load_model(TINY, seed=3)
    assert (a.conv1.weight == b.conv1.weight).all()


def test_default_pipeline_quantizes_and_calibrates_on_synthetic_batches():
    rep = json.loads(dump_graph.dump(TINY, pipeline="default", fmt="json", calibration_batches=3))
    bits = [(r["w_bits"], r["a_bits"]) for r in rep["layers"]]
    assert bits[0] == (8, 8) and bits[-1][0] == 8          # first/last pinned
    assert all(w == 4 for w, _ in bits[1:-1])
    assert rep["pipeline"].startswith("graph(canonicalize,fold-batch-norm")
    assert "calibrate{" in rep["pipeline"] and "lower-to-int-sim{" in rep["pipeline"]
    assert "verify-int-sim{" in rep["pipeline"]
    assert all(island["reason"] for island in rep["float_islands"])  # islands say why
    with pytest.raises(InputError, match="--calibration-batches must be >= 0"):
        dump_graph.dump(TINY, pipeline="default", calibration_batches=-1)


def test_default_pipeline_resolution():
    assert resolve_pipeline_text("default") == "graph(default)"
    assert resolve_pipeline_text("graph(dce)") == "graph(dce)"
    assert resolve_pipeline_text(None) is None


@pytest.mark.parametrize("text,dims", [("1,3,224,224", (1, 3, 224, 224)), ("2x4", (2, 4)),
                                       (" 1, 8 ", (1, 8))])
def test_parse_input_shape(text, dims):
    assert parse_input_shape(text) == dims


@pytest.mark.parametrize("args,message", [
    (["--model", "torchvision:resnet1"], "unknown torchvision model 'resnet1' (did you mean "
                                         "'resnet18'"),
    (["--model", "tests.models:tiny_cn"], "has no attribute 'tiny_cn' (did you mean "
                                                     "'tiny_cnn'"),
    (["--model", "tests.tools.no_such_module:f"], "cannot import module "
                                                  "'tests.tools.no_such_module'"),
    (["--model", "resnet18"], "bad model spec 'resnet18'"),
    (["--model", "tests.models:not_a_model"], "returned int, expected an nn.Module"),
    (["--model", TINY, "--input-shape", "1,3,a"], "bad input shape '1,3,a'"),
    (["--model", TINY, "--input-shape", "1,0,8"], "bad input shape '1,0,8'"),
    (["--model", TINY, "--input-shape", "1,4,8,8"], "failed at node 'conv1'"),
    (["--model", TINY, "--input-shape", "1,3,8,8", "--pipeline", "graph(test-nop)"],
     "'test-nop' does not refer to a registered pass or pipeline (did you mean "
     "'test-noop'"),
    (["--model", TINY, "--input-shape", "1,3,8,8", "--pipeline", "graph(test-fail)"],
     "pass 'test-fail' (element 0 of the pipeline) failed"),
])
def test_bad_inputs_exit_2_with_the_message(args, message, capsys):
    assert dump_graph.main(args) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_bad_shape_is_an_input_error():
    with pytest.raises(InputError):
        parse_input_shape("")


def test_torchvision_resnet18_small_input():
    """The one torchvision model in the tool tests (small input keeps it fast)."""
    rep = json.loads(dump_graph.dump("torchvision:resnet18", "1,3,32,32", fmt="json"))
    names = [r["name"] for r in rep["layers"]]
    assert len(names) == 21 and names[0] == "conv1" and names[-1] == "fc"
    assert rep["model"] == "ResNet"


def test_pass_diagnostics_go_to_stderr_so_json_stays_parseable(capsys):
    rc = dump_graph.main(["--model", TINY, "--pipeline", "default", "--format", "json"])
    out, err = capsys.readouterr()
    assert rc == 0 and json.loads(out)["layers"]
    assert "verify-int-sim:" in err and "top-1 agreement" in err
