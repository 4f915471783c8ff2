"""PersonaChat's interventions as interp-engine steering requests: the one place the two meet.

``row_steering(request, job)`` reads a prepared ``Job`` (its plan, built and checked by
``build_plan``) and gives, per row, what interp-engine's ``steer()`` takes for that row's request:
a ``SteeringSpec`` of ops at ``resid_post`` (the output of decoder layer L, the layer PersonaChat's
residual site names), the prompt positions to leave alone and whether generated positions are
written. At each layer the ops keep the plan's order:

- steering: ``AddSpec`` of the plan's own per-layer offset (blend, units and strengths applied);
- directional ablation: ``AblateSpec`` (``mode="zero"``, projected out) or a ``ProjectionCapSpec``
  with both bounds at the baseline's level (``mode="mean"``: ``x - (x.u - m) u``);
- a cap: ``ProjectionCapSpec`` with one bound (``side="above"``: ``min``; ``"below"``: ``max``).

interp-engine takes ONE position window per request, so every intervention of a request must
act at the same positions. What it cannot express raises ``InterventionError`` naming the
setting and saying to use ``--engine hf``: neuron ablation (per MLP unit), the per-token
readout, extra hook handlers, interventions at different positions, a repetition penalty and a
minimum length. Nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from personachat.chat.job import Job, Request
from personachat.interventions import Cap, InterventionError
from personachat.interventions.handlers import Ablate, DirectionalAblation, Readout, Steer

USE_HF = "use --engine hf for it"


@dataclass(frozen=True)
class RowSteering:
    """One row's request to interp-engine: ``spec`` (None: plain), the prompt positions to leave
    alone (``position_mask``) and whether generated positions are written (``generated``)."""

    spec: Any
    position_mask: list[int] | None = None
    generated: bool = True


def refuse(setting: str) -> InterventionError:
    return InterventionError(f"--engine vllm (interp-engine) cannot apply {setting}; {USE_HF}")


def row_steering(request: Request, job: Job) -> list[RowSteering]:
    """Each row's steering request (see the module); raises what the engine cannot express."""
    settings = job.settings
    if settings.repetition_penalty != 1.0:
        raise refuse(f"a repetition penalty ({settings.repetition_penalty})")
    if settings.min_new_tokens:
        raise refuse(f"a minimum reply length ({settings.min_new_tokens} tokens)")
    if job.extras:
        raise refuse(f"{len(job.extras)} extra hook handler(s) (more neuron sets, a held reply)")
    for handler in job.plan.handlers:
        if isinstance(handler, Ablate):
            raise refuse("neuron ablation (MLP units, one by one)")
        if isinstance(handler, Readout):
            raise refuse("the per-token readout")
    mask, generated = window(request, job.prompt_len)
    out = []
    for row in range(job.rows):
        ops = row_ops(job, row)
        spec = _spec(ops) if ops else None
        out.append(RowSteering(spec, mask if spec else None, generated if spec else True))
    return out


def window(request: Request, prompt_len: int) -> tuple[list[int] | None, bool]:
    """The one position window of the request's interventions, as (masked prompt positions,
    generated positions written)."""
    asked = {
        name: (spec.positions, spec.last_n if spec.positions == "prompt" else None)
        for name, spec in (
            ("steering", request.steering),
            ("the directional ablation", request.direction),
            ("the cap", request.cap),
        )
        if spec is not None
    }
    if len(set(asked.values())) > 1:
        where = ", ".join(f"{name} at {_words(*w)}" for name, w in asked.items())
        raise refuse(f"interventions at different positions ({where}): it takes one window")
    positions, last_n = next(iter(asked.values()), ("all", None))
    if positions == "generated":
        return list(range(prompt_len)), True
    if positions == "prompt":
        first = 0 if last_n is None else max(prompt_len - last_n, 0)
        return (list(range(first)) or None), False
    return None, True


def row_ops(job: Job, row: int) -> dict[int, list[Any]]:
    """``{layer: [interp-engine op, ...]}`` of one row, in the plan's order."""
    from interp_engine import AblateSpec, AddSpec, ProjectionCapSpec

    ops: dict[int, list[Any]] = {}
    for handler in job.plan.handlers:
        if isinstance(handler, Steer):
            for layer, delta in handler.deltas.items():
                d = delta[row, 0] if handler.rows is not None else delta
                if bool(d.any()):
                    ops.setdefault(layer, []).append(AddSpec(d.detach().float().cpu(), 1.0))
        elif isinstance(handler, DirectionalAblation) and _on(handler.rows, row):
            for layer, unit in handler.units.items():
                u = unit.detach().float().cpu()
                level = handler.levels.get(layer)
                op = AblateSpec(u) if level is None else ProjectionCapSpec(u, level, level)
                ops.setdefault(layer, []).append(op)
        elif isinstance(handler, Cap) and _on(handler.rows, row):
            for layer, unit in handler.units.items():
                level = handler.levels[layer]
                bounds = (level, None) if handler.side == "above" else (None, level)
                op = ProjectionCapSpec(unit.detach().float().cpu(), *bounds)
                ops.setdefault(layer, []).append(op)
    return ops


def _spec(ops: dict[int, list[Any]]) -> Any:
    from interp_engine import LayerSteeringSpec, SteeringSpec

    layers = {layer: LayerSteeringSpec(operations=ops[layer]) for layer in sorted(ops)}
    return SteeringSpec(layers=layers, point="resid_post")


def _on(rows: Any, row: int) -> bool:
    return rows is None or float(rows[row]) != 0.0


def _words(positions: str, last_n: int | None) -> str:
    if positions == "prompt" and last_n is not None:
        return f"the last {last_n} prompt tokens"
    return {"all": "all tokens", "prompt": "the prompt", "generated": "the generated tokens"}[
        positions
    ]
