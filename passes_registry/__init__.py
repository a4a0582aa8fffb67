"""passes_registry: generic MLIR-style pass infrastructure for torch.fx graphs.

Knows nothing about quantization: passes, options, textual pipelines, the pass manager, the
analysis manager, instruments, properties and annotation keys. qpasses registers its passes here.
"""
from . import builtin_passes  # noqa: F401  (registers print<>, require<>, invalidate<>)
from .analysis_manager import Analysis, AnalysisManager
from .context import ALL, PassContext
from .errors import (AnalysisError, OptionError, PassesError, PassFailure, PipelineParseError,
                     PropertyError, RegistryError, StaleAnalysisError, VerificationError)
from .instrument import Instrument, IRPrinter, Reproducer, Statistics, Timing
from .options import NoOptions, OptionInfo, build_options, format_options, option_infos
from .pass_base import ParametricPass, Pass, PassResult, PreservedAnalyses, function_pass
from .pass_manager import PassManager, graph_history, graph_properties
from .pipeline import Nested, OptionParseError, Pipeline, parse_pipeline, print_pipeline
from .printing import fingerprint, format_node, print_graph
from .registry import (analysis_names, list_passes, lookup_analysis, lookup_pass,
                       lookup_pipeline, lookup_property, pass_names, pipeline_names,
                       property_names, register_analysis, register_annotation_key,
                       register_pass, register_pipeline, register_property)

__all__ = [
    "ALL", "Analysis", "AnalysisError", "AnalysisManager", "IRPrinter", "Instrument", "Nested",
    "NoOptions", "OptionError", "OptionInfo", "OptionParseError", "ParametricPass", "Pass",
    "PassContext", "PassFailure", "PassManager", "PassResult", "PassesError", "Pipeline",
    "PipelineParseError", "PreservedAnalyses", "PropertyError", "RegistryError", "Reproducer",
    "StaleAnalysisError", "Statistics", "Timing", "VerificationError", "analysis_names",
    "build_options", "fingerprint", "format_node", "format_options", "function_pass",
    "graph_history", "graph_properties", "list_passes", "lookup_analysis", "lookup_pass",
    "lookup_pipeline", "lookup_property", "option_infos", "parse_pipeline", "pass_names",
    "pipeline_names", "print_graph", "print_pipeline", "property_names", "register_analysis",
    "register_annotation_key", "register_pass", "register_pipeline", "register_property",
]
