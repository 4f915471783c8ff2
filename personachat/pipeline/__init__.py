"""The extraction pipeline: dataset + model -> responses -> vectors and neurons -> store."""

from __future__ import annotations

from personachat.pipeline.axis import AXIS_METHODS, AXIS_PERSONA, extract_axis
from personachat.pipeline.neurons import find_neurons
from personachat.pipeline.options import (
    ModelConfig,
    RunOptions,
    add_model_args,
    add_run_args,
    load,
    model_configs,
    parse_layers,
    parse_list,
    run_options,
)
from personachat.pipeline.register import (
    format_run,
    format_summary,
    register_results,
    save_results,
)
from personachat.pipeline.scorers import SCORERS, Scorer, Scores, Scoring
from personachat.pipeline.selection import check_layers, select_personas
from personachat.pipeline.vectors import (
    ExtractionResult,
    SummaryRow,
    extract_pairs,
    extract_vectors,
)
from personachat.pipeline.vllm import ENGINES, EngineError, check_engine

__all__ = [
    "AXIS_METHODS",
    "AXIS_PERSONA",
    "ENGINES",
    "SCORERS",
    "EngineError",
    "ExtractionResult",
    "ModelConfig",
    "RunOptions",
    "Scorer",
    "Scores",
    "Scoring",
    "SummaryRow",
    "add_model_args",
    "add_run_args",
    "check_engine",
    "check_layers",
    "extract_axis",
    "extract_pairs",
    "extract_vectors",
    "find_neurons",
    "format_run",
    "format_summary",
    "load",
    "model_configs",
    "parse_layers",
    "parse_list",
    "register_results",
    "run_options",
    "save_results",
    "select_personas",
]
