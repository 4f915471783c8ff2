"""A checked ``ChatRequest`` turned into one call of a chat engine: its specs, settings, prompt.

``prepare(backend, request)`` picks the engine of the model and kind of vectors the request
names, maps its ``steering`` to the runtime's specs (``SteeringSpec``, ``AblationSpec`` plus one
handler per further neuron set, ``DirectionSpec``, ``CapSpec``), checks that the prompt and the
reply fit the model's context, and starts the engine's stream, which checks every name and layer
against the model before anything runs. Whatever it refuses becomes an ``ApiError``: 404 for an
unknown model, 400 naming the field for the rest.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from personachat.app.api.fields import ApiError
from personachat.app.api.schema import ChatRequest
from personachat.app.api.steering import Steering, Window
from personachat.app.limits import BOUNDS, check_neuron_count, check_prompt_tokens


@dataclass
class Call:
    """A started request: the engine's updates, and what the reply is measured against."""

    updates: Iterator[Any]
    prompt_tokens: int
    eos: frozenset[int]
    stop: threading.Event = field(default_factory=threading.Event)
    # What the runtime warns about (a blend's interference, a vector read under other render
    # conditions), in order, once each
    warnings: list[str] = field(default_factory=list)


def served_models(backend: Any) -> list[str]:
    """The model ids this server answers with: the app's model (and its id in the store)."""
    names = [backend.default_model]
    if backend.is_demo(backend.default_model):
        from personachat.app.models import DEMO_ID

        names.append(DEMO_ID)
    return list(dict.fromkeys(names))


def prepare(backend: Any, request: ChatRequest) -> Call:
    """Start ``request`` on the backend's engine; ``ApiError`` before anything runs if refused."""
    from personachat.chat import GenerationSettings
    from personachat.chat.job import eos_ids

    if request.model not in served_models(backend):
        served = ", ".join(served_models(backend))
        raise ApiError(
            f"model {request.model!r} is not served here; use {served}",
            "model",
            "model_not_found",
            404,
        )
    steering = request.steering
    kind = steering.vectors_from if steering is not None else ""
    try:
        engine = backend.engine(backend.default_model, kind)
    except ValueError as err:  # an unknown kind of vectors
        raise ApiError(str(err), "steering.vectors_from") from None
    engine = _with_axis(backend, engine, steering)
    messages = [dict(m) for m in request.messages]
    settings = GenerationSettings(
        max_new_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
    )
    call = Call(iter(()), 0, frozenset(eos_ids(engine.lm)))
    try:
        call.prompt_tokens = _prompt_tokens(engine, messages, request.max_tokens)
        specs = engine_specs(engine, steering, request.side_by_side)
        _check_push(engine, specs.get("steering"))
        updates = engine.stream(
            messages, settings, side_by_side=request.side_by_side, stop=call.stop, **specs
        )
    except ValueError as err:  # InterventionError: a name, layer or number the model refuses
        raise ApiError(str(err), "steering", "invalid_steering") from None
    call.updates = backend.serving.gate.through(updates, call.stop)
    return call


def _with_axis(backend: Any, engine: Any, steering: Steering | None) -> Any:
    """``engine`` with the model's assistant axis among its vectors when the request holds or
    ablates it by name (as the page does), else ``engine``."""
    from personachat.app.calibration import AXIS, axis_vector, with_axis

    named = {
        getattr(steering, part).persona
        for part in ("cap", "direction")
        if steering is not None and getattr(steering, part) is not None
    }
    if AXIS not in named or AXIS in engine.vectors:
        return engine
    axis = axis_vector(backend.catalog, backend.default_model)
    return engine if axis is None else with_axis(engine, axis)


