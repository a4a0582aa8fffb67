"""Every registered pass, imported explicitly so registration order is deterministic."""
from .canonicalize import canonicalize, dce, fold_batch_norm  # noqa: F401
from .quantize import annotate_bitwidths  # noqa: F401
