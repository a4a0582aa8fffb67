"""Shared pieces of the cost analyses: the result base class and table formatting."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch.fx
from tabulate import tabulate

from passes_registry import AnalysisError

from qpasses.algorithms.cost_model import has_bit_annotations


class LayerTable:
    """Mixin of the analysis results: frozen dataclasses with ``rows`` (one per layer, graph
    order) looked up by layer name: ``result["layer1.0.conv1"]``, ``"fc" in result``, iteration
    over rows, ``len``. Equality is the dataclass' field-wise ``==``."""

    rows: tuple[Any, ...]

    def __getitem__(self, name: str) -> Any:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no layer named '{name}' in this result")

    def __contains__(self, name: object) -> bool:
        return any(r.name == name for r in self.rows)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def names(self) -> list[str]:
        return [r.name for r in self.rows]

    def as_dict(self) -> dict[str, Any]:
        return {r.name: r for r in self.rows}


def num(x: Any) -> int | float:
    """A Python int when integral, else a float (JSON-friendly cost values)."""
    x = float(x) if not isinstance(x, int) else x
    if isinstance(x, float) and x.is_integer() and abs(x) < 2 ** 63:
        return int(x)
    return x


def bits_text(w_bits: int | None, per_kernel: Sequence[int] | None) -> str:
    if per_kernel is not None:
        ks = list(per_kernel)
        return f"{min(ks)}-{max(ks)} (avg {sum(ks) / len(ks):.2f})"
    return "-" if w_bits is None else str(w_bits)


def table(headers: list[str], body: list[list[Any]]) -> str:
    return tabulate(body, headers=headers, intfmt=",", floatfmt=".4g")


def require_annotations(gm: torch.fx.GraphModule, analysis: str) -> None:
    """Refuse to cost a graph whose layers carry no bit-width annotation at all."""
    if not has_bit_annotations(gm):
        raise AnalysisError(
            f"analysis '{analysis}' needs bit-width annotations, but no quantizable layer of the "
            "graph has any: run 'annotate-bitwidths' first (then optionally 'solve-bitwidths' or "
            "'search-mixquant'); qpasses.report() of an unannotated graph counts every layer as "
            "fp32 instead")
