"""Graph records: registration, accessors, printing, fingerprints and the pass manager's checks
(validation, honesty, ``writes_records`` and ``requires_records``), with test-records-* passes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.fx
from torch import nn

from passes_registry import (Pass, PassContext, PassManager, PassResult, PreservedAnalyses,
                             RecordError, RegistryError, VerificationError, fingerprint,
                             get_record, has_record, pop_record, print_graph, record_problems,
                             record_to_json, register_graph_record, register_pass, set_record)

KEY = "test.records.counter"
LOG_KEY = "test.records.log"
HIDDEN_KEY = "test.records.hidden"


@dataclass(frozen=True)
class Counter:
    """A test record: ``value`` is its value, ``memo`` a memo outside it, ``attached`` an object
    fingerprinted by identity."""
    value: int
    memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    attached: Any = field(default=None, compare=False, repr=False,
                          metadata={"fingerprint": "identity"})

    def problems(self) -> list[str]:
        return [] if self.value >= 0 else [f"value must be >= 0, got {self.value}"]


@dataclass(frozen=True)
class Log:
    """A test log record (not fingerprinted)."""
    lines: tuple[str, ...] = ()


def _register_counter() -> None:
    register_graph_record(KEY, Counter, summary="test counter", validate=lambda r: r.problems(),
                          format=lambda r: f"value={r.value}")


_register_counter()
register_graph_record(LOG_KEY, Log, summary="test log", format=lambda r: f"{len(r.lines)} lines",
                      fingerprinted=False)
register_graph_record(HIDDEN_KEY, str, summary="test record without a printer")


@dataclass(frozen=True)
class ValueOptions:
    value: int = field(default=1, metadata={"help": "the counter value to write"})


@register_pass
class RecordsWrite(Pass):
    """Sets the test counter record and reports the change."""
    name = "test-records-write"
    summary = "set the test counter record"
    Options = ValueOptions
    preserves = PreservedAnalyses.all()
    writes_records = frozenset({KEY})

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        old = get_record(gm, KEY)
        set_record(gm, KEY, Counter(self.options.value))
        return PassResult(modified=old is None or old.value != self.options.value)


@register_pass
class RecordsWriteSilently(Pass):
    """Sets the test counter record but reports modified=False (dishonest)."""
    name = "test-records-write-silently"
    summary = "set the test counter record without reporting it"
    preserves = PreservedAnalyses.all()
    writes_records = frozenset({KEY})

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        old = get_record(gm, KEY, Counter(0))
        set_record(gm, KEY, Counter(old.value + 1))
        return PassResult(modified=False)


@register_pass
class RecordsWriteUndeclared(Pass):
    """Sets the test counter record without declaring it in writes_records."""
    name = "test-records-write-undeclared"
    summary = "set the test counter record, undeclared"
    preserves = PreservedAnalyses.all()

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        set_record(gm, KEY, Counter(get_record(gm, KEY, Counter(0)).value + 1))
        return PassResult(modified=True)


@register_pass
class RecordsWriteInvalid(Pass):
    """Stores a value of the wrong type under the counter key, bypassing set_record."""
    name = "test-records-write-invalid"
    summary = "store an invalid counter record"
    preserves = PreservedAnalyses.all()
    writes_records = frozenset({KEY})

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        gm.meta[KEY] = {"value": 3}
        return PassResult(modified=True)


@register_pass
class RecordsRead(Pass):
    """Requires the counter record; changes nothing."""
    name = "test-records-read"
    summary = "read the test counter record"
    preserves = PreservedAnalyses.all()
    requires_records = frozenset({KEY})

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        assert get_record(gm, KEY) is not None
        return PassResult(modified=False)


@register_pass
class RecordsLog(Pass):
    """Appends a line to the (unfingerprinted) log record and reports no change."""
    name = "test-records-log"
    summary = "append to the test log record"
    preserves = PreservedAnalyses.all()

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        log = get_record(gm, LOG_KEY, Log())
        set_record(gm, LOG_KEY, Log(log.lines + ("ran",)))
        return PassResult(modified=False)


def _graph() -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(nn.Sequential(nn.ReLU()))


# ---------------------------------------------------------------------------------------------
# registration and accessors


def test_register_graph_record_checks_key_and_type():
    _register_counter()  # again, with the same type: allowed (a re-imported module)
    with pytest.raises(RegistryError, match="already registered with type Counter"):
        register_graph_record(KEY, Log)
    with pytest.raises(RegistryError, match="must be a class"):
        register_graph_record("test.records.bad", "Counter")  # type: ignore[arg-type]
    with pytest.raises(RegistryError, match="non-empty string"):
        register_graph_record("", Counter)


def test_register_pass_checks_record_declarations():
    class BadDeclaration(Pass):
        """Declares its records as a list."""
        name = "test-records-bad-declaration"
        writes_records = [KEY]  # type: ignore[assignment]

    with pytest.raises(RegistryError, match="writes_records must be a frozenset"):
        register_pass(BadDeclaration)


def test_set_get_has_pop():
    gm = _graph()
    assert not has_record(gm, KEY) and get_record(gm, KEY) is None
    assert get_record(gm, KEY, "default") == "default"
    set_record(gm, KEY, Counter(2))
    assert has_record(gm, KEY) and get_record(gm, KEY) == Counter(2)
    assert pop_record(gm, KEY) == Counter(2)
    assert not has_record(gm, KEY) and pop_record(gm, KEY) is None


def test_set_record_validates_type_and_value():
    gm = _graph()
    with pytest.raises(RecordError, match="'test.records.counter' must be a Counter, got dict"):
        set_record(gm, KEY, {"value": 1})
    with pytest.raises(RecordError, match="value must be >= 0"):
        set_record(gm, KEY, Counter(-1))
    assert KEY not in gm.meta
    assert record_problems(KEY, Counter(1)) == []


def test_unregistered_key_is_a_record_error_with_a_suggestion():
    with pytest.raises(RecordError, match="not a registered graph record.*test.records.counter"):
        get_record(_graph(), "test.records.countr")


def test_record_to_json_keeps_value_fields_only():
    rec = Counter(3, memo={"x": 1}, attached=object())
    assert record_to_json(rec) == {"value": 3}
    assert record_to_json(Log(("a", "b"))) == {"lines": ["a", "b"]}


# ---------------------------------------------------------------------------------------------
# printing and fingerprints


def test_print_graph_shows_printable_records_before_the_graph():
    gm = _graph()
    plain = print_graph(gm)
    assert "record" not in plain
    set_record(gm, HIDDEN_KEY, "not printed")
    assert print_graph(gm) == plain
    set_record(gm, KEY, Counter(3))
    set_record(gm, LOG_KEY, Log(("a",)))
    lines = print_graph(gm, header="pipeline").splitlines()
    assert lines[:4] == ["// pipeline", "// record test.records.counter: value=3",
                         "// record test.records.log: 1 lines", "graph {"]


def test_fingerprint_covers_record_values_only():
    gm = _graph()
    empty = fingerprint(gm)
    assert "records" in empty
    set_record(gm, KEY, Counter(1))
    one = fingerprint(gm)
    assert one["records"] != empty["records"]
    assert {k for k in one if one[k] != empty[k]} == {"records"}
    get_record(gm, KEY).memo["cached"] = 1           # a memo is not part of the value
    assert fingerprint(gm) == one
    set_record(gm, LOG_KEY, Log(("a",)))             # logs are not fingerprinted
    assert fingerprint(gm) == one
    set_record(gm, HIDDEN_KEY, "x")                  # unprinted records are
    assert fingerprint(gm) != one


def test_identity_fields_are_fingerprinted_by_identity():
    gm = _graph()
    kept = _graph()
    set_record(gm, KEY, Counter(1, attached=kept))
    before = fingerprint(gm)
    kept.meta["changed"] = True                      # contents are not hashed
    assert fingerprint(gm) == before
    set_record(gm, KEY, Counter(1, attached=_graph()))
    assert fingerprint(gm) != before


# ---------------------------------------------------------------------------------------------
# the pass manager


def test_pass_writing_a_record_reports_it():
    gm = PassManager.parse("graph(test-records-write{value=4})").run(_graph())
    assert get_record(gm, KEY) == Counter(4)
    # the same value again: modified=False, and the fingerprints agree
    PassManager.parse("graph(test-records-write{value=4})").run(gm)


def test_unreported_record_change_is_caught():
    with pytest.raises(VerificationError,
                       match="reported modified=False but changed the graph's records"):
        PassManager.parse("graph(test-records-write-silently)").run(_graph())
    gm = PassManager.parse("graph(test-records-write-silently)").run(
        _graph(), PassContext(verify_each=False))
    assert get_record(gm, KEY) == Counter(1)


def test_undeclared_record_write_is_caught():
    with pytest.raises(VerificationError) as info:
        PassManager.parse("graph(test-records-write-undeclared)").run(_graph())
    msg = str(info.value)
    assert "pass 'test-records-write-undeclared'" in msg
    assert "changed graph record 'test.records.counter'" in msg and "writes_records" in msg


def test_invalid_record_is_caught_under_verify_each():
    with pytest.raises(VerificationError, match="invalid graph record: graph record "
                                                "'test.records.counter' must be a Counter"):
        PassManager.parse("graph(test-records-write-invalid)").run(_graph())


def test_required_record_missing_names_pass_record_and_writer():
    with pytest.raises(RecordError) as info:
        PassManager.parse("graph(test-records-read)").run(_graph())
    err = info.value
    assert err.record == KEY and err.pass_name == "test-records-read"
    msg = str(err)
    assert "pass 'test-records-read' (element 0 of graph(test-records-read)) requires graph " \
           "record 'test.records.counter', which the graph does not have" in msg
    assert "(run 'test-records-write' or 'test-records-write-invalid' or " \
           "'test-records-write-silently' first)" in msg
    PassManager.parse("graph(test-records-write,test-records-read)").run(_graph())


def test_log_records_may_grow_without_reporting_a_change():
    gm = PassManager.parse("graph(test-records-log,test-records-log)").run(_graph())
    assert get_record(gm, LOG_KEY).lines == ("ran", "ran")
