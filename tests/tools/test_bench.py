"""tools/bench.py runs its sections and writes JSON (on a tiny model, one repeat)."""
from __future__ import annotations

import json

import tests.fake_passes  # noqa: F401  (registers the test-* passes)
from tools import bench


def test_fold_vs_torchao_section_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--only", "fold-vs-torchao", "--repeat", "1", "--warmup", "0",
                     "--model", "tests.models:tiny_cnn", "--input-shape", "1,3,8,8",
                     "--pipeline", "graph(test-noop)", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "torch.ao: prepare_fx+convert_fx" in text and "ratio vs torch.ao" in text
    data = json.loads(out.read_text())
    (sec,) = data["sections"]
    assert sec["name"] == "fold-vs-torchao" and sec["skipped"] is None
    rows = {r["what"]: r for r in sec["rows"]}
    total = rows["ours: parse+trace+run, verify-each on (default)"]
    assert total["median_s"] > 0 and total["ratio"] > 0


def test_sections_are_listed(capsys):
    assert bench.main(["--list"]) == 0
    assert "fold-vs-torchao" in capsys.readouterr().out


def test_a_pipeline_that_does_not_build_skips_the_section(capsys):
    rc = bench.main(["--only", "fold-vs-torchao", "--repeat", "1", "--warmup", "0",
                     "--model", "tests.models:tiny_cnn", "--input-shape", "1,3,8,8",
                     "--pipeline", "graph(no-such-pass)"])
    assert rc == 0 and "skipped: pipeline does not build" in capsys.readouterr().out
