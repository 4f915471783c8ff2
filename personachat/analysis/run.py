"""Run every persona analysis on one model (and, with ``compare``, the cross-model comparison).

``analyze_model`` measures collapse (persona early and late), probes the persona signal by layer,
builds the persona space, patches persona pairs that answer differently, looks for a circuit and
computes the controlled contrasts, into one ``ModelAnalysis``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from personachat.analysis.circuit import Circuit, find_circuit
from personachat.analysis.collapse import CollapseResult, persona_collapse
from personachat.analysis.contrasts import Contrasts, contrasts
from personachat.analysis.groups import encode_prompt
from personachat.analysis.patching import PatchingResult, activation_patching
from personachat.analysis.preferences import PreferenceItem
from personachat.analysis.probes import ProbeResult, persona_probe
from personachat.analysis.space import (
    PersonaSpace,
    SpaceComparison,
    compare_spaces,
    persona_space,
)
from personachat.hooks import Site
from personachat.model import LoadedModel
from personachat.records import Persona, PersonaVector

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ModelAnalysis:
    """Everything one report shows for one model."""

    model_id: str
    personas: list[Persona]
    items: list[PreferenceItem]
    collapse: CollapseResult
    probe: ProbeResult
    space: PersonaSpace | None = None
    collapse_late: CollapseResult | None = None
    patching: list[PatchingResult] = field(default_factory=list)
    circuit: Circuit | None = None
    contrasts: Contrasts | None = None
    comparison: SpaceComparison | None = None
    other_space: PersonaSpace | None = None
    dataset: str = ""
    n_layers: int = 0


def _patch_pairs(
    lm: LoadedModel,
    personas: Sequence[Persona],
    collapse: CollapseResult,
    items: Sequence[PreferenceItem],
    n: int,
) -> list[tuple[Persona, Persona, PreferenceItem]]:
    """(A, B, item): B gives its own answer, A the modal one, persona spans of equal length."""
    by_name = {p.name: p for p in personas}
    by_key = {it.key: it for it in items}
    out: list[tuple[Persona, Persona, PreferenceItem]] = []
    for q in collapse.questions:
        if not q.distinct_personas or not q.collapsed_personas:
            continue
        item = by_key[q.key]
        question = item.questions[0]
        used = {pair[1].name for pair in out}
        fresh = [n for n in q.distinct_personas if n not in used]
        b = by_name[(fresh or q.distinct_personas)[0]]
        span_b = encode_prompt(lm, b, question, item.answer_prefix).persona_span
        same_len = [
            by_name[a]
            for a in q.collapsed_personas
            if encode_prompt(lm, by_name[a], question, item.answer_prefix).persona_span == span_b
        ]
        a = same_len[0] if same_len else by_name[q.collapsed_personas[0]]
        out.append((a, b, item))
        if len(out) >= n:
            break
    return out


def analyze_model(
    lm: LoadedModel,
    personas: Sequence[Persona],
    items: Sequence[PreferenceItem],
    *,
    vectors: Sequence[PersonaVector] = (),
    compare: tuple[LoadedModel, Sequence[PersonaVector]] | None = None,
    patch_items: Sequence[PreferenceItem] | None = None,
    n_patch: int = 2,
    threshold: float = 0.5,
    max_new_tokens: int = 24,
    dataset: str = "",
    progress: bool = True,
) -> ModelAnalysis:
    """Run every analysis on ``lm`` (persona vectors come from the store or, if none are given,
    from the probe's mean question-span activations).

    Collapse is measured on ``items``; the probe and patching use ``patch_items`` (default
    ``items``), whose forced answer prefix makes every persona share the tokens after the
    question, so the ``answer`` position is the one that predicts the answer.
    """
    patch_items = list(patch_items or items)
    collapse = persona_collapse(
        lm, personas, items, threshold=threshold, max_new_tokens=max_new_tokens, progress=progress
    )
    late = persona_collapse(
        lm,
        personas,
        items,
        threshold=threshold,
        max_new_tokens=max_new_tokens,
        placement="late",
        progress=progress,
    )
    questions, prefixes = _probe_prompts(patch_items)
    probe = persona_probe(lm, personas, questions, answer_prefix=prefixes, progress=progress)
    space = _space(lm, personas, probe, vectors)
    result = ModelAnalysis(
        model_id=lm.info.model_id,
        personas=list(personas),
        items=list(items),
        collapse=collapse,
        probe=probe,
        space=space,
        collapse_late=late,
        dataset=dataset,
        n_layers=lm.sites.n_layers,
    )
    result.patching, result.circuit = _patch_pairs_and_circuit(
        lm, personas, collapse, patch_items, n_patch
    )
    result.contrasts = contrasts(collapse, space, late)
    if compare is not None and space is not None:
        other = _other_space(compare, personas, questions, prefixes, progress)
        if other is not None:
            result.other_space = other
            result.comparison = compare_spaces(space, other)
    return result


def _probe_prompts(items: Sequence[PreferenceItem]) -> tuple[list[str], list[str]]:
    """(questions, answer prefixes) of every phrasing of ``items``, for the probe."""
    questions = [q for it in items for q in it.questions]
    prefixes = [it.answer_prefix for it in items for _ in it.questions]
    return questions, prefixes


def _patch_pairs_and_circuit(
    lm: LoadedModel,
    personas: Sequence[Persona],
    collapse: CollapseResult,
    items: Sequence[PreferenceItem],
    n: int,
) -> tuple[list[PatchingResult], Circuit | None]:
    """Patch up to ``n`` persona pairs (``_patch_pairs``) at every site the model has; the
    circuit is searched on the first pair whose first answer tokens differ."""
    sites: tuple[Site, ...] = ("residual", "mlp_hidden")
    if lm.sites.attn_out is not None:
        sites += ("attn_heads",)
    patching: list[PatchingResult] = []
    circuit = None
    for a, b, item in _patch_pairs(lm, personas, collapse, items, n):
        question, prefix = item.questions[0], item.answer_prefix
        patch = activation_patching(lm, a, b, question, answer_prefix=prefix, sites=sites)
        patching.append(patch)
        if circuit is None and not patch.same_answer:
            circuit = find_circuit(lm, a, b, question, patch, answer_prefix=prefix)
    return patching, circuit


def _other_space(
    compare: tuple[LoadedModel, Sequence[PersonaVector]],
    personas: Sequence[Persona],
    questions: Sequence[str],
    prefixes: Sequence[str],
    progress: bool,
) -> PersonaSpace | None:
    """The second model's persona space: from its vectors, or (with none) from its own probe."""
    other_lm, other_vectors = compare
    other_probe = None
    if not other_vectors:
        other_probe = persona_probe(
            other_lm, personas, questions, answer_prefix=prefixes, progress=progress
        )
    return _space(other_lm, personas, other_probe, other_vectors)


def _space(
    lm: LoadedModel,
    personas: Sequence[Persona],
    probe: ProbeResult | None,
    vectors: Sequence[PersonaVector],
) -> PersonaSpace | None:
    cats = {p.name: p.category for p in personas}
    try:
        if vectors:
            return persona_space(vectors, categories=cats)
        if probe is None or probe.means is None:
            return None
        g = probe.groups.index("question")
        layer = min(lm.sites.n_layers - 1, int(lm.sites.n_layers * 0.65 + 0.5))
        means = {p.name: probe.means[g, i] for i, p in enumerate(personas)}
        return persona_space(
            means,
            layer=layer,
            categories=cats,
            model_id=lm.info.model_id,
            source="mean residual over the question tokens (no stored vectors)",
        )
    except ValueError as err:
        log.warning("no persona space for %s: %s", lm.info.model_id, err)
        return None
