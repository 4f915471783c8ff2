"""Circuits: a few attention heads and MLPs whose joint patch restores most of the answer.

``find_circuit`` greedily joins single heads and MLPs, best single-site score first, until their
joint patch restores ``goal`` of the answer logit difference. Nodes are named ``input``,
``a{layer}.h{head}`` (an attention head) and ``m{layer}`` (an MLP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from personachat.analysis.groups import Placement
from personachat.analysis.patching import (
    Patch,
    PatchingResult,
    PatchSite,
    clean_runs,
    group_positions,
    patched_logits,
)
from personachat.hooks import Site
from personachat.model import LoadedModel
from personachat.records import Persona


@dataclass(frozen=True)
class Circuit:
    """A small set of sites whose joint patch restores most of the answer difference."""

    nodes: list[str]  # "input", then "a{layer}.h{head}" (heads) and "m{layer}" (MLPs)
    sites: list[PatchSite]  # patched together, in the order they were chosen
    restored: float  # joint restored fraction
    target: float

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "sites": [s.to_json() for s in self.sites],
            "restored": round(self.restored, 4),
            "target": self.target,
        }


def _node_order(node: str) -> tuple[int, int, int]:
    """Sort key: by layer, attention heads before the MLP of the same layer, then head."""
    if node == "input":
        return (-1, 0, 0)
    if node.startswith("m"):
        return (int(node[1:]), 1, 0)
    layer, head = node[1:].split(".h")
    return (int(layer), 0, int(head))


def circuit_candidates(patching: PatchingResult) -> list[tuple[float, PatchSite]]:
    """Single MLP sites and single heads with their restored fraction, best first."""
    cands = [
        (float(v), PatchSite("mlp_hidden", la, g))
        for (s, g), curve in patching.restored.items()
        if s == "mlp_hidden"
        for la, v in zip(patching.layers, curve, strict=True)
        if np.isfinite(v)
    ]
    for g, grid in patching.heads.items():
        for i, la in enumerate(patching.layers):
            cands += [
                (float(v), PatchSite("attn_heads", la, g, h))
                for h, v in enumerate(grid[i])
                if np.isfinite(v)
            ]
    return sorted(cands, key=lambda c: -c[0])


def find_circuit(
    lm: LoadedModel,
    target: Persona,
    source: Persona,
    question: str,
    patching: PatchingResult,
    *,
    answer_prefix: str = "",
    placement: Placement = "early",
    goal: float = 0.8,
    max_sites: int = 6,
) -> Circuit | None:
    """Greedily join the best single sites (MLPs ``m{layer}`` and, where ``patching`` has
    per-head results, attention heads ``a{layer}.h{head}``) by their single-site restoration
    until the joint patch of them restores ``goal`` of the logit difference; ``None`` when
    ``max_sites`` do not suffice.
    """
    needed: list[Site] = ["mlp_hidden", "attn_heads"] if patching.heads else ["mlp_hidden"]
    runs = clean_runs(lm, target, source, question, needed, answer_prefix, placement)
    runs.token_a, runs.token_b = patching.token_a, patching.token_b
    runs.ld_a, runs.ld_b = patching.ld_a, patching.ld_b
    chosen: list[PatchSite] = []
    row: list[Patch] = []
    for _, site in circuit_candidates(patching)[:max_sites]:
        aligned = group_positions(runs.a, runs.b, site.group)
        if isinstance(aligned, str):
            continue
        cols = slice(None) if site.head is None else lm.sites.head_slice(site.head)
        chosen.append(site)
        row.append((site.site, site.layer, *aligned, cols))
        joint = float(runs.restored(patched_logits(lm, runs.a, [row], runs.cache))[0])
        if joint >= goal:
            nodes = sorted({s.node for s in chosen}, key=_node_order)
            return Circuit(nodes=["input", *nodes], sites=chosen, restored=joint, target=goal)
    return None
