"""Per-session chat settings: parse what a person typed in the page into checked runtime values.

The page's inputs are strings and numbers, gathered in one frozen ``ChatInputs``;
``parse_settings`` turns them into a frozen ``Settings`` (numbers, layers, neuron pairs) or
raises ``InputError`` whose message names the field, the value and what to type instead.
Nothing here touches a model: limits (layers, MLP width, known personas) come in as arguments,
so the same parsing serves the page, the API endpoints and the tests.

Formats:
- persona weights: ``"1, -0.5"`` (in the order the personas were picked) or
  ``"pirate=1, cynic=-0.5"``; empty means 1.0 for each persona.
- layer strengths: ``"8-12:4, 13:2"`` (layer or inclusive range, colon, strength) or ``"all:2"``.
- neurons: ``"3:12, 3:40-45, 4:7"`` (layer:index or layer:first-last).
- last n prompt tokens: a whole number >= 0; 0 or empty steers the whole prompt.
- layers to ablate a direction at: ``"all"`` or ``"0-2, 5"`` (layers only, no strengths).
- direction mode: ``"mean"`` (the component along the direction moved to the baseline's level)
  or ``"zero"`` (projected out); direction and ablation positions: ``"all"``, ``"prompt"``,
  ``"last prompt token"`` or ``"generated"``.
- preset and strength: ``"best layer"``, ``"band"`` or ``"all layers"`` at ``strength`` around
  the first persona's best layer; ``"custom"`` reads the layer spec, where a bare layer
  (``"2-3"``) takes ``strength``.
- holding a persona (``cap``, ``"none"``: nothing held): parsed by ``personachat.app.capping``
  into ``CapSettings``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from personachat.app.limits import BOUNDS, BoundError, check_chars, check_neuron_count
from personachat.app.strength import Norms, push, push_warning, too_far

MAX_MESSAGE_CHARS = BOUNDS.message_chars
MAX_NEW_TOKENS = BOUNDS.new_tokens
MAX_NEURONS = BOUNDS.neurons
NEW_TOKENS = "max tokens (new_tokens)"  # the field and its bound, as refusals name them
UNITS = ("raw", "x residual norm")
PRESETS = ("best layer", "band", "all layers", "custom")
ABLATION_MODES = ("off", "zero", "mean")
POSITIONS = ("all", "prompt", "generated")
# neuron ablation may also act on the last prompt token alone, where exact sets were found
LAST_PROMPT_TOKEN = "last prompt token"
ABLATION_POSITIONS = ("all", "prompt", LAST_PROMPT_TOKEN, "generated")
DIRECTION_POSITIONS = ABLATION_POSITIONS
NO_DIRECTION = "none"  # the direction dropdown's "ablate no direction"
DIRECTION_FIELD = "Direction layers"
# how a direction is ablated, and the page's words for it
DIRECTION_MODES = {"mean": "to the baseline's level", "zero": "to zero (project out)"}
# neuron sets found by patching at the prompt (``personachat.neurons``, labelled
# ``{pair}.{site}.patching`` or ``.exact``) are meant to be mean-ablated there: at the prompt
# tokens (attribution patching) or at the last prompt token (exact patching)
MEANT_POSITIONS = {".patching": "prompt", ".exact": LAST_PROMPT_TOKEN}

Units = Literal["raw", "x residual norm"]


class InputError(ValueError):
    """Something typed in the page cannot be used; the message says what and how to fix it."""


@dataclass(frozen=True)
class CapSettings:
    """A persona held, checked (``personachat.app.capping`` parses and applies it): keep the
    projection on ``direction`` (a persona, or the assistant axis) on ``side`` of a level at
    ``layers`` and ``positions``; the level is a ``percentile`` of the vector's reference
    distribution or a raw ``threshold``."""

    direction: str
    side: Literal["above", "below"] = "above"
    percentile: float | None = 5.0
    threshold: float | None = None
    layers: tuple[int, ...] = (0,)
    positions: str = LAST_PROMPT_TOKEN  # one of ABLATION_POSITIONS


@dataclass(frozen=True)
class Settings:
    """One session's steering, ablation and sampling settings, already checked."""

    personas: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    layer_strengths: tuple[tuple[int, float], ...] = ()
    units: Units = "raw"
    positions: str = "all"
    system_prompt: str = ""
    temperature: float = 0.0
    max_new_tokens: int = 64
    seed: int = 0
    neuron_sets: tuple[str, ...] = ()
    neurons: tuple[tuple[int, int], ...] = ()
    ablation: Literal["off", "zero", "mean"] = "off"
    side_by_side: bool = False
    vectors_from: str = ""  # which stored vectors (positions kind); "" = the preferred kind
    last_n: int | None = None  # positions "prompt": steer only its last n tokens (None: all)
    direction: str = ""  # the persona whose direction is ablated ("": none)
    direction_layers: tuple[int, ...] = ()
    direction_mode: Literal["mean", "zero"] = "mean"
    direction_positions: str = "all"  # one of DIRECTION_POSITIONS
    ablation_positions: str = "all"  # one of ABLATION_POSITIONS
    direction_from: str = ""  # the kind of vector the direction is read from ("": vectors_from)
    prompted: bool = False  # also the reply under the lead persona's own system prompt
    warnings: tuple[str, ...] = ()  # a strength far past the residual norm
    cap: CapSettings | None = None  # the persona held (``personachat.app.capping``); None: none

    @property
    def steering(self) -> bool:
        return bool(self.personas) and any(s != 0 for _, s in self.layer_strengths)

    @property
    def ablating(self) -> bool:
        return self.ablation != "off" and bool(self.neuron_sets or self.neurons)

    @property
    def projecting(self) -> bool:
        return bool(self.direction) and bool(self.direction_layers)

    def blend(self) -> dict[str, float]:
        return dict(zip(self.personas, self.weights, strict=True))

    @property
    def lead(self) -> str:
        """The persona with the largest positive weight ("" when none has one): whose own
        system prompt the prompted baseline uses."""
        positive = [(w, p) for p, w in self.blend().items() if w > 0]
        return max(positive, key=lambda t: t[0])[1] if positive else ""


