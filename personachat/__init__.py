"""PersonaChat: see and steer the personas inside language models.

The package reads as the data flows: ``prompts``/``datasets`` -> ``model`` -> ``sites`` ->
``hooks`` -> ``activations`` -> ``vectors``/``neurons`` -> ``store`` -> ``interventions`` ->
``chat`` -> ``ui``. Importing it loads no model, opens no store and imports nothing heavy: each
public name below is imported from its module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ChatEngine": "chat",
    "ChatUpdate": "chat",
    "GenerationSettings": "chat",
    "PersonaDataset": "datasets",
    "load_dataset": "datasets",
    "extract_vectors": "extract",
    "find_neurons": "extract",
    "register_results": "extract",
    "intervene": "hooks",
    "AblationSpec": "interventions",
    "DirectionSpec": "interventions",
    "InterventionError": "interventions",
    "SteeringSpec": "interventions",
    "LoadedModel": "model",
    "ModelInfo": "model",
    "load_model": "model",
    "LayerMetrics": "records",
    "NeuronSet": "records",
    "Persona": "records",
    "PersonaMeans": "records",
    "PersonaVector": "records",
    "LAYER_CONVENTION": "sites",
    "ModelSites": "sites",
    "SiteTemplates": "sites",
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
