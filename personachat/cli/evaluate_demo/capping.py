"""Holding the assistant persona: cap the assistant axis under each persona's own system prompt.

The assistant axis (``personachat.pipeline.extract_axis``: from the role personas toward the
default, read at the last prompt token or over the question span) is capped from below at a
percentile of the default's own projections (``CapSpec(side="above", reference="persona")``),
swept over percentiles, layers and positions. A setting is good when a persona's style markers
fall (each persona's cut, facts kept) while the default's unprompted replies stay identical; the
best setting is the one shared by all personas whose worst persona does best.

Drift: a conversation of several held-out questions, steered toward a persona and unsteered,
read out on the assistant axis turn by turn: the projection at each turn's last prompt token
(where the axis was read), as a percentile among the default's own projections there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from personachat.chat import ChatEngine, GenerationSettings
from personachat.cli.evaluate_demo.replies import Asker, PlanFn, cut
from personachat.interventions import CapSpec, SteeringSpec, build_plan
from personachat.pipeline import AXIS_PERSONA, extract_axis, extract_vectors
from personachat.prompts import PersonaDataset, demo
from personachat.records import PersonaVector
from personachat.vectors import percentile_rank

AXIS_KINDS = ("prompt_last", "question_span")
CAP_LAYERS = ("0", "1", "2", "3", "0-3")
CAP_PERCENTILES = (5.0, 25.0, 50.0)
CAP_WHERE = ((1, "last prompt token"), (None, "whole prompt"))  # (last_n, name)


def capping(ask: Asker, data: PersonaDataset, personas: Sequence[str]) -> dict[str, Any]:
    """The sweep's rows and its best shared setting, and the drift of a steered conversation."""
    axes = {
        kind: extract_axis(ask.lm, data, positions=kind, progress=False)[0] for kind in AXIS_KINDS
    }
    plain_default = ask.replies("")
    before = {p: ask.measure(p)[0] for p in personas}
    rows = []
    grid = [
        (k, la, pc, w)
        for k in AXIS_KINDS
        for la in CAP_LAYERS
        for pc in CAP_PERCENTILES
        for w in CAP_WHERE
    ]
    for kind, layers, pct, (last_n, where) in tqdm(grid, desc="capping"):
        spec = CapSpec(
            AXIS_PERSONA, layers=layers, percentile=pct, positions="prompt", last_n=last_n
        )
        plan = cap_plan(ask, axes[kind], spec)
        row: dict[str, Any] = {"axis": kind, "layers": layers, "percentile": pct, "where": where}
        row["default_unchanged"] = ask.replies("", plan) == plain_default
        for persona in personas:
            score, _ = ask.measure(persona, plan)
            row[persona] = {
                "cut": cut(before[persona].markers, score.markers),
                "facts": score.facts,
            }
        rows.append(row)
    return {
        "rows": rows,
        "best": best_cap(rows, personas),
        "drift": drift(ask, axes["prompt_last"]),
    }


def cap_plan(ask: Asker, axis: PersonaVector, spec: CapSpec) -> PlanFn:
    vectors = {AXIS_PERSONA: axis}
    return lambda width: build_plan(ask.lm, vectors, cap=spec, prompt_len=width).handlers


def held(row: dict[str, Any], persona: str) -> bool:
    """The floor: the persona's markers cut by half or more with 90% of the facts kept."""
    r = row[persona]
    return bool(r["cut"] >= 0.5 and r["facts"] >= 0.9)


def best_cap(rows: Sequence[dict[str, Any]], personas: Sequence[str]) -> dict[str, Any]:
    """The setting, among those leaving the default's replies unchanged, that holds the most
    personas, then with the largest worst cut."""
    fair = [r for r in rows if r["default_unchanged"]] or list(rows)

    def key(r: dict[str, Any]) -> tuple[int, float, float]:
        worst = min(r[p]["cut"] for p in personas)
        facts = min(r[p]["facts"] for p in personas)
        return sum(held(r, p) for p in personas), worst, facts

    best = max(fair, key=key)
    return {**best, "held": [p for p in personas if held(best, p)]}


def drift(
    ask: Asker, axis: PersonaVector, persona: str = "pirate", turns: int = 4
) -> dict[str, Any]:
    """Per turn of a conversation (short enough for the demo model's context), the axis
    projection (at its best layer) at the turn's last prompt token, where the axis was read: raw,
    scaled (0 = the role personas' mean, 1 = the default's) and as a percentile among the
    default's own projections there; unsteered, and steered toward ``persona`` (its question-span
    vector at the prompt, layers 2-3, strength 3). ``band``: the default's 5th-95th percentile,
    scaled."""
    assert axis.quantiles is not None and axis.metrics is not None
    assert axis.baseline_mean is not None
    layer = axis.metrics.best_layer
    unit = torch.nn.functional.normalize(axis.vector[layer].double(), dim=-1)
    zero = float(axis.baseline_mean[layer].double() @ unit)
    length = float(axis.vector[layer].double().norm())
    reference = axis.quantiles.persona[layer].numpy()
    engine = ChatEngine(ask.lm, [axis, persona_vector(ask, persona)])
    steering = SteeringSpec({persona: 1.0}, layers="2-3:3", positions="prompt")
    questions = [q.text for q in demo.eval_questions(1)[:turns]]
    out: dict[str, Any] = {"persona": persona, "layer": layer, "raw": {}, "scaled": {}}
    out["percentile"] = {}
    for name, spec in (("unsteered", None), (f"steered toward {persona}", steering)):
        raw = np.asarray(conversation(engine, questions, spec, layer))
        out["raw"][name] = raw.tolist()
        out["scaled"][name] = ((raw - zero) / length).tolist()
        out["percentile"][name] = percentile_rank(raw, reference).tolist()
    out["band"] = [(float(reference[k]) - zero) / length for k in (5, 95)]
    return out


def persona_vector(ask: Asker, persona: str) -> PersonaVector:
    """``persona``'s question-span vector against the default, from the planted replies."""
    data = demo.planted_dataset(40, 0)
    result = extract_vectors(
        ask.lm, data, [persona, demo.DEFAULT_PERSONA], "question_span", progress=False
    )
    return next(v for v in result.vectors if v.persona == persona)


def conversation(
    engine: ChatEngine,
    questions: Sequence[str],
    spec: SteeringSpec | None,
    layer: int,
    axis_positions: str = "prompt_last",
) -> list[float]:
    """The axis projection at each turn's last prompt token, turn by turn."""
    messages: list[dict[str, str]] = []
    means = []
    for question in questions:
        messages.append({"role": "user", "content": question})
        update = engine.reply(
            messages, GenerationSettings(max_new_tokens=32), steering=spec, readout=[AXIS_PERSONA]
        )
        assert update.readout is not None
        pooled = update.readout.pooled(axis_positions)
        means.append(float(pooled[update.readout.layers.index(layer), 0]))
        messages.append({"role": "assistant", "content": update.text})
    return means