def check_message(text: str | None, max_chars: int = MAX_MESSAGE_CHARS) -> str:
    """The message stripped; empty or longer than ``max_chars`` is an ``InputError``."""
    message = (text or "").strip()
    if not message:
        raise InputError("The message is empty: type something to send.")
    if len(message) > max_chars:
        raise InputError(
            f"The message has {len(message)} characters; the limit is {max_chars} "
            "(message_chars). Shorten it and send again."
        )
    return message


def system_prompt(text: str | None) -> str:
    """The system prompt stripped; past ``BOUNDS.system_prompt_chars`` an ``InputError``."""
    prompt = (text or "").strip()
    try:
        return check_chars("The system prompt", prompt, "system_prompt_chars", "Shorten it.")
    except ValueError as err:
        raise InputError(str(err)) from None


def parse_number(
    name: str, value: object, *, low: float | None = None, high: float | None = None
) -> float:
    """A finite float from a number or text, within ``[low, high]`` when given."""
    try:
        number = float(str(value).strip()) if not isinstance(value, int | float) else float(value)
    except ValueError:
        raise InputError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {value!r}.")
    if (low is not None and number < low) or (high is not None and number > high):
        raise InputError(f"{name} must be between {low} and {high}, got {number:g}.")
    return number


def parse_int(name: str, value: object, *, low: int, high: int) -> int:
    number = parse_number(name, value, low=low, high=high)
    if number != int(number):
        raise InputError(f"{name} must be a whole number, got {value!r}.")
    return int(number)


def parse_weights(text: str | None, personas: Sequence[str]) -> tuple[float, ...]:
    """Blend weights for ``personas``: positional (``"1, -0.5"``) or named (``"a=1, b=-0.5"``)."""
    items = [item.strip() for item in re.split(r"[,;\n]", text or "") if item.strip()]
    if not items:
        return tuple(1.0 for _ in personas)
    if any("=" in item for item in items):
        named: dict[str, float] = {}
        for item in items:
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep or name not in personas:
                raise InputError(
                    f"weight {item!r} names no picked persona; picked: {', '.join(personas)}. "
                    "Write name=weight, e.g. 'pirate=1, cynic=-0.5'."
                )
            named[name] = parse_number(f"the weight of {name}", value)
        return tuple(named.get(p, 1.0) for p in personas)
    if len(items) != len(personas):
        raise InputError(
            f"{len(items)} weights for {len(personas)} picked personas "
            f"({', '.join(personas) or 'none'}); give one weight per persona, in order."
        )
    return tuple(
        parse_number(f"the weight of {p}", w) for p, w in zip(personas, items, strict=True)
    )


