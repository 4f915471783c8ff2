"""The persona vectors the steering and ablation sections use, extracted from the planted
replies of training questions (``personachat.prompts.demo.planted_dataset``)."""

from __future__ import annotations

from personachat.model import LoadedModel
from personachat.pipeline import extract_vectors
from personachat.prompts import PersonaDataset
from personachat.records import PersonaVector

STEERING_KINDS = ("response_avg", "question_span")  # vector kinds swept by the steering section
DIRECTION_KINDS = ("question_span", "prompt_last")  # and by directional ablation

Vectors = dict[str, dict[str, PersonaVector]]  # kind -> persona -> vector


def vectors_by_kind(lm: LoadedModel, data: PersonaDataset) -> Vectors:
    """Every persona's vector of every kind either section uses, against the default persona."""
    kinds = tuple(dict.fromkeys(STEERING_KINDS + DIRECTION_KINDS))
    result = extract_vectors(lm, data, positions=kinds, baseline="default", batch_size=16)
    out: Vectors = {kind: {} for kind in kinds}
    for v in result.vectors:
        out[v.positions][v.persona] = v
    return out


def best_layers(vecs: Vectors) -> dict[str, dict[str, int]]:
    """Per kind and persona: the layer where the vector separates the persona best."""
    return {
        kind: {p: v.metrics.best_layer for p, v in by.items() if v.metrics is not None}
        for kind, by in vecs.items()
    }
