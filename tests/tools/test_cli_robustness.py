"""User mistakes on the command line and in qpasses' entry points give typed errors, never a
traceback (issue 18, part A); qpass_opt takes calibration data and rolls back on failure."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import qpasses
import tests.fake_passes  # noqa: F401  (registers the test-* passes)
from passes_registry import fingerprint
from qpasses.cli import calibration_data, load_model
from qpasses.errors import ConfigError, InputError
from tools import dump_graph, qpass_opt

TINY = ["--model", "tests.models:tiny_cnn", "--input-shape", "1,3,8,8"]


def opt(capsys, *args):
    rc = qpass_opt.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("spec,match", [
    ("tests.tools.bad_inputs:raises", "raised RuntimeError: the factory's own bug"),
    ("tests.tools.bad_inputs:needs_args", r"needs arguments \(width\)"),
    ("tests.tools.bad_inputs:exits", "raised SystemExit"),
])
def test_bad_model_factories(capsys, spec, match):
    rc, out, err = opt(capsys, "--model", spec, "--input-shape", "1,4",
                       "--pass-pipeline", "graph(test-noop)")
    assert rc == 2 and "Traceback" not in err
    assert f"model factory '{spec}'" in err
    import re
    assert re.search(match, err)


def test_factory_with_default_arguments_is_fine():
    model, _ = load_model("tests.tools.bad_inputs:tiny_linear")
    assert isinstance(model, nn.Module)


@pytest.mark.parametrize("args,match", [
    (["--input-shape", "100000,100000,100000"], "elements, more than"),
    (["--input-shape", "1," + "9" * 30], "elements, more than"),
    (["--seed", str(2 ** 70)], "--seed"),
    (["--seed", str(-2 ** 64)], "--seed"),
])
def test_huge_shapes_and_seeds(capsys, args, match):
    rc, _, err = opt(capsys, "--model", "tests.models:tiny_cnn", *args,
                     "--pass-pipeline", "graph(test-noop)")
    assert rc == 2 and match in err and "Traceback" not in err


def test_huge_shape_in_dump_graph(capsys):
    rc = dump_graph.main(["--model", "tests.models:tiny_cnn", "--input-shape",
                          "4096,4096,4096"])
    assert rc == 2 and "elements, more than" in capsys.readouterr().err


def test_plugin_raising_on_import(capsys):
    rc, _, err = opt(capsys, "--load-plugin", "tests.tools.bad_plugin", "--list-passes")
    assert rc == 2 and "Traceback" not in err
    assert "--load-plugin tests.tools.bad_plugin: importing the plugin raised ValueError: " \
           "plugin is broken" in err


def test_unwritable_reproducer_dir_keeps_the_real_failure(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc, _, err = opt(capsys, *TINY, "--pass-pipeline", "graph(test-fail)",
                     "--reproducer-dir", str(blocker / "repro"))
    assert rc == 2 and "Traceback" not in err
    assert "pass 'test-fail' (element 0 of the pipeline) failed" in err
    assert "this pass always fails" in err
    assert "reproducer: not written: cannot write to" in err


@pytest.mark.parametrize("flag", ["--disable-pass", "--print-ir-after", "--print-ir-before"])
def test_unknown_pass_names_in_debug_flags(capsys, flag):
    rc, _, err = opt(capsys, *TINY, "--pass-pipeline", "graph(test-noop)", f"{flag}=test-noopp")
    assert rc == 2 and "Traceback" not in err
    assert err.startswith(f"error: {flag}: 'test-noopp' is not a registered pass")
    assert "did you mean 'test-noop'" in err


def test_calibration_random_runs_the_default_pipeline(capsys):
    rc, out, err = opt(capsys, *TINY, "--pass-pipeline", "default", "--calibration", "random:2",
                       "--output-format", "json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["layers"] and all(r["w_bits"] is not None for r in rep["layers"])


def test_calibration_from_a_file(capsys, tmp_path):
    path = tmp_path / "batches.pt"
    torch.save([torch.randn(2, 3, 8, 8) for _ in range(2)], path)
    rc, out, err = opt(capsys, *TINY, "--pass-pipeline", "default", "--calibration", str(path),
                       "--output-format", "json")
    assert rc == 0, err
    assert "calibrate" in json.loads(out)["pipeline"]


@pytest.mark.parametrize("spec,match", [
    ("random:0", "random:N with N >= 1"), ("random:x", "random:N"),
    ("nope.pt", "no such file"),
])
def test_bad_calibration_specs(capsys, spec, match):
    rc, _, err = opt(capsys, *TINY, "--pass-pipeline", "default", "--calibration", spec)
    assert rc == 2 and match in err


def test_calibration_file_of_the_wrong_kind(tmp_path):
    path = tmp_path / "d.pt"
    torch.save({"x": 1}, path)
    with pytest.raises(InputError, match="save a non-empty list of batches"):
        calibration_data(str(path), None)


def test_tools_roll_back_and_the_flag_turns_it_off(capsys, tmp_path, monkeypatch):
    seen = {}
    real_run = qpass_opt.PassManager.run

    def spy(self, gm, ctx=None):
        seen["gm"], seen["before"], seen["rollback"] = gm, fingerprint(gm), ctx.rollback
        return real_run(self, gm, ctx)

    monkeypatch.setattr(qpass_opt.PassManager, "run", spy)
    rc, _, _ = opt(capsys, *TINY, "--pass-pipeline", "graph(test-relu-to-sigmoid,test-fail)")
    assert rc == 2 and seen["rollback"] is True
    assert fingerprint(seen["gm"]) == seen["before"]
    rc, _, _ = opt(capsys, *TINY, "--no-rollback",
                   "--pass-pipeline", "graph(test-relu-to-sigmoid,test-fail)")
    assert rc == 2 and seen["rollback"] is False


def test_continued_graph_needs_no_assume_in_the_tool(capsys, tmp_path):
    # a reproducer's graph.pt + annotations.json record the properties established before
    rc, _, err = opt(capsys, *TINY, "--pass-pipeline",
                     "graph(fold-batch-norm,annotate-bitwidths,test-fail)", "--reproducer-dir", str(tmp_path))
    assert rc == 2
    rc, out, err = opt(capsys, "--graph", str(tmp_path / "graph.pt"), "--input-shape", "1,3,8,8",
                       "--pass-pipeline", "graph(insert-fake-quant)")
    assert rc == 0, err
    assert out.startswith("// graph(insert-fake-quant")


# ---------------------------------------------------------------------------------------------
# qpasses entry points


def test_report_of_a_module_is_a_typed_error():
    with pytest.raises(InputError, match="trace the model first"):
        qpasses.report(nn.Linear(2, 2))


@pytest.mark.parametrize("kwargs,match", [
    ({"leaf_modules": "0"}, r"write leaf_modules=\['0'\]"),
    ({"leaf_modules": ["O"]}, "has no submodule 'O'"),
    ({"leaf_modules": [3]}, "module classes or qualified names"),
    ({"concrete_args": {"y": 1}}, "forward has no argument 'y'"),
    ({"concrete_args": [("x", 1)]}, "must be a dict"),
])
def test_trace_arguments_are_checked(kwargs, match):
    model = nn.Sequential(nn.Linear(4, 2), nn.ReLU())
    with pytest.raises(InputError, match=match):
        qpasses.trace(model, torch.randn(1, 4), **kwargs)


def test_trace_accepts_leaf_names_and_classes():
    model = nn.Sequential(nn.Linear(4, 2), nn.ReLU())
    gm = qpasses.trace(model, torch.randn(1, 4), leaf_modules=["0", nn.ReLU])
    assert [n.op for n in gm.graph.nodes].count("call_module") == 2


def test_deeply_nested_config_is_a_config_error(tmp_path):
    from qpasses.passes.annotate_bitwidths import load_config

    path = tmp_path / "deep.json"
    path.write_text('{"fc":\n ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ConfigError, match=r"deep.json':2:17: nested too deeply"):
        load_config(str(path))
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({'fc"[[[[[[[[[[[[[[[[[[[[': {"weight_bits": 4}}))
    assert load_config(str(ok)).entries[0].weight_bits == 4
    assert os.path.exists(ok)
