"""Registered pipelines with ``keep_name``: one printed element, passes run one by one."""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import pytest

import qpasses  # noqa: F401
from passes_registry import (NamedPipeline, OptionError, Pass, PassContext, PassManager,
                             PassResult, PropertyError, format_options, graph_history,
                             parse_pipeline, register_pass, register_pipeline, register_property)

from tests.fake_passes import relu_nodes
from tests.models import relu_graph

register_property("test-infra-grouped", lambda gm: [] if gm.meta.get("grouped") else ["no"])


@register_pass
class GroupFirst(Pass):
    """Establishes test-infra-grouped."""
    name = "test-infra-group-first"
    establishes = frozenset({"test-infra-grouped"})

    @dataclass(frozen=True)
    class Options:
        limit: int = field(default=-1, metadata={"help": "passed on from the pipeline"})

    def run(self, gm, ctx, am):
        gm.meta["grouped"] = True
        return PassResult(modified=False, stats={"num_first": 1})


@register_pass
class NeedsGroup(Pass):
    """Requires test-infra-grouped."""
    name = "test-infra-needs-grouped"
    requires = frozenset({"test-infra-grouped"})

    def run(self, gm, ctx, am):
        return PassResult(modified=False)


@dataclass(frozen=True)
class GroupOptions:
    limit: int = field(default=-1, metadata={"help": "relus to rewrite (-1: all)"})

    def __post_init__(self) -> None:
        if self.limit < -1:
            raise OptionError("test-infra-group", "limit", f"must be >= -1, got {self.limit}")


def group(opts: GroupOptions) -> str:
    """Mark, rewrite relus, check the mark."""
    return ("graph(test-infra-group-first" + format_options(opts)
            + f",test-relu-to-sigmoid{{limit={opts.limit}}},test-infra-needs-grouped)")


register_pipeline("test-infra-group", group, options=GroupOptions, keep_name=True,
                  summary="a pipeline printed by its name")

INNER = ["test-infra-group-first", "test-relu-to-sigmoid", "test-infra-needs-grouped"]


def test_prints_as_its_name_and_round_trips():
    p = parse_pipeline("graph(test-infra-mark,test-infra-group{limit=1})")
    assert p.to_text() == "graph(test-infra-mark,test-infra-group{limit=1})"
    assert parse_pipeline(p.to_text()) == p
    elem = p.elements[1]
    assert isinstance(elem, NamedPipeline) and elem.name == "test-infra-group"
    assert [q.name for q in p.flat_passes()] == ["test-infra-mark"] + INNER
    assert str(PassManager().add("test-infra-group", limit=1)) == "graph(test-infra-group{limit=1})"


def test_options_are_validated_like_a_pass():
    with pytest.raises(OptionError, match="must be >= -1") as info:
        PassManager.parse("graph(test-infra-group{limit=-5})")
    assert info.value.option == "limit"


def test_passes_run_time_print_and_bisect_one_by_one():
    gm = relu_graph()
    out = io.StringIO()
    ctx = PassContext(print_after="test-relu-to-sigmoid", print_stream=out, statistics=True)
    PassManager.parse("graph(test-infra-group{limit=1})").run(gm, ctx)
    assert len(relu_nodes(gm)) == 1
    assert [r["name"] for r in graph_history(gm)["passes"]] == INNER
    assert graph_history(gm)["pipeline"] == ["graph(test-infra-group{limit=1})"]
    text = out.getvalue()
    assert "IR Dump After" in text and "(test-relu-to-sigmoid)" in text
    assert "num_first" in text and "num_rewritten" in text
    gm = relu_graph()
    PassManager.parse("graph(test-infra-group)").run(gm, PassContext(bisect_limit=1))
    assert len(relu_nodes(gm)) == 2 and gm.meta["grouped"]     # only the first pass ran


def test_requires_inside_and_hint_names_the_pipeline():
    with pytest.raises(PropertyError) as info:
        PassManager.parse("graph(test-infra-needs-grouped)", assume=())
    assert "add 'test-infra-group' before it" in str(info.value)
    PassManager.parse("graph(test-infra-group,test-infra-needs-grouped)")
