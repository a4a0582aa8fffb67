"""The lowering-memory benchmark section: the child's measurements (in process, no cap), the
parent's cap fallback and its notes."""
from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import torch

import tools.bench_lowering as bl


def test_child_lowers_and_measures_a_small_model():
    threads = torch.get_num_threads()
    try:
        r = bl.child("mobilenet_v3_small", "none", 1 << 40)
    finally:
        torch.set_num_threads(threads)
    assert r.get("ok"), r
    assert r["cap"] == "none" and r["weights_bytes"] > 9 * 2 ** 20
    assert r["activation_bytes"] > 0 and r["lowering_s"] > 0
    assert set(r["passes_s"]) >= {"lower-fake-quant-ops", "fuse-requantize", "cleanup-int-sim"}
    assert r["peak_growth_bytes"] is not None and r["rss_before_lowering"] > 0
    note = bl._note(r)
    assert note.startswith("mobilenet_v3_small: ok under cap none") and "growth / 2x" in note


def test_parent_falls_back_when_a_cap_stops_the_import(monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        method = cmd[cmd.index("--method") + 1]
        calls.append(method)
        row = {"model": "m", "cap": method, "stage": "import", "error": "MemoryError: x"} \
            if method == "data" else {"model": "m", "cap": "RLIMIT_AS", "cap_bytes": 1,
                                      "weights_bytes": 4, "activation_bytes": 0, "ok": True,
                                      "lowering_s": 0.5, "peak_growth_bytes": 8,
                                      "rss_before_lowering": 0}
        return SimpleNamespace(stdout="noise\n" + json.dumps(row) + "\n", stderr="",
                               returncode=0)
    monkeypatch.setattr(subprocess, "run", fake_run)
    sec = bl.bench_lowering_memory(SimpleNamespace(mem_model=["m"], mem_cap_gib=1.0))
    assert calls == ["data", "as"]
    assert sec.rows[0].what == "m: lower-to-int-sim" and sec.rows[0].ratio == 1.0
    assert "m: ok under cap RLIMIT_AS" in sec.notes[0]


def test_failure_is_reported_not_raised(monkeypatch):
    def fake_run(cmd, **kw):
        row = {"model": "m", "cap": "RLIMIT_DATA", "cap_bytes": 2 ** 30, "weights_bytes": 4,
               "stage": "lower", "error": "LoweringMemoryError: pass ... needs 9 bytes",
               "peak_rss_bytes": 2 ** 30}
        return SimpleNamespace(stdout=json.dumps(row), stderr="", returncode=0)
    monkeypatch.setattr(subprocess, "run", fake_run)
    sec = bl.bench_lowering_memory(SimpleNamespace(mem_model=["m"], mem_cap_gib=1.0))
    assert not sec.rows and "FAILED at lower" in sec.notes[0] and "needs 9 bytes" in sec.notes[0]
