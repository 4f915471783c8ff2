"""The ablation section under persona P's own prompt: P's neurons (``neurons``), each whole MLP
layer zeroed, and P's direction in the residual stream.

Directional ablation moves the stream along P's vector to the baseline's mean level or to zero,
on the prompt (or its last token) or everywhere, at layer 0 or all layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from personachat.cli.evaluate_demo.config import EvalConfig
from personachat.cli.evaluate_demo.neurons import NEURON_ABLATION, neuron_ablation
from personachat.cli.evaluate_demo.replies import Asker, ablate_plan, cut, direction_plan
from personachat.cli.evaluate_demo.vectors import DIRECTION_KINDS, Vectors
from personachat.interventions import AblationMode, AblationSpec, DirectionSpec, PositionMode
from personachat.prompts import PersonaDataset, demo

DIRECTION_MODES: tuple[AblationMode, ...] = ("mean", "zero")
# where: every position, the whole prompt, or its last token (where the reply is decided)
DIRECTION_WHERE: tuple[tuple[PositionMode, int | None], ...] = (
    ("all", None),
    ("prompt", None),
    ("prompt", 1),
)
DIRECTION_LAYERS = ("0", "all")


def ablation(ask: Asker, data: PersonaDataset, vecs: Vectors, cfg: EvalConfig) -> dict[str, Any]:
    """The parts of ``cfg.parts``, in that order, each a list of rows."""
    unknown = [m for m in cfg.method_names if m not in NEURON_ABLATION]
    if unknown:
        raise SystemExit(f"unknown neuron methods {unknown}; choose from {list(NEURON_ABLATION)}")
    targets, parts = cfg.target_names, cfg.part_names
    # other personas checked under their own prompts: cfg.others of them, non-targets first
    others = [p for p in demo.PERSONA_NAMES[1:] if p not in targets] + targets
    measured: dict[str, Any] = {}
    if "neurons" in parts:
        measured["neurons"] = neuron_ablation(ask, data, others, cfg)
    if "whole_mlp" in parts:
        measured["whole_mlp"] = whole_mlp(ask, targets)
    if "directional" in parts:
        measured["directional"] = directional(ask, vecs, targets, others, cfg.others)
    return {part: measured[part] for part in parts}


def whole_mlp(ask: Asker, targets: Sequence[str]) -> list[dict[str, Any]]:
    """Each target under its own prompt with every unit of one layer's MLP zeroed, per layer."""
    width = ask.lm.info.mlp_width
    rows = []
    for target in targets:
        for layer in range(ask.lm.info.n_layers):
            spec = AblationSpec(neurons=f"{layer}:0-{width - 1}")
            sc, _ = ask.measure(target, ablate_plan(ask.lm, {}, spec))
            rows.append(
                {"persona": target, "layer": layer, "markers": sc.markers, "facts": sc.facts}
            )
    return rows


def directional(
    ask: Asker, vecs: Vectors, targets: Sequence[str], others: Sequence[str], n_others: int
) -> list[dict[str, Any]]:
    """Each target's direction ablated in every setting, for each kind of vector."""
    settings = [
        (mode, where, layers)
        for mode in DIRECTION_MODES
        for where in DIRECTION_WHERE
        for layers in DIRECTION_LAYERS
    ]
    rows = []
    for target in tqdm(targets, desc="directional ablation"):
        base, _ = ask.measure(target)
        checked = [p for p in others if p != target][:n_others]
        for kind in DIRECTION_KINDS:
            for mode, (where, last_n), layers in settings:
                spec = DirectionSpec(
                    target, layers=layers, mode=mode, positions=where, last_n=last_n
                )
                plan = direction_plan(ask.lm, vecs[kind], spec)
                sc, _ = ask.measure(target, plan)
                kept = ask.kept_by_others(checked, plan)
                rows.append(
                    {
                        "persona": target,
                        "kind": kind,
                        "mode": mode,
                        "positions": where if last_n is None else f"last {last_n}",
                        "layers": layers,
                        "markers_before": base.markers,
                        "markers": sc.markers,
                        "cut": cut(base.markers, sc.markers),
                        "facts": sc.facts,
                        "others_min": min(kept.values()),
                    }
                )
    return rows
