"""PersonaChat: see and steer the personas inside language models.

The package reads as the data flows: ``prompts``/``datasets`` -> ``model`` -> ``sites`` ->
``hooks`` -> ``activations`` -> ``vectors``/``neurons`` -> ``store`` -> ``interventions`` ->
``chat`` -> ``ui``. Importing it loads no model and opens no store.
"""

from personachat.chat import ChatEngine, ChatUpdate, GenerationSettings
from personachat.datasets import PersonaDataset, load_dataset
from personachat.extract import extract_vectors, find_neurons, register_results
from personachat.hooks import intervene
from personachat.interventions import (
    AblationSpec,
    DirectionSpec,
    InterventionError,
    SteeringSpec,
)
from personachat.model import LoadedModel, ModelInfo, load_model
from personachat.records import LayerMetrics, NeuronSet, Persona, PersonaMeans, PersonaVector
from personachat.sites import LAYER_CONVENTION, ModelSites, SiteTemplates
from personachat.store import Store

__all__ = [
    "LAYER_CONVENTION",
    "AblationSpec",
    "ChatEngine",
    "ChatUpdate",
    "DirectionSpec",
    "GenerationSettings",
    "InterventionError",
    "LayerMetrics",
    "LoadedModel",
    "ModelInfo",
    "ModelSites",
    "NeuronSet",
    "Persona",
    "PersonaDataset",
    "PersonaMeans",
    "PersonaVector",
    "SiteTemplates",
    "SteeringSpec",
    "Store",
    "extract_vectors",
    "find_neurons",
    "intervene",
    "load_dataset",
    "load_model",
    "register_results",
]
