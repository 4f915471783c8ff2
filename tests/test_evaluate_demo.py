"""scripts/evaluate_demo.py (``personachat.cli.evaluate_demo``) without a model: how it picks
settings, merges runs and plots."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import matplotlib.pyplot as plt
import pytest

from personachat.prompts import demo
from tests.scripts import cli_module

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return cli_module("evaluate_demo")


def steer_row(
    persona: str, layers: str, strength: float, markers: float, facts: float
) -> dict[str, Any]:
    return {
        "persona": persona,
        "kind": "response_avg",
        "positions": "prompt",
        "layers": layers,
        "strength": strength,
        "markers": markers,
        "facts": facts,
        "sample": "",
    }


def test_the_best_setting_is_the_one_whose_worst_persona_does_best(script: ModuleType) -> None:
    rows = [
        # perfect for pirate, useless for robot
        steer_row("pirate", "1-3", 4.0, 1.0, 0.97),
        steer_row("robot", "1-3", 4.0, 0.2, 0.94),
        # good for both
        steer_row("pirate", "0-2", 5.0, 1.0, 0.95),
        steer_row("robot", "0-2", 5.0, 0.9, 0.92),
        # all markers, but the facts are lost
        steer_row("pirate", "0", 8.0, 1.0, 0.5),
        steer_row("robot", "0", 8.0, 1.0, 0.6),
        # as good as 0-2 at 5, but stronger
        steer_row("pirate", "0-3", 6.0, 1.0, 0.95),
        steer_row("robot", "0-3", 6.0, 0.9, 0.92),
    ]
    best = script.best_settings(rows)
    assert best == {
        ("response_avg", "prompt"): {
            "layers": "0-2",
            "strength": 5.0,
            "markers": 0.9,
            "facts": 0.92,
        }
    }


def test_a_merge_keeps_what_the_run_does_not_redo(script: ModuleType) -> None:
    first, second = {"only": ""}, {"only": "ablation"}
    old = {
        "config": second,
        "merged_config": first,  # the format before earlier_configs
        "questions": ["q"],
        "conditioning": {"own": 1.0},
        "steering": {"rows": ["old"]},
    }
    kept = script.carried_over(old, ["steering"])
    assert kept == {
        "questions": ["q"],
        "conditioning": {"own": 1.0},
        "earlier_configs": [first, second],
    }
    third = {"only": "steering"}
    again = script.carried_over({**kept, "config": third, "steering": {}}, ["conditioning"])
    assert again["earlier_configs"] == [first, second, third] and "conditioning" not in again

    prev = {
        "neurons": [{"method": "exact", "k": 4}, {"method": "patching", "k": 4}],
        "whole_mlp": [{"layer": 0}],
    }
    new = {"neurons": [{"method": "exact", "k": 8}]}
    assert script.merged_ablation(prev, new, "exact") == {
        "neurons": [{"method": "patching", "k": 4}, {"method": "exact", "k": 8}],
        "whole_mlp": [{"layer": 0}],
    }


def test_the_plot_draws_conditioning_steering_and_ablation(
    script: ModuleType, tmp_path: Path
) -> None:
    names = demo.PERSONA_NAMES
    matrix = {p: {q: float(p == q) for q in names} for p in names}
    rows = [
        steer_row(p, "0-2", s, min(1.0, s / 4), 1.0 - s / 10)
        for p in ("pirate", "robot")
        for s in (1.0, 2.0, 4.0)
    ]
    neurons = [
        {
            "persona": p,
            "method": "exact",
            "ablation": "mean at last 1 prompt positions",
            "k": k,
            "cut_top": 1.0 if k >= 4 else 0.0,
            "cut_random": 0.0,
            "others_min": 1.0,
        }
        for p in ("pirate", "robot")
        for k in (2, 4, 8)
    ]
    results = {
        "conditioning": {"matrix": matrix},
        "steering": {
            "rows": rows,
            "best": [
                {
                    "kind": "response_avg",
                    "positions": "prompt",
                    **script.best_settings(rows)[("response_avg", "prompt")],
                }
            ],
        },
        "ablation": {"neurons": neurons},
    }
    path = tmp_path / "eval.png"
    script.plot(results, path)
    height, width, _ = plt.imread(path).shape
    # four panels of 5.2 x 4.3 inches at 110 dpi: conditioning, steering curves, steering per
    # persona, ablation heatmap
    assert (width, height) == (round(4 * 5.2 * 110), round(4.3 * 110))
