"""Lowering an emulating fake-quant graph (``emulate-int-sim``): check that the lowering contract is
the emulated one, take the recorded ranges, remove the emulation nodes
(:func:`prepare_emulated`)."""
from __future__ import annotations

from typing import Any

import torch.fx

from passes_registry import get_record, pop_record

from qpasses.errors import EmulationContractError
from qpasses.ir.records import EMULATION_KEY, EmulationRecord
from qpasses.modules.emulation import is_emulating, strip_emulation
from qpasses.algorithms.lowering.config import LoweringOptions
from qpasses.algorithms.lowering.record import fake_quant_copy

__all__ = ["contract_text", "prepare_emulated"]


def contract_text(contract: dict[str, Any]) -> str:
    """``rounding=... multiplier-bits=... lut-bits=... gate-bits=... bias-frac-bits=...``."""
    return " ".join(f"{k.replace('_', '-')}={'none' if v is None else v}"
                    for k, v in contract.items())


def prepare_emulated(gm: torch.fx.GraphModule, options: LoweringOptions, owner: str
                     ) -> tuple[dict[str, tuple[float, float]], torch.fx.GraphModule | None] | None:
    """For a graph carrying an :class:`~qpasses.ir.records.EmulationRecord`: raise
    :class:`EmulationContractError` when ``options`` differ from the emulated contract; else
    remove the record and the emulation nodes (in place) and return (the recorded ranges, a copy
    of the emulating graph when ``options.keep_fake_quant`` and it had emulation nodes). None for
    any other graph."""
    rec: EmulationRecord | None = get_record(gm, EMULATION_KEY)
    if rec is None:
        return None
    want = rec.contract()
    got = {k: getattr(options, k) for k in want}
    if got != want:
        diff = ", ".join(f"{k.replace('_', '-')}: emulated {want[k]!r}, lowering {got[k]!r}"
                         for k in want if want[k] != got[k])
        raise EmulationContractError(
            f"{owner}: this graph emulates the integer contract '{contract_text(want)}' "
            f"(emulate-int-sim) but is being lowered with '{contract_text(got)}' ({diff}); lower "
            f"it with the emulated contract, or run emulate-int-sim again with the new one "
            f"(then train/evaluate again)")
    source = None
    if options.keep_fake_quant and is_emulating(gm):
        source = fake_quant_copy(gm)      # shares the weights
    strip_emulation(gm)
    pop_record(gm, EMULATION_KEY)
    return dict(rec.ranges), source
