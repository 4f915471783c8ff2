"""``eval.png``: one panel per measured section (matplotlib, Agg backend).

Conditioning: the marker-rate matrix. Steering: the first target's marker and fact curves over
strength at each best setting, then per persona the best markers that keep >= 90% of the facts.
Ablation: the cut in each persona's own markers by k exact units at the last prompt token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from personachat.cli.evaluate_demo.vectors import STEERING_KINDS
from personachat.prompts import demo


def plot(results: dict[str, Any], path: Path) -> None:
    """Draw the panels of the sections in ``results`` side by side into ``path``."""
    panels: list[str] = [s for s in ("conditioning", "steering", "ablation") if s in results]
    if not panels:
        return
    if "steering" in results:
        panels.insert(panels.index("steering") + 1, "steering_personas")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.3), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        if name == "conditioning":
            conditioning_panel(fig, ax, results["conditioning"]["matrix"])
        elif name == "steering":
            steering_panel(ax, results["steering"])
        elif name == "steering_personas":
            steering_personas_panel(fig, ax, results["steering"]["rows"])
        else:
            ablation_panel(fig, ax, results["ablation"].get("neurons", []))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def conditioning_panel(fig: Figure, ax: Axes, m: dict[str, dict[str, float]]) -> None:
    """The marker rate of every persona under every persona's system prompt."""
    grid = [[m[p][q] for q in demo.PERSONA_NAMES] for p in demo.PERSONA_NAMES]
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(grid)), demo.PERSONA_NAMES, rotation=90, fontsize=7)
    ax.set_yticks(range(len(grid)), demo.PERSONA_NAMES, fontsize=7)
    ax.set_xlabel("markers of")
    ax.set_ylabel("system prompt of")
    ax.set_title("Conditioning: marker rate")


def steering_panel(ax: Axes, steering: dict[str, Any]) -> None:
    """The first target's markers (solid) and facts kept (dotted) over strength, one line per
    best setting."""
    rows = steering["rows"]
    first = rows[0]["persona"]
    for b in steering["best"]:
        pts = sorted(
            (r["strength"], r["markers"], r["facts"])
            for r in rows
            if r["persona"] == first
            and r["kind"] == b["kind"]
            and r["positions"] == b["positions"]
            and r["layers"] == b["layers"]
        )
        xs, markers, facts = zip(*pts, strict=True)
        label = f"{b['kind']} / {b['positions']} / L{b['layers']}"
        (line,) = ax.plot(xs, markers, marker="o", label=label)
        ax.plot(xs, facts, ls=":", color=line.get_color(), alpha=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("strength (raw)")
    ax.set_ylabel(f"{first} markers (solid), facts kept (dotted)")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"Steering default -> {first}")
    ax.legend(fontsize=6)


def percent_heatmap(fig: Figure, ax: Axes, grid: Sequence[Sequence[float]]) -> None:
    """Shares in [0, 1] as coloured cells, each labelled with its percentage."""
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046)
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            color = "black" if value > 0.6 else "white"
            ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=7, color=color)


def steering_personas_panel(fig: Figure, ax: Axes, rows: Sequence[dict[str, Any]]) -> None:
    """Per persona and (vector kind, positions): the best marker rate of any swept setting that
    keeps >= 90% of the facts."""
    personas = list(dict.fromkeys(r["persona"] for r in rows))
    columns = [(k, p) for k in STEERING_KINDS for p in ("prompt", "all", "generated")]
    grid = [
        [
            max(
                (
                    r["markers"]
                    for r in rows
                    if (r["persona"], r["kind"], r["positions"]) == (persona, kind, pos)
                    and r["facts"] >= 0.9
                ),
                default=0.0,
            )
            for kind, pos in columns
        ]
        for persona in personas
    ]
    percent_heatmap(fig, ax, grid)
    short = {"response_avg": "reply avg", "question_span": "q-span"}
    ax.set_xticks(range(len(columns)), [f"{short.get(k, k)}\n{p}" for k, p in columns], fontsize=7)
    ax.set_yticks(range(len(personas)), personas, fontsize=7)
    ax.set_xlabel("vector kind, positions steered")
    ax.set_title("Steering default -> P: best markers\nkeeping >= 90% facts", fontsize=10)


def ablation_panel(fig: Figure, ax: Axes, neuron_rows: Sequence[dict[str, Any]]) -> None:
    """Exact units at the last prompt token: the cut in each persona's own markers (cell) per k,
    with the worst random cut and the fewest markers another persona kept in the title."""
    rows = [
        r
        for r in neuron_rows
        if r["method"] == "exact" and r["ablation"].startswith("mean at last 1")
    ]
    if not rows:
        ax.set_axis_off()
        return
    personas = list(dict.fromkeys(r["persona"] for r in rows))
    ks = sorted({r["k"] for r in rows})
    cell = {(r["persona"], r["k"]): r["cut_top"] for r in rows}
    grid = [[cell.get((p, k), float("nan")) for k in ks] for p in personas]
    percent_heatmap(fig, ax, grid)
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_yticks(range(len(personas)), personas, fontsize=7)
    ax.set_xlabel("k exact units set to the default's values at the last prompt token")
    worst_random = max(r["cut_random"] for r in rows)
    kept = min(r["others_min"] for r in rows)
    ax.set_title(
        f"Neuron ablation: cut in own markers\n(k random units cut at most {worst_random:.0%}; "
        f"other personas keep at least {kept:.0%})",
        fontsize=10,
    )


def plot_capping(capping: dict[str, Any], path: Path) -> None:
    """Each persona's marker cut at the best cap, and the drift of a steered conversation."""
    best = capping["best"]
    personas = [p for p, r in best.items() if isinstance(r, dict)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.4, 4.0))
    left.bar(range(len(personas)), [best[p]["cut"] for p in personas], color="tab:blue")
    left.plot(range(len(personas)), [best[p]["facts"] for p in personas], "ko", label="facts kept")
    left.set_xticks(range(len(personas)), personas, rotation=90, fontsize=7)
    left.set_ylim(0, 1.05)
    left.set_title(
        f"Assistant axis capped ({best['axis']}, p{best['percentile']:g}, L{best['layers']})"
    )
    left.legend(fontsize=7)
    drift = capping["drift"]
    for name, values in drift["scaled"].items():
        right.plot(range(1, len(values) + 1), values, marker="o", label=name)
    low, high = drift["band"]
    right.axhspan(low, high, color="tab:green", alpha=0.15, label="the default's 5th-95th pct")
    right.axhline(0, color="grey", lw=0.8, ls=":")
    right.set_xlabel("turn")
    right.set_xticks(range(1, len(next(iter(drift["scaled"].values()))) + 1))
    right.set_ylabel("axis projection (0 = roles' mean, 1 = default's)")
    right.set_title(f"Drift on the assistant axis, layer {drift['layer']}")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