def _check_push(engine: Any, spec: Any) -> None:
    """Refuse a steering that adds more than ``BOUNDS.push`` residual norms at a layer, as the
    page does (``personachat.app.strength``)."""
    from personachat.app import browse
    from personachat.app.strength import CALIBRATED, RAW, push, too_far
    from personachat.interventions.layers import layer_strengths
    from personachat.interventions.plan import best_layer, lookup

    if spec is None:
        return
    lead = lookup(engine.vectors, max(spec.blend, key=lambda p: abs(spec.blend[p])))
    n_layers = engine.lm.info.n_layers
    strengths = layer_strengths(spec.layers, spec.strength, n_layers, best_layer(lead), spec.band)
    units = RAW if spec.units == "raw" else CALIBRATED
    refused = too_far(push(strengths, dict(spec.blend), units, browse.norms(engine)))
    if refused:
        raise ApiError(refused, "steering.strength", "invalid_steering")


def engine_specs(engine: Any, steering: Steering | None, side_by_side: bool) -> dict[str, Any]:
    """``ChatEngine.stream``'s keyword arguments for ``steering`` (empty: plain chat)."""
    from personachat.interventions import CapSpec, DirectionSpec, SteeringSpec

    if steering is None:
        return {}
    out: dict[str, Any] = {}
    if steering.personas:
        layers = steering.layers
        out["steering"] = SteeringSpec(
            dict(steering.personas),
            layers=dict(layers) if layers and isinstance(layers[0], tuple) else layers,  # type: ignore[arg-type]
            strength=steering.strength,
            units=steering.units,  # type: ignore[arg-type]
            **_window(steering.window),
        )
    if steering.ablation is not None:
        out.update(_ablation(engine, steering, side_by_side))
    if (d := steering.direction) is not None:
        out["direction"] = DirectionSpec(
            d.persona,
            _layers(d.layers),
            mode=d.mode,  # type: ignore[arg-type]
            **_window(d.window),
        )
    if (c := steering.cap) is not None:
        out["cap"] = CapSpec(
            c.persona,
            _layers(c.layers),
            side=c.side,  # type: ignore[arg-type]
            threshold=c.threshold,
            percentile=c.percentile,
            reference=c.reference,  # type: ignore[arg-type]
            **_window(c.window),
        )
    return out


def _ablation(engine: Any, steering: Steering, side_by_side: bool) -> dict[str, Any]:
    """The first neuron set (with the typed units) as the ``AblationSpec``, each further set as
    one more handler, as the page ablates several sets."""
    from personachat.interventions import AblationSpec, build_ablation

    a = steering.ablation
    assert a is not None
    try:
        check_neuron_count(a.neurons, "steering.ablation.neurons")
    except ValueError as err:
        raise ApiError(str(err), "steering.ablation.neurons") from None
    where = _window(a.window)
    first = a.sets[0] if a.sets else None
    handlers = []
    rows = [False, True] if side_by_side else None
    for label in a.sets[1:]:
        spec = AblationSpec(label, mode=a.mode, **where)  # type: ignore[arg-type]
        handlers.append(build_ablation(engine.lm, spec, engine.neuron_sets, rows=rows))
    spec = AblationSpec(first, a.neurons, a.mode, **where)  # type: ignore[arg-type]
    return {"ablation": spec, "handlers": handlers}


def _window(window: Window) -> dict[str, Any]:
    return {"positions": window.positions, "last_n": window.last_n}


def _layers(layers: str | Sequence[int]) -> Any:
    return layers if isinstance(layers, str) else list(layers)


def _prompt_tokens(engine: Any, messages: list[dict[str, Any]], max_tokens: int) -> int:
    """The prompt's length in tokens; 400 when it and the reply would not fit the context."""
    from personachat.app.generation import context_limit

    n = int(engine.prompt_ids(messages).shape[1])
    if n > BOUNDS.prompt_tokens:
        try:
            check_prompt_tokens(n)
        except ValueError as err:
            raise ApiError(str(err), "messages", "context_length_exceeded") from None
    limit = context_limit(engine.lm)
    if limit is not None and n + max_tokens > limit:
        raise ApiError(
            f"the conversation has {n} tokens and asks for {max_tokens} more, past the model's "
            f"context of {limit}; shorten the messages or max_tokens",
            "messages",
            "context_length_exceeded",
        )
    return n
