"""What a run covers: its layers, personas and position kinds, and this process's samples.

``extract_vectors`` and ``find_neurons`` both start here: they check the request before any work
and encode every (persona, question) conversation of the selected dataset, with its response
where a position kind needs one, sharded across the processes of a multi-process run.
"""

from __future__ import annotations

from collections.abc import Sequence

from personachat.activations import Dist, Sample, build_samples
from personachat.model import LoadedModel
from personachat.prompts import DatasetError, PersonaDataset
from personachat.records import MEAN_BASELINE, POSITIONS


def check_positions(positions: str | Sequence[str]) -> tuple[str, ...]:
    """The position kinds asked for, each once, in order; an error names the known ones."""
    items = (positions,) if isinstance(positions, str) else tuple(positions)
    bad = [p for p in items if p not in POSITIONS]
    if not items or bad:
        raise ValueError(f"unknown positions {bad or items}; use one or more of {POSITIONS}")
    return tuple(dict.fromkeys(items))


def check_layers(lm: LoadedModel, layers: Sequence[int] | None) -> tuple[int, ...]:
    """The layers to use (all when ``None``), sorted; a ``SiteError`` names the valid range."""
    if layers is None:
        return tuple(range(lm.sites.n_layers))
    if not layers:
        raise ValueError("the layer list is empty")
    return tuple(sorted({lm.sites.check_layer(int(la)) for la in layers}))


def select_personas(
    dataset: PersonaDataset, personas: Sequence[str] | None, baseline: str
) -> PersonaDataset:
    """The personas to extract, with a named baseline added when missing; errors when unknown."""
    if not dataset.personas or not dataset.questions:
        raise DatasetError(f"dataset {dataset.name!r} has no personas or no questions")
    names = list(personas) if personas is not None else dataset.persona_names
    if baseline != MEAN_BASELINE:
        dataset.persona(baseline)  # raises for an unknown baseline, naming the known ones
        if baseline not in names:
            names = [baseline, *names]
    selected = dataset.select(names)
    if len(selected.personas) < 2:
        raise DatasetError(
            f"need at least two personas (a persona and a baseline); got {selected.persona_names}"
        )
    return selected


def _conversations(
    dataset: PersonaDataset, with_response: bool
) -> list[tuple[int, str, str, str | None]]:
    return [
        (i, p.system_prompt, q, dataset.response(p.name, q) if with_response else None)
        for i, p in enumerate(dataset.personas)
        for q in dataset.questions
    ]


def shard_samples(
    lm: LoadedModel,
    data: PersonaDataset,
    kinds: tuple[str, ...],
    max_tokens: int | None,
    dist: Dist,
) -> list[Sample]:
    """This process's share of ``data``'s conversations (every persona with every question,
    persona-major), encoded for the position ``kinds``, with the responses when ``response_avg``
    is one of them."""
    convs = dist.shard(_conversations(data, "response_avg" in kinds))
    return build_samples(lm.tokenizer, convs, kinds, max_tokens=max_tokens)
