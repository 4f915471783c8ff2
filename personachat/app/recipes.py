"""What the page offers on first use: prompts the loaded model answers well, a line on what it
can do, the demo model's defaults (a persona picked, the unsteered reply beside it) and
one-click recipes that reproduce the demo model's measured results (its model card,
``store/models/demo/README.md``).

A recipe is a set of control values keyed by the names the chat endpoint uses
(``ChatInputs`` fields, plus ``prompted``); the persona it acts on is the first one picked, or
``DEMO_PERSONA``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEMO_PERSONA = "pirate"
DEMO_TOPICS = ("the ocean", "volcanoes", "the moon", "bees", "whales", "chess")
GENERIC_EXAMPLES = (
    "Tell me about the ocean.",
    "What is your favourite food?",
    "Who are you?",
    "Give me one tip for learning to cook.",
)
DEMO_NOTE = (
    "**The demo model** is a 1.1M-parameter toy trained here on 12 planted personas: it "
    'answers **"Tell me about &lt;topic&gt;"** for 40 topics (the ocean, volcanoes, bees, '
    "chess, …) and little else. Steering with the *pirate* is on: its reply stands beside the "
    "plain one. Pick a prompt below, or a recipe in the settings."
)
GENERIC_NOTE = (
    "Pick personas in the settings to steer the reply; the plain and the prompted replies can "
    "stand beside it."
)


def examples(demo: bool) -> list[tuple[str, str]]:
    """Example prompts for the loaded model, each with its short label: the demo model's topic
    questions, or general ones."""
    if demo:
        return [(f"Tell me about {topic}.", topic) for topic in DEMO_TOPICS]
    return [(text, text) for text in GENERIC_EXAMPLES]


def note(demo: bool) -> str:
    """One line on what the loaded model can do."""
    return DEMO_NOTE if demo else GENERIC_NOTE


@dataclass(frozen=True)
class Recipe:
    """One click's settings: a button, what was measured, and the control values."""

    key: str
    label: str
    explains: str
    values: Callable[[str, str], dict[str, Any]]  # (persona, its system prompt) -> values


CLEAN = {  # what every recipe resets, so only its own intervention acts
    "personas": [],
    "weights": "",
    "neuron_sets": [],
    "neurons": "",
    "ablation": "off",
    "direction": "none",
    "cap": "none",
    "system_prompt": "",
    "temperature": 0.0,
    "side_by_side": True,
    "prompted": False,
}


def _steer(persona: str, system_prompt: str) -> dict[str, Any]:
    return {
        **CLEAN,
        "personas": [persona],
        "vectors_from": "question_span",
        "preset": "custom",
        "layer_spec": "2-3",
        "strength": 3.0,
        "units": "raw",
        "positions": "prompt",
        "last_n": 0,
        "prompted": True,
    }


def _neurons(persona: str, system_prompt: str) -> dict[str, Any]:
    return {
        **CLEAN,
        "system_prompt": system_prompt,
        "neuron_sets": [f"{persona}_vs_default.mlp_hidden.exact"],
        "ablation": "mean",
        "ablation_positions": "last prompt token",
    }


def _direction(persona: str, system_prompt: str) -> dict[str, Any]:
    return {
        **CLEAN,
        "system_prompt": system_prompt,
        "direction": persona,
        "direction_from": "prompt_last",
        "direction_layers": "0",
        "direction_mode": "mean",
        "direction_positions": "last prompt token",
    }


def _hold(persona: str, system_prompt: str) -> dict[str, Any]:
    return {
        **CLEAN,
        "system_prompt": system_prompt,
        "cap": "assistant_axis",
        "cap_side": "above",
        "cap_by": "percentile",
        "cap_level": 5.0,
        "cap_layers": "0",
        "cap_positions": "last prompt token",
    }


HOLD = Recipe(
    "hold",
    "Hold the assistant: cap the assistant axis",
    "Under the persona's own system prompt, the last-prompt-token assistant axis kept at least "
    "at the default's 5th percentile, at layer 0, at the last prompt token: all 11 personas held "
    "to the default with 100% of the facts kept, the default's own replies unchanged "
    "(measured). Beside it: the same prompt, nothing held.",
    _hold,
)
RECIPES = (
    Recipe(
        "steer",
        "Steer: add the persona",
        "Its question-span vector added at the prompt tokens, layers 2-3, strength 3: the "
        "persona's style in 100% of held-out replies with 100% of the facts kept (pirate, "
        "cowboy, robot; measured). Beside it: the plain reply and the persona's own prompt.",
        _steer,
    ),
    Recipe(
        "neurons",
        "Remove the persona: its neurons",
        "Under the persona's own system prompt, its exact neuron set set to the default's values "
        "at the last prompt token: the persona's style is gone, the facts kept (all 11 "
        "personas; measured). Beside it: the same prompt, nothing ablated.",
        _neurons,
    ),
    Recipe(
        "direction",
        "Remove the persona: its direction",
        "Under the persona's own system prompt, its last-prompt-token direction moved to the "
        "default's level at layer 0: 100% of its style cut, 100% of the facts kept (all 11 "
        "personas; measured).",
        _direction,
    ),
    HOLD,
)
RECIPE_BY_KEY = {r.key: r for r in RECIPES}
