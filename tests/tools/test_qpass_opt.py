"""tools/qpass_opt.py, called in-process."""
from __future__ import annotations

import json
import shlex
import os

import pytest

import tests.fake_passes  # noqa: F401  (registers the test-* passes)
from tools import qpass_opt

TINY = ["--model", "tests.models:tiny_cnn", "--input-shape", "1,3,8,8"]
REWRITE = "graph(test-relu-to-sigmoid,test-noop)"


def opt(capsys, *args):
    rc = qpass_opt.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_list_passes(capsys):
    rc, out, err = opt(capsys, "--list-passes")
    assert rc == 0 and err == ""
    for section in ("Passes:", "Pipelines:", "Analyses:", "IR properties:", "Combinators:"):
        assert section in out
    assert "print" in out and "Print an analysis result" in out
    assert "test-noop" not in out  # test-* passes are hidden


def test_list_passes_shows_options_with_type_default_help():
    lines = qpass_opt.format_pass_list(include_test=True).splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith("test-relu-to-sigmoid "))
    row = lines[i + 1]
    assert row.split()[0] == "limit"
    assert "int" in row and "-1" in row and "rewrite at most this many" in row


def test_dump_pipeline_is_canonical(capsys):
    rc, out, _ = opt(capsys, "--pass-pipeline", "graph( test-relu-to-sigmoid{limit=2} ,"
                     "repeat(test-noop))", "--dump-pipeline")
    assert rc == 0
    assert out == ("graph(test-relu-to-sigmoid{limit=2},"
                   "repeat{count=2}(test-noop))\n")


def test_runs_and_prints_final_graph(capsys):
    rc, out, err = opt(capsys, *TINY, "--pass-pipeline", REWRITE)
    assert rc == 0 and err == ""
    assert out.startswith("// graph(test-relu-to-sigmoid{limit=-1},test-noop)\n")
    assert "sigmoid" in out


def test_print_ir_after_all(capsys):
    rc, out, err = opt(capsys, *TINY, "--pass-pipeline", REWRITE, "--print-ir-after-all")
    assert rc == 0
    assert ("// -----// IR Dump After ReluToSigmoid (test-relu-to-sigmoid) "
            "//----- //") in err
    assert "IR Dump After Noop (test-noop)" in err
    assert "IR Dump" not in out


def test_print_ir_before_named_and_after_change(capsys):
    rc, _, err = opt(capsys, *TINY, "--pass-pipeline", REWRITE,
                     "--print-ir-before=test-noop", "--print-ir-after-change")
    assert rc == 0
    assert "IR Dump Before Noop (test-noop)" in err
    assert "IR Dump Before ReluToSigmoid" not in err
    assert "IR Dump After ReluToSigmoid" in err   # changed the graph
    assert "IR Dump After Noop" not in err         # did not


def test_timing_and_statistics(capsys):
    rc, _, err = opt(capsys, *TINY, "--pass-pipeline", REWRITE, "--timing", "--pass-statistics")
    assert rc == 0
    assert "Pass execution timing report" in err and "test-noop" in err
    assert "'test-relu-to-sigmoid'" in err and "(1) num_rewritten" in err


@pytest.mark.parametrize("flags", [["--disable-pass=test-relu-to-sigmoid"],
                                   ["--bisect-limit=0"]])
def test_disable_and_bisect_skip_passes(capsys, flags):
    rc, out, _ = opt(capsys, *TINY, "--pass-pipeline", REWRITE, *flags)
    assert rc == 0 and "sigmoid" not in out.split("\n", 1)[1]


def test_verify_each_catches_a_dishonest_pass_unless_disabled(capsys):
    rc, _, err = opt(capsys, *TINY, "--pass-pipeline", "graph(test-dishonest)")
    assert rc == 2 and "reported modified=False but changed" in err
    rc, out, _ = opt(capsys, *TINY, "--pass-pipeline", "graph(test-dishonest)",
                     "--no-verify-each")
    assert rc == 0 and "sigmoid" in out


def test_output_formats(capsys):
    rc, out, _ = opt(capsys, *TINY, "--pass-pipeline", REWRITE, "--output-format", "json")
    assert rc == 0 and json.loads(out)["pipeline"].startswith("graph(test-relu")
    rc, out, _ = opt(capsys, *TINY, "--output-format", "table")
    assert rc == 0 and "TOTAL" in out


