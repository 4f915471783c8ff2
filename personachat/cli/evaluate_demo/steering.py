"""Steering from the default persona (no system prompt) with persona P's vector, swept over
vector kind, positions, layers and strength for every target; and negative steering under P's
own prompt.

The best setting per (kind, positions) is the one whose worst target does best: one setting that
works for all, not one tuned per persona.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from personachat.cli.evaluate_demo.config import EvalConfig
from personachat.cli.evaluate_demo.replies import Asker, Score, steer_plan
from personachat.cli.evaluate_demo.vectors import STEERING_KINDS, Vectors
from personachat.interventions import PositionMode, SteeringSpec

STEERED_POSITIONS: tuple[PositionMode, ...] = ("all", "prompt", "generated")
# (kind, positions) whose best setting is tried with negative strength under the own prompt
NEGATIVE: tuple[tuple[str, PositionMode], ...] = (
    ("response_avg", "prompt"),
    ("response_avg", "all"),
    ("question_span", "prompt"),
)

Best = dict[tuple[str, str], dict[str, Any]]  # (kind, positions) -> the best setting


def steering(ask: Asker, vecs: Vectors, cfg: EvalConfig) -> dict[str, Any]:
    """The sweep's rows, the best setting per (kind, positions), and negative steering."""
    rows = sweep(ask, vecs, cfg)
    best = best_settings(rows)
    return {
        "rows": rows,
        "best": [{"kind": k, "positions": p, **b} for (k, p), b in best.items()],
        "negative": negative_steering(ask, vecs, best, cfg.target_names),
    }


def sweep(ask: Asker, vecs: Vectors, cfg: EvalConfig) -> list[dict[str, Any]]:
    """Every target steered from the default persona at every point of the grid."""
    grid = [
        (kind, pos, layers, s)
        for kind in STEERING_KINDS
        for pos in STEERED_POSITIONS
        for layers in cfg.layer_specs
        for s in cfg.strength_values
    ]
    rows: list[dict[str, Any]] = []
    for target in cfg.target_names:
        for kind, pos, layers, s in tqdm(grid, desc=f"steering {target}"):
            spec = SteeringSpec({target: 1.0}, layers=layers, strength=s, positions=pos)
            plan = steer_plan(ask.lm, vecs[kind], spec)
            sc, replies = ask.measure(target, plan, system_prompt="")
            rows.append(row(target, kind, pos, layers, s, sc, replies[0]))
    return rows


def negative_steering(
    ask: Asker, vecs: Vectors, best: Best, targets: Sequence[str]
) -> list[dict[str, Any]]:
    """Each target under its own prompt, steered against its vector at minus one and minus two
    times the best setting's strength."""
    out = []
    for target in targets:
        base, _ = ask.measure(target)
        for kind, pos in NEGATIVE:
            b = best[(kind, pos)]
            for s in (-b["strength"], -2 * b["strength"]):
                spec = SteeringSpec({target: 1.0}, layers=b["layers"], strength=s, positions=pos)
                sc, replies = ask.measure(target, steer_plan(ask.lm, vecs[kind], spec))
                out.append(
                    {
                        "persona": target,
                        "kind": kind,
                        "positions": pos,
                        "layers": b["layers"],
                        "strength": s,
                        "markers_before": base.markers,
                        "markers": sc.markers,
                        "facts": sc.facts,
                        "sample": replies[0],
                    }
                )
    return out


def row(
    persona: str, kind: str, pos: str, layers: str, s: float, sc: Score, sample: str
) -> dict[str, Any]:
    return {
        "persona": persona,
        "kind": kind,
        "positions": pos,
        "layers": layers,
        "strength": s,
        "markers": sc.markers,
        "facts": sc.facts,
        "sample": sample,
    }


def best_settings(rows: Sequence[dict[str, Any]]) -> Best:
    """Per (kind, positions): the setting whose worst persona does best: every persona keeping
    >= 90% facts first, then the lowest marker rate, the lowest facts, the smaller strength."""
    by_setting: dict[tuple[str, str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        by_setting.setdefault((r["kind"], r["positions"], r["layers"], r["strength"]), []).append(r)
    best: Best = {}
    for (kind, pos, layers, strength), group in by_setting.items():
        markers, facts = min(r["markers"] for r in group), min(r["facts"] for r in group)
        rank = (facts >= 0.9, markers, facts, -strength)
        if (kind, pos) not in best or rank > best[(kind, pos)]["_rank"]:
            best[(kind, pos)] = {
                "layers": layers,
                "strength": strength,
                "markers": markers,  # the worst persona's
                "facts": facts,
                "_rank": rank,
            }
    for b in best.values():
        b.pop("_rank")
    return best
