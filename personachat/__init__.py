"""PersonaChat: see and steer the personas inside language models.

The package reads as the data flows: ``records`` -> ``prompts`` -> ``model`` -> ``hooks`` ->
``activations`` -> ``vectors`` / ``neurons`` -> ``store`` -> ``interventions`` -> ``chat`` ->
``pipeline`` -> ``analysis`` -> ``cli`` / ``app``. Importing it loads no model, opens no store and
imports nothing heavy: each public name below is imported from its subpackage on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from personachat.activations import Recorder as Recorder
    from personachat.chat import (
        ChatEngine as ChatEngine,
        ChatUpdate as ChatUpdate,
        GenerationSettings as GenerationSettings,
    )
    from personachat.hooks import intervene as intervene
    from personachat.interventions import (
        AblationSpec as AblationSpec,
        CapSpec as CapSpec,
        DirectionSpec as DirectionSpec,
        InterventionError as InterventionError,
        SteeringSpec as SteeringSpec,
        steer as steer,
    )
    from personachat.model import (
        LoadedModel as LoadedModel,
        ModelSites as ModelSites,
        SiteTemplates as SiteTemplates,
        load_model as load_model,
    )
    from personachat.pipeline import (
        extract_vectors as extract_vectors,
        find_neurons as find_neurons,
        register_results as register_results,
    )
    from personachat.prompts import (
        PersonaDataset as PersonaDataset,
        PromptSpans as PromptSpans,
        chat_spans as chat_spans,
        format_chat as format_chat,
        load_dataset as load_dataset,
        prompt_spans as prompt_spans,
    )
    from personachat.records import (
        LAYER_CONVENTION as LAYER_CONVENTION,
        LayerMetrics as LayerMetrics,
        ModelInfo as ModelInfo,
        NeuronSet as NeuronSet,
        Persona as Persona,
        PersonaMeans as PersonaMeans,
        PersonaVector as PersonaVector,
    )
    from personachat.store import Store as Store

_EXPORTS = {
    "Recorder": "activations",
    "ChatEngine": "chat",
    "ChatUpdate": "chat",
    "GenerationSettings": "chat",
    "intervene": "hooks",
    "AblationSpec": "interventions",
    "CapSpec": "interventions",
    "DirectionSpec": "interventions",
    "InterventionError": "interventions",
    "SteeringSpec": "interventions",
    "steer": "interventions",
    "LoadedModel": "model",
    "ModelSites": "model",
    "SiteTemplates": "model",
    "load_model": "model",
    "extract_vectors": "pipeline",
    "find_neurons": "pipeline",
    "register_results": "pipeline",
    "PersonaDataset": "prompts",
    "PromptSpans": "prompts",
    "chat_spans": "prompts",
    "format_chat": "prompts",
    "load_dataset": "prompts",
    "prompt_spans": "prompts",
    "LAYER_CONVENTION": "records",
    "LayerMetrics": "records",
    "ModelInfo": "records",
    "NeuronSet": "records",
    "Persona": "records",
    "PersonaMeans": "records",
    "PersonaVector": "records",
    "Store": "store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'personachat' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"personachat.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
