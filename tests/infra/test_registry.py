"""Registry: registration rules, lookups, listing."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

import qpasses  # noqa: F401
from passes_registry import (OptionError, Pass, RegistryError, list_passes, lookup_pass,
                             register_pass, register_pipeline)

from tests.fake_passes import AllTypesPass


def test_reregistering_same_class_is_a_noop_and_different_class_an_error():
    assert register_pass(AllTypesPass) is AllTypesPass
    with pytest.raises(RegistryError, match="already registered by tests.fake_passes.AllTypesPass"):
        @register_pass
        class Other(Pass):
            name = "test-infra-all-types"


@pytest.mark.parametrize("bad", ["Fold", "fold_bn", "-x", "", "a b"])
def test_names_must_be_kebab_case(bad):
    cls = type("X", (Pass,), {"name": bad})
    with pytest.raises(RegistryError, match="kebab-case"):
        register_pass(cls)


def test_unsupported_option_types_rejected_at_registration():
    @dataclass(frozen=True)
    class Opts:
        x: dict = None  # type: ignore[assignment]

    cls = type("Y", (Pass,), {"name": "test-infra-bad-options", "Options": Opts})
    with pytest.raises(TypeError, match="unsupported type"):
        register_pass(cls)


def test_lookup_suggests_close_names():
    with pytest.raises(RegistryError, match="did you mean 'test-infra-mark'"):
        lookup_pass("test-infra-mrak")


def test_list_passes_includes_options_with_help():
    rows = {r.name: r for r in list_passes()}
    row = rows["test-infra-all-types"]
    assert row.kind == "pass"
    opts = {o.key: o for o in row.options}
    assert opts["count"].type_name == "int" and opts["count"].default == 3
    assert opts["bits"].type_name == "list<int>" and opts["limit"].type_name == "int?"
    assert opts["mode"].type_name == "{fast|exact}" and opts["flag"].help == "a bool"
    assert rows["print"].kind == "pass" and rows["test-infra-node-count"].kind == "analysis"


def test_registered_pipeline_expands_in_text_and_python():
    register_pipeline("test-infra-pipe", lambda o: "graph(test-infra-mark,test-infra-needs-mark)",
                      summary="mark then check")
    from passes_registry import PassManager
    pm = PassManager.parse("graph(test-infra-pipe)")
    assert str(pm) == "graph(test-infra-mark,test-infra-needs-mark)"
    assert str(PassManager().add("test-infra-pipe")) == str(pm)
    with pytest.raises(RegistryError, match="already registered as a pipeline"):
        register_pass(type("Z", (Pass,), {"name": "test-infra-pipe"}))


def test_options_instance_type_is_checked():
    with pytest.raises(OptionError, match="options must be"):
        AllTypesPass(object())
