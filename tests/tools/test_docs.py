"""Generated and quoted documentation stays in sync with the code."""
from __future__ import annotations

import os

import pytest

from tools import gen_pass_docs

REPO = gen_pass_docs.REPO


def test_passes_md_is_up_to_date():
    ok, diff = gen_pass_docs.check(gen_pass_docs.DEFAULT_OUT)
    assert ok, ("docs/passes.md is stale: run `make docs` (python -m tools.gen_pass_docs --out "
                "docs/passes.md)\n" + diff[:3000])


def test_render_is_deterministic_and_hides_test_passes():
    import tests.fake_passes  # noqa: F401  (registers the test-* passes)
    text = gen_pass_docs.render()
    assert text == gen_pass_docs.render()
    assert "test-tools" not in text
    assert "## Passes" in text and "## Pipelines" in text and "## Analyses" in text
    assert "### `print`" in text


def test_check_detects_a_stale_file(tmp_path, capsys):
    path = tmp_path / "passes.md"
    path.write_text("# old\n")
    assert gen_pass_docs.main(["--check", str(path)]) == 1
    assert "is stale" in capsys.readouterr().err
    assert gen_pass_docs.main(["--out", str(path)]) == 0
    assert gen_pass_docs.main(["--check", str(path)]) == 0


def test_docs_render_options_table():
    from passes_registry.registry import PassListing
    from passes_registry.options import option_infos
    from tests.fake_passes import ReluToSigmoid as P
    item = PassListing(P.name, "pass", P.summary, tuple(option_infos(P.Options)),
                       doc=P.__doc__, establishes=("x-prop",))
    text = "\n".join(gen_pass_docs._entry(item))
    assert "| `limit` | `int` | `-1` | rewrite at most this many (-1: all) |" in text
    assert "- Establishes: `x-prop`" in text


def _examples(rel):
    with open(os.path.join(REPO, rel)) as f:
        return gen_pass_docs.find_examples(f.read())


def test_pipeline_syntax_examples_are_real(monkeypatch):
    """Every bad pipeline quoted in docs/pipeline-syntax.md still produces the documented error."""
    monkeypatch.chdir(REPO)
    examples = _examples("docs/pipeline-syntax.md")
    assert len(examples) >= 12
    errors = [ex for ex in examples if "error:" in ex.output]
    assert len(errors) >= 10
    for ex in examples:
        actual = gen_pass_docs.run_example(ex.command)
        assert ex.output == actual, (
            f"docs/pipeline-syntax.md: `{ex.command}` now prints:\n{actual}\n"
            "run python -m tools.gen_pass_docs --update-examples")


@pytest.mark.parametrize("rel", ["docs/annotations.md", "docs/architecture.md", "README.md"])
def test_other_doc_examples_are_real(monkeypatch, rel):
    monkeypatch.chdir(REPO)
    for ex in _examples(rel):
        actual = gen_pass_docs.run_example(ex.command)
        assert ex.output == actual, (f"{rel}: `{ex.command}` now prints:\n{actual}\n"
                                     "run python -m tools.gen_pass_docs --update-examples")


def test_docs_link_to_existing_files():
    import re
    for rel in ("README.md", "docs/architecture.md", "docs/pipeline-syntax.md",
                "docs/annotations.md"):
        with open(os.path.join(REPO, rel)) as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)#]+\.md)\)", text):
            assert os.path.exists(os.path.join(REPO, os.path.dirname(rel), target)), \
                f"{rel} links to missing {target}"


def test_readme_starts_with_make_demo_and_make_test():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    first_block = text.split("```sh", 1)[1].split("```", 1)[0]
    assert first_block.strip().startswith("make demo") and "make test" in first_block
