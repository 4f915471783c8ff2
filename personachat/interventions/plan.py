"""Build the handlers of one generation from specs, checked against the model first.

Specs are frozen dataclasses naming *what* to do; ``build_plan`` checks them against the model
(before anything touches it) and turns them into the handlers of
``personachat.interventions.handlers``, with every tensor precomputed on the device of the layer
it acts at::

    plan = build_plan(lm, vectors, steering=SteeringSpec({"pirate": 0.7, "cynic": -0.3}),
                      readout=["pirate"], prompt_len=n_prompt)
    with intervene(lm.sites, plan.handlers):
        lm.model.generate(...)
    projections = plan.readout.result()  # [rows, tokens, layers, vectors]

Steering adds ``strength[layer] * sum_k weight_k * v_k[layer]`` to the residual stream, in raw
units (1.0 = the vector as extracted) or calibrated units (multiples of the layer's mean residual
norm along the unit vector). ``rows`` gives each batch row a coefficient (row 0 unsteered, row 1
steered); ``prompt_len`` tells position windows where the prompt ends (``None``: the first
forward is the prompt).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from personachat.hooks import Handler, Site
from personachat.interventions.capping import Cap, CapSpec, cap_levels, check_cap
from personachat.interventions.handlers import Ablate, DirectionalAblation, Readout, Steer
from personachat.interventions.interference import InterferenceReport, blend_interference
from personachat.interventions.layers import check_neuron, layer_strengths, parse_neurons
from personachat.interventions.specs import (
    ABLATION_MODES,
    POSITION_MODES,
    UNITS,
    AblationSpec,
    DirectionSpec,
    InterventionError,
    SteeringSpec,
    check_finite,
)
from personachat.model import LoadedModel
from personachat.prompts import RenderConditions, conditions
from personachat.records import NeuronSet, PersonaVector

log = logging.getLogger(__name__)


def check_vector(lm: LoadedModel, vector: PersonaVector) -> None:
    """Raise unless ``vector`` fits ``lm``'s residual stream (layers and hidden size)."""
    info = lm.info
    if vector.vector.dim() != 2:
        raise InterventionError(
            f"persona vector {vector.persona!r} has shape {tuple(vector.vector.shape)}; "
            "expected [n_layers, hidden]"
        )
    if vector.hidden_size != info.hidden_size or vector.n_layers != info.n_layers:
        raise InterventionError(
            f"persona vector {vector.persona!r} has {vector.n_layers} layers x "
            f"{vector.hidden_size} dims (from {vector.model_id!r}) but {info.model_id!r}'s "
            f"residual stream has {info.n_layers} layers x {info.hidden_size} dims; was it "
            "extracted from another model? Extract it for this model first."
        )
    if not bool(torch.isfinite(vector.vector).all()):
        raise InterventionError(f"persona vector {vector.persona!r} contains NaN or inf values")
    if vector.model_id != info.model_id:
        log.warning(
            "persona vector %r comes from %r, used on %r (same shape)",
            vector.persona,
            vector.model_id,
            info.model_id,
        )


def render_warnings(lm: LoadedModel, used: Sequence[PersonaVector]) -> list[str]:
    """A warning per vector whose prompts were rendered otherwise than ``lm``'s are now (another
    chat template, system mode, BOS or pinned date): its direction was read from other tokens.
    Vectors that recorded no render conditions (older stores) are taken as they are."""
    now = conditions(lm.tokenizer)
    out = []
    for vector in used:
        if not vector.render:
            continue
        try:
            then = RenderConditions.from_json(vector.render)
        except (ValueError, KeyError) as err:
            out.append(f"{vector.persona}: its render conditions cannot be read ({err})")
            continue
        differs = then.differences(now)
        if differs:
            out.append(
                f"{vector.persona} was read from prompts rendered with {'; '.join(differs)}; "
                "re-extract it with this model's tokenizer for steering you can trust"
            )
    for message in out:
        log.warning("render conditions: %s", message)
    return out


def lookup(vectors: Mapping[str, PersonaVector], persona: str) -> PersonaVector:
    """The vector named ``persona``, or an error listing the known ones."""
    if persona not in vectors:
        known = ", ".join(sorted(vectors)) or "none registered"
        raise InterventionError(f"unknown persona {persona!r}; known personas: {known}")
    return vectors[persona]


def best_layer(vector: PersonaVector) -> int | None:
    return vector.metrics.best_layer if vector.metrics is not None else None


