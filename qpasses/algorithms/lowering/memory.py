"""Memory of the lowering: the bytes a conv/linear layer's lowering needs, the bytes this process
may still allocate, and :class:`~qpasses.errors.LoweringMemoryError` raised before a layer whose
temporaries cannot fit (:func:`check_layer_memory`) or converted from the allocator's failure
inside it (:func:`layer_memory_guard`).

Where the weight quantizer gives the codes itself (its fast path,
``WeightFakeQuant.integer_codes``), a layer's lowering holds only the codes (one byte per weight
for 8-bit symmetric codes; ``integer_codes_bytes``: the grid's dtype plus a possible narrower
copy). Otherwise it holds, at its peak, the fake-quantized weight (float32) and the codes the
integer layer keeps (the narrowest integer type: one byte for codes of up to 8 bits, two up to
16): :data:`LAYER_BYTES_PER_WEIGHT` bytes per weight element. The grid check runs over blocks of
kernels in two reused 1 MiB buffers (``numerics.weight_codes``), so no other weight-sized
temporary exists; measured: 5.1 bytes per weight for 8-bit codes
(``tests/passes/test_lowering_memory.py``). The float64 reference path, taken only for weights
off the float32 shortcut, needs more and is covered by the converted allocator failure. The
bytes available are ``MemAvailable`` (``/proc/meminfo``), lowered by the ``RLIMIT_AS`` /
``RLIMIT_DATA`` headroom when a limit is set (``VmSize`` / ``VmData`` from
``/proc/self/status``); None where neither is known (not Linux), and then only the allocator's
failure is converted.
"""
from __future__ import annotations

import contextlib
import re
import resource
from collections.abc import Iterator

from qpasses.errors import LoweringMemoryError

__all__ = ["CHECK_FROM_BYTES", "LAYER_BYTES_PER_WEIGHT", "available_bytes",
           "check_layer_memory", "layer_memory_guard", "layer_bytes"]

# float32 fake-quant weight 4 + codes of up to 16 bits 2
LAYER_BYTES_PER_WEIGHT = 6
# layers needing less are not checked ahead (an allocator failure is still converted)
CHECK_FROM_BYTES = 16 * 2 ** 20
_ALLOC_BYTES = re.compile(r"tried to allocate (\d+) bytes")


def layer_bytes(num_weights: int, bytes_per_weight: int = LAYER_BYTES_PER_WEIGHT) -> int:
    """Peak bytes the lowering of a layer with ``num_weights`` weights allocates
    (``bytes_per_weight``: less where the quantizer gives the codes itself)."""
    return bytes_per_weight * int(num_weights)


def _kib_fields(path: str, names: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in names:
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def available_bytes() -> int | None:
    """Bytes this process can still allocate: ``MemAvailable``, capped by the headroom under
    ``RLIMIT_AS`` (above ``VmSize``) and ``RLIMIT_DATA`` (above ``VmData``); None if unknown."""
    candidates = []
    mem = _kib_fields("/proc/meminfo", ("MemAvailable",))
    if "MemAvailable" in mem:
        candidates.append(mem["MemAvailable"])
    status = _kib_fields("/proc/self/status", ("VmSize", "VmData"))
    for limit_name, field in (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")):
        limit = getattr(resource, limit_name, None)
        if limit is None or field not in status:
            continue
        soft = resource.getrlimit(limit)[0]
        if soft != resource.RLIM_INFINITY:
            candidates.append(max(0, soft - status[field]))
    return min(candidates) if candidates else None


def check_layer_memory(layer: str, num_weights: int, node: str | None = None,
                       bytes_per_weight: int = LAYER_BYTES_PER_WEIGHT) -> None:
    """Raise :class:`LoweringMemoryError` when the lowering of ``layer`` (``num_weights``
    weights, :func:`layer_bytes`) needs more than :func:`available_bytes` (layers needing under
    :data:`CHECK_FROM_BYTES` are not checked)."""
    need = layer_bytes(num_weights, bytes_per_weight)
    if need < CHECK_FROM_BYTES:
        return      # reading /proc per small layer costs more than it can save
    avail = available_bytes()
    if avail is not None and need > avail:
        raise LoweringMemoryError(layer, need, avail, node=node)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e)
                                         or "Cannot allocate memory" in str(e)))


@contextlib.contextmanager
def layer_memory_guard(layer: str, num_weights: int, node: str | None = None) -> Iterator[None]:
    """Convert the allocator's out-of-memory failure (``MemoryError`` or torch's "can't allocate
    memory" ``RuntimeError``) inside the lowering of ``layer`` into :class:`LoweringMemoryError`
    (the allocation's size when the message gives it, else the layer's predicted need)."""
    try:
        yield
    except LoweringMemoryError:
        raise
    except (MemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        m = _ALLOC_BYTES.search(str(e))
        need = int(m.group(1)) if m else layer_bytes(num_weights)
        raise LoweringMemoryError(layer, need, available_bytes(), node=node,
                                  detail=f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
