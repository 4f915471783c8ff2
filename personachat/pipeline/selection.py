"""What a run covers: its layers, personas and position kinds, and this process's samples.

``extract_vectors`` and ``find_neurons`` both start here: they check the request before any work
and encode every (persona, question) conversation of the selected dataset, with its response
where a position kind needs one, sharded across the processes of a multi-process run.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from personachat.activations import Dist, Response, Sample, build_samples
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
    dataset: PersonaDataset,
    with_response: bool,
    ids: Mapping[tuple[str, str], Sequence[int]],
    skip: Collection[tuple[str, str]],
) -> list[tuple[int, str, str, Response]]:
    out: list[tuple[int, str, str, Response]] = []
    for i, p in enumerate(dataset.personas):
        for q in dataset.questions:
            if (p.name, q) in skip:
                continue
            response: Response = None
            if with_response:
                response = ids.get((p.name, q)) or dataset.response(p.name, q)
            out.append((i, p.system_prompt, q, response))
    return out


def shard_samples(
    lm: LoadedModel,
    data: PersonaDataset,
    kinds: tuple[str, ...],
    max_tokens: int | None,
    dist: Dist,
    *,
    ids: Mapping[tuple[str, str], Sequence[int]] | None = None,
    skip: Collection[tuple[str, str]] = (),
) -> list[Sample]:
    """This process's share of ``data``'s conversations (every persona with every question,
    persona-major, but the ``skip`` cells), encoded for the position ``kinds``, with the
    responses when ``response_avg`` is one of them: the generated ``ids`` of a cell where
    known, else its text."""
    convs = _conversations(data, "response_avg" in kinds, ids or {}, set(skip))
    return build_samples(
        lm.tokenizer, dist.shard(convs), kinds, max_tokens=max_tokens, questions=data.questions
    )
