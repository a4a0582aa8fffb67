"""qpasses: torch.fx passes for mixed-precision quantization.

Importing qpasses registers its passes, analyses, properties and the ``node.meta["qpasses"]``
annotation key with passes_registry.
"""
from passes_registry import register_annotation_key

from qpasses import errors
from qpasses.ir.layers import LayerInfo, first_last_layers, quantizable_layers, to_networkx
from qpasses.ir.annotations import (QMETA_KEY, QMeta, QuantSpec, get_qmeta, update_qmeta,
                                    validate_qmeta_value, format_qmeta_value)
from qpasses.report import format_table, report
from qpasses.ir.trace import trace

register_annotation_key(QMETA_KEY, validate=validate_qmeta_value, format=format_qmeta_value,
                        to_json=QMeta.to_dict, from_json=QMeta.from_dict)

# Registration by explicit import, in a deterministic order.
from qpasses.analyses import properties  # noqa: E402,F401
from qpasses import analyses  # noqa: E402,F401
from qpasses import passes  # noqa: E402,F401

__all__ = [
    "LayerInfo", "QMETA_KEY", "QMeta", "QuantSpec", "errors", "first_last_layers", "format_table",
    "get_qmeta", "quantizable_layers", "report", "to_networkx", "trace", "update_qmeta",
]
from qpasses import pipelines  # noqa: E402,F401