def test_reproducer_dir_writes_files_and_replays(capsys, tmp_path):
    repro = tmp_path / "repro"
    rc, _, err = opt(capsys, *TINY, "--pass-pipeline",
                     "graph(test-relu-to-sigmoid,test-fail)",
                     "--reproducer-dir", str(repro), "--print-ir-after-failure")
    assert rc == 2
    assert "pass 'test-fail' (element 1 of the pipeline) failed" in err
    assert f"reproducer: {repro}" in err
    assert "IR Dump After Failure Fail (test-fail)" in err
    for name in ("pipeline.txt", "graph.py", "graph.fxir", "state_dict.pt", "command.txt",
                 "graph.pt"):
        assert (repro / name).exists(), name
    assert (repro / "pipeline.txt").read_text().strip() == \
        "graph(test-relu-to-sigmoid{limit=-1},test-fail)"
    # the saved graph (before the failing pass) loads back and runs
    rc, out, _ = opt(capsys, "--graph", str(repro / "graph.pt"), "--input-shape", "1,3,8,8",
                     "--pass-pipeline", "graph(test-noop)")
    assert rc == 0 and "sigmoid" in out and "f32[1,8,8,8]" in out
    # the recorded command replays only the failing pass, and fails the same way
    command = shlex.split((repro / "command.txt").read_text())
    assert command[:3] == ["python", "-m", "tools.qpass_opt"]
    assert "--pass-pipeline=graph(test-fail)" in command
    rc, _, err = opt(capsys, *command[3:])
    assert rc == 2 and "pass 'test-fail' (element 0 of the pipeline) failed" in err


def test_reproducer_keeps_annotations_and_properties(capsys, tmp_path):
    repro = tmp_path / "repro"
    rc, _, err = opt(capsys, *TINY, "--pass-pipeline",
                     "graph(annotate-bitwidths{weight-bits=4},test-fail)",
                     "--reproducer-dir", str(repro))
    assert rc == 2
    sidecar = json.loads((repro / "annotations.json").read_text())
    assert "bits-annotated" in sidecar["properties"]
    assert any(e["qpasses"]["weight"]["bits"] == 4 for e in sidecar["annotations"].values())
    command = shlex.split((repro / "command.txt").read_text())
    assert any(a.startswith("--assume=") and "bits-annotated" in a for a in command)
    rc, out, _ = opt(capsys, "--graph", str(repro / "graph.pt"), "--pass-pipeline",
                     "graph(test-noop)", "--input-shape", "1,3,8,8")
    assert rc == 0 and "w=i4" in out


def test_load_plugin(capsys):
    rc, out, _ = opt(capsys, "--load-plugin", "tests.fake_passes", "--pass-pipeline",
                     "graph(test-noop)", "--dump-pipeline")
    assert rc == 0 and out == "graph(test-noop)\n"


@pytest.mark.parametrize("args,message", [
    ([], "nothing to do"),
    (["--model", "x:y", "--graph", "g.pt"], "give exactly one of --model SPEC or --graph PATH"),
    (["--graph", "/nonexistent/graph.pt"], "no such file"),
    (["--pass-pipeline", "graph(test-noop"], "pipeline:1:6: error: unbalanced '('"),
    (["--dump-pipeline"], "--dump-pipeline needs --pass-pipeline"),
    (["--load-plugin", "tests.tools.nope"], "cannot import module 'tests.tools.nope'"),
])
def test_bad_inputs_exit_2(capsys, args, message):
    rc, out, err = opt(capsys, *args)
    assert rc == 2 and message in err and "Traceback" not in err


def test_reproducer_command_names_this_tool():
    # The Reproducer's replay command must be a command line this tool accepts.
    args = qpass_opt.make_parser().parse_args(["--graph", "g.pt", "--pass-pipeline=graph(x)"])
    assert args.graph == "g.pt" and args.pass_pipeline == "graph(x)"
    assert os.path.exists(os.path.join(os.path.dirname(qpass_opt.__file__), "qpass_opt.py"))
