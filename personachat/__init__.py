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
    from personachat.chat import (
        ChatEngine as ChatEngine,
    )
    from personachat.chat import (
        ChatUpdate as ChatUpdate,
    )
    from personachat.chat import (
        GenerationSettings as GenerationSettings,
    )
    from personachat.hooks import (
        intervene as intervene,
    )
    from personachat.interventions import (
        AblationSpec as AblationSpec,
    )
    from personachat.interventions import (
        DirectionSpec as DirectionSpec,
    )
    from personachat.interventions import (
        InterventionError as InterventionError,
    )
    from personachat.interventions import (
        SteeringSpec as SteeringSpec,
    )
    from personachat.interventions import (
        steer as steer,
    )
    from personachat.model import (
        LoadedModel as LoadedModel,
    )
    from personachat.model import (
        ModelSites as ModelSites,
    )
    from personachat.model import (
        SiteTemplates as SiteTemplates,
    )
    from personachat.model import (
        load_model as load_model,
    )
    from personachat.pipeline import (
        extract_vectors as extract_vectors,
    )
    from personachat.pipeline import (
        find_neurons as find_neurons,
    )
    from personachat.pipeline import (
        register_results as register_results,
    )
    from personachat.prompts import (
        PersonaDataset as PersonaDataset,
    )
    from personachat.prompts import (
        load_dataset as load_dataset,
    )
    from personachat.records import (
        LAYER_CONVENTION as LAYER_CONVENTION,
    )
    from personachat.records import (
        LayerMetrics as LayerMetrics,
    )
    from personachat.records import (
        ModelInfo as ModelInfo,
    )
    from personachat.records import (
        NeuronSet as NeuronSet,
    )
    from personachat.records import (
        Persona as Persona,
    )
    from personachat.records import (
        PersonaMeans as PersonaMeans,
    )
    from personachat.records import (
        PersonaVector as PersonaVector,
    )
    from personachat.store import (
        Store as Store,
    )

_EXPORTS = {
    "ChatEngine": "chat",
    "ChatUpdate": "chat",
    "GenerationSettings": "chat",
    "intervene": "hooks",
    "AblationSpec": "interventions",
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
    "load_dataset": "prompts",
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