@dataclass
class Plan:
    """Validated handlers for one generation, in hook order, and what they report back."""

    handlers: list[Handler]
    steer: Steer | None = None
    readout: Readout | None = None
    interference: InterferenceReport | None = None
    steered_layers: dict[int, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # vectors read under other conditions


def _row_tensor(rows: Sequence[float] | None, device: torch.device) -> torch.Tensor | None:
    if rows is None:
        return None
    for value in rows:
        check_finite(float(value), "row coefficient")
    return torch.tensor([float(v) for v in rows], device=device)


def _check_positions(positions: str, last_n: int | None) -> None:
    if positions not in POSITION_MODES:
        raise InterventionError(f"unknown positions {positions!r}; use one of {POSITION_MODES}")
    if last_n is not None and last_n < 1:
        raise InterventionError(f"last_n must be at least 1, got {last_n}")


def build_steer(
    lm: LoadedModel,
    vectors: Mapping[str, PersonaVector],
    spec: SteeringSpec,
    *,
    prompt_len: int | None = None,
    rows: Sequence[float] | None = None,
) -> tuple[Steer, InterferenceReport | None, dict[int, float]]:
    """Validate ``spec`` and precompute its per-layer offsets."""
    if not spec.blend:
        raise InterventionError("the steering blend is empty; name at least one persona")
    if spec.units not in UNITS:
        raise InterventionError(f"unknown units {spec.units!r}; use one of {UNITS}")
    _check_positions(spec.positions, spec.last_n)
    check_finite(spec.strength, "steering strength")
    terms: list[tuple[str, float, PersonaVector]] = []
    for persona, weight in spec.blend.items():
        check_finite(float(weight), f"weight of {persona!r}")
        vector = lookup(vectors, persona)
        check_vector(lm, vector)
        terms.append((persona, float(weight), vector))
    n_layers = lm.info.n_layers
    lead = max(terms, key=lambda t: abs(t[1]))[2]
    strengths = layer_strengths(spec.layers, spec.strength, n_layers, best_layer(lead), spec.band)
    scaled: list[tuple[str, float, torch.Tensor]] = []
    for persona, weight, vector in terms:
        v = vector.vector.float()
        if spec.units == "calibrated":
            if vector.metrics is None:
                raise InterventionError(
                    f"calibrated units need the mean residual norm per layer, which persona "
                    f"{persona!r} lacks (no metrics); use units='raw'"
                )
            norms = vector.metrics.resid_norm.float()[:, None]
            v = torch.nn.functional.normalize(v, dim=-1) * norms
        scaled.append((persona, weight, v))
    blend = sum(w * v for _, w, v in scaled)
    assert isinstance(blend, torch.Tensor)
    dtype = next(lm.model.parameters()).dtype
    device = lm.device
    deltas = {
        layer: (s * blend[layer]).to(device=site_device(lm, "residual", layer), dtype=dtype)
        for layer, s in strengths.items()
        if s != 0.0
    }
    steer = Steer(
        deltas,
        positions=spec.positions,
        last_n=spec.last_n,
        prompt_len=prompt_len,
        rows=_row_tensor(rows, device),
    )
    report = blend_interference(scaled, sorted(strengths)) if len(scaled) > 1 else None
    return steer, report, strengths


def build_ablation(
    lm: LoadedModel,
    spec: AblationSpec,
    neuron_sets: Mapping[str, NeuronSet],
    *,
    rows: Sequence[bool] | None = None,
    prompt_len: int | None = None,
) -> Ablate:
    """Validate ``spec`` and group its units by layer."""
    if spec.mode not in ABLATION_MODES:
        raise InterventionError(f"unknown ablation mode {spec.mode!r}; use one of {ABLATION_MODES}")
    _check_positions(spec.positions, spec.last_n)
    site, units = _set_units(lm, spec, neuron_sets)
    for key in _typed_units(lm, spec):
        units.setdefault(key, 0.0)
    if not units:
        raise InterventionError("the ablation names no neurons; give a neuron set or '3:12,5:7'")
    by_layer: dict[int, list[tuple[int, float]]] = {}
    for (layer, index), value in sorted(units.items()):
        by_layer.setdefault(layer, []).append((index, value))
    device, dtype = lm.device, next(lm.model.parameters()).dtype
    indices = {
        layer: torch.tensor([i for i, _ in items], device=site_device(lm, site, layer))
        for layer, items in by_layer.items()
    }
    values = None
    if spec.mode == "mean":
        values = {
            layer: torch.tensor([v for _, v in items], device=indices[layer].device, dtype=dtype)
            for layer, items in by_layer.items()
        }
    mask = None if rows is None else torch.tensor([bool(r) for r in rows], device=device)
    return Ablate(
        indices,
        values,
        width=lm.info.mlp_width,
        site=site,
        rows=mask,
        dtype=dtype,
        positions=spec.positions,
        last_n=spec.last_n,
        prompt_len=prompt_len,
    )


def _set_units(
    lm: LoadedModel, spec: AblationSpec, neuron_sets: Mapping[str, NeuronSet]
) -> tuple[Site, dict[tuple[int, int], float]]:
    """The site and ``{(layer, index): baseline mean}`` of the spec's neuron set (top k)."""
    units: dict[tuple[int, int], float] = {}
    if spec.neuron_set is None:
        return "mlp_hidden", units
    if spec.neuron_set not in neuron_sets:
        known = ", ".join(sorted(neuron_sets)) or "none registered"
        raise InterventionError(f"unknown neuron set {spec.neuron_set!r}; known sets: {known}")
    nset = neuron_sets[spec.neuron_set]
    if nset.site not in ("mlp_hidden", "gate"):
        raise InterventionError(f"neuron set {spec.neuron_set!r} has unknown site {nset.site!r}")
    site: Site = "gate" if nset.site == "gate" else "mlp_hidden"
    if site == "gate" and lm.sites.gates is None:
        raise InterventionError(
            f"neuron set {spec.neuron_set!r} lives at the gate, but "
            f"{lm.info.architecture} has no separate gate projection"
        )
    if spec.mode == "mean" and nset.means is None:
        raise InterventionError(
            f"mean ablation needs baseline means, which neuron set {spec.neuron_set!r} lacks; "
            "use mode='zero'"
        )
    count = len(nset) if spec.top_k is None else min(spec.top_k, len(nset))
    for i in range(count):
        layer, index = nset.layers[i], nset.indices[i]
        check_neuron(layer, index, lm.info.n_layers, lm.info.mlp_width)
        value = float(nset.means[i]) if nset.means is not None else 0.0
        check_finite(value, f"baseline mean of neuron {layer}:{index} in {spec.neuron_set!r}")
        units[(layer, index)] = value
    return site, units


def _typed_units(lm: LoadedModel, spec: AblationSpec) -> list[tuple[int, int]]:
    """The spec's typed ``(layer, index)`` units, checked; zero ablation only."""
    n_layers, width = lm.info.n_layers, lm.info.mlp_width
    typed = (
        parse_neurons(spec.neurons, n_layers, width)
        if isinstance(spec.neurons, str)
        else [check_neuron(int(la), int(i), n_layers, width) for la, i in spec.neurons]
    )
    if typed and spec.mode == "mean":
        raise InterventionError(
            "mean ablation of typed neurons needs baseline means; ablate a registered neuron set "
            "or use mode='zero'"
        )
    return typed


def site_device(lm: LoadedModel, site: Site, layer: int) -> torch.device:
    """The device of the module behind ``(site, layer)`` (layers may be spread over GPUs)."""
    sites = lm.sites
    module = {"residual": sites.layers, "mlp_hidden": sites.mlp_down}.get(site, sites.gates)
    assert module is not None
    for param in module[layer].parameters():
        return param.device
    return lm.device


def unit_vectors(lm: LoadedModel, vector: PersonaVector) -> torch.Tensor:
    """``vector`` normalised per layer, on the model's device and dtype."""
    unit = torch.nn.functional.normalize(vector.vector.float(), dim=-1)
    return unit.to(device=lm.device, dtype=next(lm.model.parameters()).dtype)


def build_directional(
    lm: LoadedModel,
    vectors: Mapping[str, PersonaVector],
    spec: DirectionSpec,
    *,
    rows: Sequence[float] | None = None,
    prompt_len: int | None = None,
) -> DirectionalAblation:
    """Validate ``spec``; mean mode needs the vector's baseline mean (``baseline_mean``)."""
    if spec.mode not in ABLATION_MODES:
        raise InterventionError(
            f"unknown direction mode {spec.mode!r}; use one of {ABLATION_MODES}"
        )
    _check_positions(spec.positions, spec.last_n)
    vector = lookup(vectors, spec.persona)
    check_vector(lm, vector)
    layers = layer_strengths(spec.layers, 1.0, lm.info.n_layers, best_layer(vector), 2)
    unit = unit_vectors(lm, vector)
    levels: dict[int, float] = {}
    if spec.mode == "mean":
        base = vector.baseline_mean
        if base is None:
            raise InterventionError(
                f"mean directional ablation of {spec.persona!r} needs its baseline "
                f"{vector.baseline!r}'s mean activations, which were not registered with this "
                "vector; re-extract it (scripts/extract_vectors.py registers them) or use "
                "mode='zero'"
            )
        if tuple(base.shape) != tuple(vector.vector.shape):
            raise InterventionError(
                f"the baseline mean of {spec.persona!r} has shape {tuple(base.shape)}, the "
                f"vector {tuple(vector.vector.shape)}"
            )
        levels = {layer: float(base[layer].float() @ unit[layer].float().cpu()) for layer in layers}
    return DirectionalAblation(
        {layer: unit[layer].to(site_device(lm, "residual", layer)) for layer in layers},
        levels,
        rows=_row_tensor(rows, lm.device),
        positions=spec.positions,
        last_n=spec.last_n,
        prompt_len=prompt_len,
    )


def build_cap(
    lm: LoadedModel,
    vectors: Mapping[str, PersonaVector],
    spec: CapSpec,
    *,
    rows: Sequence[float] | None = None,
    prompt_len: int | None = None,
) -> Cap:
    """Validate ``spec`` and resolve its level at each layer (raw, or from the reference)."""
    check_cap(spec)
    vector = lookup(vectors, spec.persona)
    check_vector(lm, vector)
    layers = layer_strengths(spec.layers, 1.0, lm.info.n_layers, best_layer(vector), 2)
    unit = unit_vectors(lm, vector)
    return Cap(
        {layer: unit[layer].to(site_device(lm, "residual", layer)) for layer in layers},
        cap_levels(vector, spec, layers),
        spec.side,
        rows=_row_tensor(rows, lm.device),
        positions=spec.positions,
        last_n=spec.last_n,
        prompt_len=prompt_len,
    )


def build_readout(
    lm: LoadedModel,
    vectors: Mapping[str, PersonaVector],
    selected: Sequence[str | PersonaVector],
    layers: Sequence[int] | None = None,
) -> Readout:
    """A readout of ``selected`` (names in ``vectors`` or records) at ``layers`` (default all)."""
    records = [lookup(vectors, s) if isinstance(s, str) else s for s in selected]
    for record in records:
        check_vector(lm, record)
    n_layers = lm.info.n_layers
    chosen = list(range(n_layers)) if layers is None else list(layers)
    for layer in chosen:
        if not 0 <= layer < n_layers:
            raise InterventionError(
                f"readout layer {layer} is out of range: the model has {n_layers} layers"
            )
    stacked = torch.stack([unit_vectors(lm, r) for r in records], dim=1)  # [n_layers, V, H]
    units = {layer: stacked[layer].to(site_device(lm, "residual", layer)) for layer in chosen}
    return Readout(units, [r.persona for r in records], chosen)


def build_plan(
    lm: LoadedModel,
    vectors: Mapping[str, PersonaVector],
    *,
    steering: SteeringSpec | None = None,
    ablation: AblationSpec | None = None,
    direction: DirectionSpec | None = None,
    readout: Sequence[str | PersonaVector] = (),
    neuron_sets: Mapping[str, NeuronSet] | None = None,
    prompt_len: int | None = None,
    rows: Sequence[float] | None = None,
    cap: CapSpec | None = None,
) -> Plan:
    """Check every request against ``lm`` and build the handlers; raises before any hook exists.

    ``rows`` gives each batch row's intervention coefficient (``[0, 1]``: row 0 untouched, row 1
    steered, ablated and direction-ablated); readouts cover every row.
    """
    handlers: list[Handler] = []
    plan = Plan(handlers)
    if steering is not None:
        plan.steer, plan.interference, plan.steered_layers = build_steer(
            lm, vectors, steering, prompt_len=prompt_len, rows=rows
        )
        handlers.append(plan.steer)
    if direction is not None:
        on = None if rows is None else [1.0 if float(r) != 0.0 else 0.0 for r in rows]
        handlers.append(build_directional(lm, vectors, direction, rows=on, prompt_len=prompt_len))
    if ablation is not None:
        mask = None if rows is None else [float(r) != 0.0 for r in rows]
        handlers.append(
            build_ablation(lm, ablation, neuron_sets or {}, rows=mask, prompt_len=prompt_len)
        )
    if cap is not None:
        on = None if rows is None else [1.0 if float(r) != 0.0 else 0.0 for r in rows]
        handlers.append(build_cap(lm, vectors, cap, rows=on, prompt_len=prompt_len))
    if readout:
        plan.readout = build_readout(lm, vectors, readout)
        handlers.append(plan.readout)
    used = [
        *(steering.blend if steering else ()),
        *([direction.persona] if direction else ()),
        *([cap.persona] if cap else ()),
    ]
    plan.warnings = render_warnings(lm, [vectors[name] for name in dict.fromkeys(used)])
    return plan
