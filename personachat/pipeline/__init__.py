"""The extraction pipeline: dataset + model -> responses -> vectors and neurons -> store."""

from __future__ import annotations

from personachat.pipeline.extract import (
    ExtractionResult,
    RunOptions,
    SummaryRow,
    add_model_args,
    add_run_args,
    check_layers,
    extract_pairs,
    extract_vectors,
    find_neurons,
    format_summary,
    load,
    model_configs,
    parse_layers,
    parse_list,
    register_results,
    run_options,
    save_results,
    select_personas,
)

__all__ = [
    "ExtractionResult",
    "RunOptions",
    "SummaryRow",
    "add_model_args",
    "add_run_args",
    "check_layers",
    "extract_pairs",
    "extract_vectors",
    "find_neurons",
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