def parse_layer_spec(
    text: str | None, n_layers: int, field: str = "Strength per layer", default: float = 1.0
) -> dict[int, float]:
    """``"8-12:4, 13:2"`` -> ``{8: 4.0, ..., 12: 4.0, 13: 2.0}`` (the runtime's grammar; a bare
    layer takes ``default``); empty text is an empty dict (no steering). Errors start with
    ``field``."""
    from personachat.interventions import InterventionError
    from personachat.interventions.layers import parse_layer_spec as runtime_parse

    if not (text or "").strip():
        return {}
    try:
        return runtime_parse(str(text), n_layers, default)
    except InterventionError as err:
        raise InputError(f"{field}: {err}.") from None


def parse_layers(text: str | None, n_layers: int, field: str) -> tuple[int, ...]:
    """``"all"`` or ``"0-2, 5"`` -> the layers, sorted; the layer-spec grammar without strengths.
    Empty text or a strength (``"1:2"``) is an ``InputError`` starting with ``field``."""
    from personachat.interventions import InterventionError
    from personachat.interventions.layers import parse_layer_list

    if not (text or "").strip():
        raise InputError(
            f"{field} is empty: type 'all' or layers and ranges, e.g. '0-2, 5' "
            f"(the model has layers 0..{n_layers - 1})."
        )
    try:
        return tuple(parse_layer_list(str(text), n_layers))
    except InterventionError as err:
        raise InputError(f"{field}: {err}.") from None


def format_layers(layers: Sequence[int]) -> str:
    """The compact spec of a set of layers: ``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    from personachat.interventions.layers import format_layers as write

    return write(layers)


def parse_last_n(value: object) -> int | None:
    """The page's "last n prompt tokens": a whole number >= 0; 0 or empty is None (all)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    problem = "Last n prompt tokens must be a whole number, 0 or more (0 = the whole prompt)"
    try:
        number = float(str(value).strip()) if not isinstance(value, int | float) else float(value)
    except ValueError:
        raise InputError(f"{problem}; got {value!r}.") from None
    if not math.isfinite(number) or number < 0 or number != int(number):
        raise InputError(f"{problem}; got {value!r}.")
    return int(number) or None


def format_layer_spec(strengths: dict[int, float]) -> str:
    """The compact spec of ``strengths``, merging runs of equal strength: ``"1-3:4, 5:2"``."""
    from personachat.interventions.layers import format_layer_spec as write

    return write(strengths)


def preset_spec(preset: str, strength: float, best_layer: int, n_layers: int, band: int = 2) -> str:
    """The layer spec of a preset: the best layer, a band around it, or all layers."""
    if preset == "best layer":
        layers = [best_layer]
    elif preset == "band":
        layers = list(range(max(0, best_layer - band), min(n_layers, best_layer + band + 1)))
    elif preset == "all layers":
        layers = list(range(n_layers))
    else:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS[:3])}.")
    return format_layer_spec({layer: strength for layer in layers})


def parse_neurons(text: str | None, n_layers: int, mlp_width: int) -> tuple[tuple[int, int], ...]:
    """``"3:12, 3:40-45"`` -> ((3, 12), (3, 40), ..., (3, 45)), checked against the model."""
    from personachat.interventions import InterventionError
    from personachat.interventions.layers import parse_neurons as runtime_parse

    cleaned = ",".join(i.strip() for i in re.split(r"[,;\n]", text or "") if i.strip())
    try:
        check_neuron_count(cleaned, "Neurons")
        neurons = runtime_parse(cleaned, n_layers, mlp_width)
    except BoundError as err:
        raise InputError(str(err)) from None
    except InterventionError as err:
        raise InputError(f"Neurons: {err}.") from None
    return tuple(dict.fromkeys(neurons))


