"""passes_registry: generic MLIR-style pass infrastructure for torch.fx graphs.

Knows nothing about quantization: passes, options, textual pipelines, the pass manager, the
analysis manager, instruments, properties, annotation keys and graph records. qpasses registers
its passes here.
"""
from . import builtin_passes  # noqa: F401  (registers print<>, require<>, invalidate<>)
from .analysis_manager import Analysis, AnalysisManager
from .context import ALL, PassContext
from .errors import (AnalysisError, OptionError, PassesError, PassFailure, PipelineParseError,
                     PropertyError, RecordError, RegistryError, StaleAnalysisError,
                     UsageError, VerificationError)
from .instrument import Instrument, IRPrinter, Reproducer, Statistics, Timing
from .options import NoOptions, OptionInfo, build_options, format_options, option_infos
from .pass_base import ParametricPass, Pass, PassResult, PreservedAnalyses, function_pass
from .pass_manager import PassManager, graph_history, graph_properties
from .pipeline import (NamedPipeline, Nested, OptionParseError, Pipeline, parse_pipeline,
                       print_pipeline)
from .printing import fingerprint, format_node, print_graph
from .records import (get_record, has_record, pop_record, record_problems, record_text,
                      record_to_json, set_record)
from .registry import (analysis_names, list_passes, lookup_analysis, lookup_pass,
                       graph_records, lookup_graph_record, lookup_pipeline, lookup_property,
                       pass_names, pipeline_names, property_names, register_analysis,
                       register_annotation_key, register_graph_record, register_pass,
                       register_pipeline, register_property)

__all__ = [
    "ALL", "Analysis", "AnalysisError", "AnalysisManager", "IRPrinter", "Instrument",
    "NamedPipeline", "Nested", "NoOptions", "OptionError", "OptionInfo", "OptionParseError",
    "ParametricPass", "Pass",
    "PassContext", "PassFailure", "PassManager", "PassResult", "PassesError", "Pipeline",
    "PipelineParseError", "PreservedAnalyses", "PropertyError", "RecordError", "RegistryError",
    "Reproducer", "StaleAnalysisError", "Statistics", "Timing", "UsageError",
    "VerificationError",
    "analysis_names", "build_options", "fingerprint", "format_node", "format_options",
    "function_pass", "get_record", "graph_history", "graph_properties", "graph_records",
    "has_record", "list_passes", "lookup_analysis", "lookup_graph_record", "lookup_pass",
    "lookup_pipeline", "lookup_property", "option_infos", "parse_pipeline", "pass_names",
    "pipeline_names", "pop_record", "print_graph", "print_pipeline", "property_names",
    "record_problems", "record_text", "record_to_json", "register_analysis",
    "register_annotation_key", "register_graph_record", "register_pass", "register_pipeline",
    "register_property", "set_record",
]
