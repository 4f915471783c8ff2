"""One line to steer any call of a model: ``with steer(lm, vector): lm.model.generate(...)``.

``steer`` builds a steering plan with ``build_plan`` (checking everything before the model is
touched) and runs the block inside ``personachat.hooks.intervene``, so every hook it added is gone
when the block exits, normally or by an exception::

    with steer(lm, pirate, strength=2, layers=range(0, 3), positions="prompt"):
        out = lm.model.generate(ids, max_new_tokens=32, do_sample=False)

    with steer(lm, {pirate: 0.7, cynic: -0.3}, layers="0-2:2"):  # a blend, layers as text
        ...

Position windows count from the block's first forward pass, which they take as the prompt (as
the chat engine's handlers do without a prompt length). With ``positions="prompt"`` or
``"generated"`` a block therefore covers one generation; ``"all"`` covers any number of calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

from personachat.hooks import intervene
from personachat.interventions.plan import Plan, build_plan
from personachat.interventions.specs import (
    InterventionError,
    PositionMode,
    SteeringSpec,
    Units,
)
from personachat.model import LoadedModel
from personachat.records import PersonaVector

Blend = (
    PersonaVector
    | Mapping[PersonaVector, float]
    | Iterable[PersonaVector | tuple[PersonaVector, float]]
)


@contextmanager
def steer(
    lm: LoadedModel,
    vectors: Blend,
    *,
    strength: float = 1.0,
    layers: str | Mapping[int, float] | Iterable[int] = "best",
    positions: PositionMode = "all",
    last_n: int | None = None,
    units: Units = "raw",
    band: int = 2,
) -> Iterator[Plan]:
    """Steer ``lm`` inside the block with one vector or a weighted blend; yields the plan.

    ``vectors``: a ``PersonaVector``, ``{vector: weight}``, or vectors and ``(vector, weight)``
    pairs (a bare vector weighs 1). ``layers``: a preset (``"best"``, ``"band"``, ``"all"``) or a
    layer spec (``"0-2:2"``) as for ``SteeringSpec``, ``{layer: strength}``, or layers alone
    (``range(0, 3)``) each at ``strength``. ``positions``, ``last_n``, ``units`` and ``band`` are
    those of ``SteeringSpec``. Raises ``InterventionError`` before any hook exists on bad input.
    """
    blend = _named(vectors)
    spec = SteeringSpec(
        {name: weight for name, (_, weight) in blend.items()},
        layers=layers,
        strength=strength,
        units=units,
        positions=positions,
        last_n=last_n,
        band=band,
    )
    plan = build_plan(lm, {name: vector for name, (vector, _) in blend.items()}, steering=spec)
    with intervene(lm.sites, plan.handlers):
        yield plan


def _named(vectors: Blend) -> dict[str, tuple[PersonaVector, float]]:
    """``{persona: (vector, weight)}`` of any form ``steer`` takes; one vector per persona."""
    if isinstance(vectors, PersonaVector):
        pairs = [(vectors, 1.0)]
    elif isinstance(vectors, Mapping):
        pairs = [(vector, float(weight)) for vector, weight in vectors.items()]
    else:
        pairs = [
            (item[0], float(item[1])) if isinstance(item, tuple) else (item, 1.0)
            for item in vectors
        ]
    named: dict[str, tuple[PersonaVector, float]] = {}
    for vector, weight in pairs:
        if not isinstance(vector, PersonaVector):
            raise InterventionError(
                f"steer takes PersonaVector records (or {{vector: weight}}), got "
                f"{type(vector).__name__}; load one with Store.load_vector"
            )
        if vector.persona in named:
            raise InterventionError(
                f"the blend has two vectors of persona {vector.persona!r}; give each persona once"
            )
        named[vector.persona] = (vector, weight)
    return named