def check_choice(field: str, value: object, choices: Sequence[str], words: str = "") -> str:
    """``value`` when it is one of ``choices``; else an ``InputError`` naming ``field``."""
    if value in choices:
        return str(value)
    listed = ", ".join(f"'{c}'" for c in choices)
    raise InputError(f"{field} must be one of {listed}{words}; got {value!r}.")


def patching_sets(labels: Sequence[str]) -> tuple[str, ...]:
    """The neuron sets among ``labels`` found by patching at the prompt (attribution or exact
    patching; meant for mean ablation there, see ``meant_positions``)."""
    return tuple(label for label in labels if meant_positions(label))


def meant_positions(label: str) -> str:
    """Where a neuron set is meant to be mean-ablated (an ``ABLATION_POSITIONS`` choice), or
    "" for sets with no such place."""
    return next((v for k, v in MEANT_POSITIONS.items() if label.endswith(k)), "")


def check_personas(picked: Sequence[str] | None, known: Sequence[str]) -> tuple[str, ...]:
    """The picked personas, each still registered; a removed one is named with the known ones."""
    personas = tuple(dict.fromkeys(picked or []))
    missing = [p for p in personas if p not in known]
    if missing:
        raise InputError(
            f"persona {', '.join(missing)} is not in the store for this model (removed while "
            f"the page was open?). Known: {', '.join(known) or 'none'}. Press 'Refresh' and "
            "pick again."
        )
    return personas


def check_neuron_sets(picked: Sequence[str] | None, known: Sequence[str]) -> tuple[str, ...]:
    sets = tuple(dict.fromkeys(picked or []))
    missing = [s for s in sets if s not in known]
    if missing:
        raise InputError(
            f"neuron set {', '.join(missing)} is not in the store for this model. "
            f"Known: {', '.join(known) or 'none'}. Press 'Refresh' and pick again."
        )
    return sets


@dataclass(frozen=True)
class Limits:
    """What the current model and store allow; the parser checks inputs against it."""

    n_layers: int
    mlp_width: int
    personas: tuple[str, ...]
    neuron_sets: tuple[str, ...]
    best_layers: Mapping[str, int] = field(default_factory=dict)  # persona -> best layer
    norms: Mapping[str, Norms] = field(default_factory=dict)  # persona -> vector/residual norms

    def best_layer(self, personas: Sequence[str]) -> int:
        """The best layer of the first of ``personas`` that has one; the middle layer if none."""
        found = [self.best_layers[p] for p in personas if p in self.best_layers]
        return found[0] if found else self.n_layers // 2


@dataclass(frozen=True)
class ChatInputs:
    """The page's chat settings as its controls hold them (text and numbers, not yet checked),
    in the page's order; ``parse_settings`` checks them into ``Settings``. The defaults are the
    ``/chat`` endpoint's; a ``model_id`` of None or "" is the app's default model."""

    model_id: str | None
    personas: Sequence[str] | None = None
    weights: str | None = None
    layer_spec: str | None = None
    units: str = "raw"
    positions: str = "all"
    system_prompt: str | None = None
    temperature: float | str = 0.0
    max_new_tokens: float | str = 64
    seed: float | str = 0
    neuron_sets: Sequence[str] | None = None
    neurons: str | None = None
    ablation: str = "off"
    side_by_side: bool = False
    vectors_from: str | None = None
    last_n: float | str | None = 0
    direction: str | None = NO_DIRECTION
    direction_layers: str | None = "all"
    direction_mode: str = "mean"
    direction_positions: str = "all"
    ablation_positions: str = "all"
    preset: str = "custom"
    strength: float | str | None = 1.0
    direction_from: str | None = ""
    cap: str | None = NO_DIRECTION  # hold this persona ("none": nothing held)
    cap_side: str = "above"  # above: keep its projection at least the level; below: at most
    cap_by: str = "percentile"  # the level as a percentile of its reference, or a raw threshold
    cap_level: float | str | None = 5.0
    cap_layers: str | None = "0"
    cap_positions: str = LAST_PROMPT_TOKEN


