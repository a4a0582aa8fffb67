"""qpasses: torch.fx passes for mixed-precision quantization.

Importing qpasses registers its passes, analyses, properties and the ``node.meta["qpasses"]``
annotation key with passes_registry.
"""
from passes_registry import register_annotation_key

from . import errors
from .graph import LayerInfo, first_last_layers, quantizable_layers, to_networkx
from .meta import QMETA_KEY, QMeta, QuantSpec, get_qmeta, update_qmeta, validate_qmeta_value, format_qmeta_value
from .report import format_table, report
from .trace import trace

register_annotation_key(QMETA_KEY, validate=validate_qmeta_value, format=format_qmeta_value,
                        to_json=QMeta.to_dict, from_json=QMeta.from_dict)

# Registration by explicit import, in a deterministic order.
from . import properties  # noqa: E402,F401
from . import passes  # noqa: E402,F401

__all__ = [
    "LayerInfo", "QMETA_KEY", "QMeta", "QuantSpec", "errors", "first_last_layers", "format_table",
    "get_qmeta", "quantizable_layers", "report", "to_networkx", "trace", "update_qmeta",
]
from . import pipelines  # noqa: E402,F401