def layer_strengths(limits: Limits, inputs: ChatInputs, picked: Sequence[str]) -> dict[int, float]:
    """The strength per layer: from the preset around the first persona's best layer, or from
    the typed spec (``"custom"``), where bare layers take the strength."""
    preset = check_choice("Preset", inputs.preset, PRESETS)
    strength = parse_number("Strength", 1.0 if inputs.strength is None else inputs.strength)
    if preset != "custom":
        spec = preset_spec(preset, strength, limits.best_layer(picked), limits.n_layers)
        return parse_layer_spec(spec, limits.n_layers)
    strengths = parse_layer_spec(inputs.layer_spec, limits.n_layers, default=strength)
    if picked and not strengths:
        raise InputError(
            "Strength per layer is empty: type layers and strengths (e.g. '2:4' or '1-3:2') "
            "or pick a preset."
        )
    return strengths


def push_warnings(
    limits: Limits, strengths: dict[int, float], weights: dict[str, float], units: str
) -> tuple[str, ...]:
    """A warning when the blend adds far more than the residual stream holds at a layer; an
    ``InputError`` when it adds so much that the numbers mean nothing."""
    worst = push(strengths, weights, units, limits.norms)
    refused = too_far(worst)
    if refused:
        raise InputError(refused)
    warning = push_warning(worst)
    return (warning,) if warning else ()


def parse_settings(limits: Limits, inputs: ChatInputs) -> Settings:
    """Check every input against ``limits``; the first problem raises ``InputError``.

    ``last_n`` counts only with ``positions="prompt"``. ``direction`` ("none" or empty: none)
    is checked by the runtime, whose error lists the known personas; ``direction_mode`` and
    ``direction_positions`` say how and where it is ablated, ``ablation_positions`` where the
    neurons are."""
    picked = check_personas(inputs.personas, limits.personas)
    strengths = layer_strengths(limits, inputs, picked)
    units, ablation, positions = inputs.units, inputs.ablation, inputs.positions
    if units not in UNITS:
        raise InputError(f"unknown units {units!r}; choose {' or '.join(UNITS)}.")
    if ablation not in ABLATION_MODES:
        raise InputError(f"unknown ablation {ablation!r}; choose {', '.join(ABLATION_MODES)}.")
    tail = parse_last_n(inputs.last_n)
    words = " (" + ", ".join(f"{k}: {v}" for k, v in DIRECTION_MODES.items()) + ")"
    mode = check_choice("Direction mode", inputs.direction_mode, tuple(DIRECTION_MODES), words)
    where = check_choice("Direction positions", inputs.direction_positions, DIRECTION_POSITIONS)
    ablated_at = check_choice("Ablation positions", inputs.ablation_positions, ABLATION_POSITIONS)
    direction = (inputs.direction or "").strip()
    projected = "" if direction in ("", NO_DIRECTION) else direction
    layers: tuple[int, ...] = ()
    if projected:
        layers = parse_layers(inputs.direction_layers, limits.n_layers, DIRECTION_FIELD)
    weights = parse_weights(inputs.weights, picked)
    warnings = push_warnings(limits, strengths, dict(zip(picked, weights, strict=True)), units)
    return Settings(
        personas=picked,
        weights=weights,
        layer_strengths=tuple(sorted(strengths.items())),
        units=units,  # type: ignore[arg-type]
        positions=positions,
        system_prompt=system_prompt(inputs.system_prompt),
        temperature=parse_number("temperature", inputs.temperature, low=0.0, high=5.0),
        max_new_tokens=parse_int(NEW_TOKENS, inputs.max_new_tokens, low=1, high=MAX_NEW_TOKENS),
        seed=parse_int("seed", inputs.seed, low=0, high=2**31 - 1),
        neuron_sets=check_neuron_sets(inputs.neuron_sets, limits.neuron_sets),
        neurons=parse_neurons(inputs.neurons, limits.n_layers, limits.mlp_width),
        ablation=ablation,  # type: ignore[arg-type]
        side_by_side=bool(inputs.side_by_side),
        vectors_from=inputs.vectors_from or "",
        last_n=tail if positions == "prompt" else None,
        direction=projected,
        direction_layers=layers,
        direction_mode=mode,  # type: ignore[arg-type]
        direction_positions=where,
        ablation_positions=ablated_at,
        direction_from=(inputs.direction_from or "").strip() if projected else "",
        warnings=warnings,
    )
