"""Steer, ablate and read out: the handlers that ``personachat.hooks.intervene`` runs live.

Specs are frozen dataclasses naming *what* to do; ``build_plan`` checks them against the model
(before anything touches it) and turns them into handlers with every tensor precomputed on the
model's device, so the hot path of a decode step is one or two tensor ops per hooked layer::

    plan = build_plan(lm, vectors, steering=SteeringSpec({"pirate": 0.7, "cynic": -0.3}),
                      readout=["pirate"], prompt_len=n_prompt)
    with intervene(lm.sites, plan.handlers):
        lm.model.generate(...)
    projections = plan.readout.result()  # [rows, tokens, layers, vectors]

Handlers (in the order ``build_plan`` lists them; a handler sees the result of the ones before):
- ``Steer``: add ``strength[layer] * sum_k weight_k * v_k[layer]`` to the residual stream, in raw
  units (1.0 = the vector as extracted) or calibrated units (multiples of the layer's mean
  residual norm along the unit vector), at all tokens, the prompt (or its last n tokens) or the
  generated tokens only, with a coefficient per batch row (row 0 unsteered, row 1 steered).
- ``DirectionalAblation``: project a persona direction out of the residual stream.
- ``Ablate``: zero or mean-ablate MLP units at the input of the down projection (or the gate).
- ``Readout``: the projection of the residual stream onto unit persona vectors at every layer,
  after the interventions at that layer, kept on the device and concatenated once at the end.

Positions: generation runs with a KV cache, so the first forward at a layer is the prefill (the
prompt) and each later forward is one generated token; handlers count positions per layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from personachat.hooks import Handler, Site
from personachat.interventions.layers import check_neuron, layer_strengths, parse_neurons
from personachat.interventions.specs import (
    ABLATION_MODES,
    POSITION_MODES,
    UNITS,
    AblationSpec,
    DirectionSpec,
    InterventionError,
    PositionMode,
    SteeringSpec,
    check_finite,
)
from personachat.model import LoadedModel
from personachat.records import NeuronSet, PersonaVector

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- validation


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


def lookup(vectors: Mapping[str, PersonaVector], persona: str) -> PersonaVector:
    """The vector named ``persona``, or an error listing the known ones."""
    if persona not in vectors:
        known = ", ".join(sorted(vectors)) or "none registered"
        raise InterventionError(f"unknown persona {persona!r}; known personas: {known}")
    return vectors[persona]


def _best_layer(vector: PersonaVector) -> int | None:
    return vector.metrics.best_layer if vector.metrics is not None else None


# --------------------------------------------------------------------------- positions


class _Cursor:
    """Counts positions per layer: the first forward is the prompt, later ones one token each."""

    def __init__(self, prompt_len: int | None) -> None:
        self.prompt_len = prompt_len
        self._seen: dict[int, int] = {}

    def advance(self, layer: int, length: int) -> tuple[int, int, int]:
        """``(start, end, prompt_len)`` of the positions in this forward at ``layer``."""
        start = self._seen.get(layer, 0)
        self._seen[layer] = start + length
        prompt_len = self.prompt_len if self.prompt_len is not None else length
        if self.prompt_len is None and start == 0:
            self.prompt_len = length
        return start, start + length, prompt_len


def _window(mode: PositionMode, last_n: int | None, prompt_len: int) -> tuple[int, int]:
    if mode == "all":
        return 0, 1 << 62
    if mode == "generated":
        return prompt_len, 1 << 62
    first = 0 if last_n is None else max(prompt_len - last_n, 0)
    return first, prompt_len


class _Window:
    """The positions of each forward a handler acts on: all, the prompt (or its last n tokens),
    or the generated tokens; ``span`` is the slice of this forward's positions, or ``None``."""

    def __init__(self, mode: PositionMode, last_n: int | None, prompt_len: int | None) -> None:
        self.mode: PositionMode = mode
        self.last_n = last_n
        self._cursor = _Cursor(prompt_len)

    def span(self, layer: int, length: int) -> tuple[int, int] | None:
        if self.mode == "all":
            return 0, length
        start, end, prompt_len = self._cursor.advance(layer, length)
        first, last = _window(self.mode, self.last_n, prompt_len)
        lo, hi = max(first, start), min(last, end)
        return None if lo >= hi else (lo - start, hi - start)

    def apply(
        self, layer: int, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor | None:
        """``fn`` on this forward's positions in the window (a copy of ``x`` with them
        replaced); ``None`` when the window misses this forward."""
        span = self.span(layer, x.shape[1])
        if span is None:
            return None
        lo, hi = span
        if lo == 0 and hi == x.shape[1]:
            return fn(x)
        out = x.clone()
        out[:, lo:hi] = fn(x[:, lo:hi])
        return out


# --------------------------------------------------------------------------- handlers


class Steer:
    """Add a precomputed per-layer offset to the residual stream, per row and per position."""

    def __init__(
        self,
        deltas: Mapping[int, torch.Tensor],
        *,
        positions: PositionMode = "all",
        last_n: int | None = None,
        prompt_len: int | None = None,
        rows: torch.Tensor | None = None,
    ) -> None:
        # rows: coefficient per batch row; folded into the deltas as [B, 1, H].
        self.rows = rows
        self.deltas = {
            layer: d if rows is None else rows.to(d)[:, None, None] * d
            for layer, d in deltas.items()
        }
        self.positions: PositionMode = positions
        self._window = _Window(positions, last_n, prompt_len)
        self._plain = positions == "all" and rows is None  # every position of every row

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [("residual", layer) for layer in sorted(self.deltas)]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        delta = self.deltas[layer]
        if self._plain:
            return x + delta
        if self.rows is not None and x.shape[0] != delta.shape[0]:
            raise InterventionError(
                f"steering has {delta.shape[0]} row coefficients but the batch has "
                f"{x.shape[0]} rows"
            )
        if self.positions == "all":
            return x + delta
        return self._window.apply(layer, x, lambda t: t + delta)


class DirectionalAblation:
    """Set the component along unit directions to a level: ``x - (x . u - m) u`` per layer.

    ``m`` is the baseline's mean level (mean ablation) or 0 (the direction projected out).
    """

    def __init__(
        self,
        units: Mapping[int, torch.Tensor],
        levels: Mapping[int, float] | None = None,
        rows: torch.Tensor | None = None,
        *,
        positions: PositionMode = "all",
        last_n: int | None = None,
        prompt_len: int | None = None,
    ) -> None:
        self.units = dict(units)
        self.levels = dict(levels or {})
        self.rows = rows  # 1 where a row is ablated, 0 where it is left alone
        self._window = None if positions == "all" else _Window(positions, last_n, prompt_len)

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [("residual", layer) for layer in sorted(self.units)]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        if self._window is None:
            return self._ablate(layer, x)
        return self._window.apply(layer, x, lambda t: self._ablate(layer, t))

    def _ablate(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        unit = self.units[layer]
        coef = x @ unit - self.levels.get(layer, 0.0)  # [B, T]
        if self.rows is not None:
            coef = coef * self.rows.to(coef)[:, None]
        return x - coef.unsqueeze(-1) * unit


class Ablate:
    """Set MLP units to zero or to fixed values at ``site`` (``mlp_hidden`` or ``gate``).

    One fused op per call: ``x * keep`` (zero) or ``fill + x * keep`` (mean), where ``keep`` is
    0 at ablated units of ablated rows and 1 elsewhere, so untouched units pass through exactly.
    ``positions`` limits it to the prompt (or its last ``last_n`` tokens) or the generated tokens.
    """

    def __init__(
        self,
        indices: Mapping[int, torch.Tensor],
        values: Mapping[int, torch.Tensor] | None = None,
        *,
        width: int,
        site: Site = "mlp_hidden",
        rows: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        positions: PositionMode = "all",
        last_n: int | None = None,
        prompt_len: int | None = None,
    ) -> None:
        self.indices = dict(indices)
        self._window = None if positions == "all" else _Window(positions, last_n, prompt_len)
        self.site: Site = site
        self.keep: dict[int, torch.Tensor] = {}
        self.fill: dict[int, torch.Tensor] | None = None if values is None else {}
        for layer, idx in self.indices.items():
            ones = torch.ones(width, device=idx.device, dtype=dtype)
            keep = ones.index_fill(0, idx, 0.0)
            fill = torch.zeros_like(ones)
            if values is not None:
                fill = fill.index_copy(0, idx, values[layer].to(dtype))
            if rows is not None:  # bool per row: ablate this row only
                on = rows.to(idx.device)[:, None, None]
                keep = torch.where(on, keep, ones)
                fill = torch.where(on, fill, torch.zeros_like(fill))
            self.keep[layer] = keep
            if self.fill is not None:
                self.fill[layer] = fill

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [(self.site, layer) for layer in sorted(self.indices)]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        if self._window is None:
            if self.fill is None:
                return x * self.keep[layer]
            return self._ablate(layer, x)
        return self._window.apply(layer, x, lambda t: self._ablate(layer, t))

    def _ablate(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        keep = self.keep[layer]
        if self.fill is None:
            return x * keep
        return torch.addcmul(self.fill[layer], x, keep)


class Readout:
    """Projections of the residual stream onto unit persona vectors, per token and layer.

    A forward only keeps a reference to the block output (a fresh tensor, never changed in
    place later), and ``flush_every`` of them are projected at once (one concatenation and one
    ``[B, T, V]`` matmul per layer), so a decode step costs a list append per layer. Everything
    stays on the device until ``result()`` concatenates once into ``[B, tokens, layers,
    vectors]`` (float32, CPU).
    """

    def __init__(
        self,
        units: Mapping[int, torch.Tensor],
        names: Sequence[str],
        layers: Sequence[int],
        flush_every: int = 32,
    ) -> None:
        self.units = units  # {layer: [V, H]}, unit rows on that layer's device
        self.names = list(names)
        self.layers = list(layers)
        self.flush_every = flush_every
        self._parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self._stash: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [("residual", layer) for layer in self.layers]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> None:
        stash = self._stash[layer]
        stash.append(x)
        if len(stash) >= self.flush_every:
            self._flush(layer)

    def _flush(self, layer: int) -> None:
        stash = self._stash[layer]
        if stash:
            self._parts[layer].append(torch.cat(stash, dim=1) @ self.units[layer].T)
            stash.clear()

    def result(self) -> torch.Tensor:
        """``[B, tokens, layers, vectors]``; tokens are those seen by the first layer."""
        for layer in self.layers:
            self._flush(layer)
        if not self.layers or not self._parts[self.layers[0]]:
            return torch.zeros(0, 0, len(self.layers), len(self.names))
        per_layer = [torch.cat(self._parts[layer], dim=1).float().cpu() for layer in self.layers]
        n = min(p.shape[1] for p in per_layer)  # a forward may stop early past some layers
        return torch.stack([p[:, :n] for p in per_layer], dim=2)


# --------------------------------------------------------------------------- interference


@dataclass(frozen=True)
class InterferenceReport:
    """How the blended vectors relate at the steered layers.

    ``cosine[i, j, k]``: cosine between ``weight_j * v_j`` and ``weight_k * v_k`` at
    ``layers[i]`` (signed by the weights, so a negative value means the terms pull apart and
    cancel); ``retained[i]``: norm of the blend over the sum of the terms' norms (1 = no loss).
    """

    personas: tuple[str, ...]
    layers: tuple[int, ...]
    cosine: torch.Tensor
    retained: torch.Tensor
    warnings: tuple[str, ...] = field(default=())


CANCEL_COSINE = -0.5
DUPLICATE_COSINE = 0.9


def blend_interference(
    terms: Sequence[tuple[str, float, torch.Tensor]], layers: Sequence[int]
) -> InterferenceReport:
    """Cosines of the weighted terms ``(name, weight, vector [n_layers, H])`` at ``layers``."""
    names = tuple(name for name, _, _ in terms)
    stacked = torch.stack([w * v[list(layers)].float() for _, w, v in terms], dim=1)  # [L, K, H]
    unit = torch.nn.functional.normalize(stacked, dim=-1)
    cosine = unit @ unit.transpose(1, 2)
    norms = stacked.norm(dim=-1).sum(dim=1)
    retained = stacked.sum(dim=1).norm(dim=-1) / norms.clamp_min(1e-12)
    warnings: list[str] = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            values = cosine[:, a, b]
            low, high = float(values.min()), float(values.max())
            if low < CANCEL_COSINE:
                at = layers[int(values.argmin())]
                warnings.append(
                    f"{names[a]} and {names[b]} cancel (signed cosine {low:.2f} at layer {at}); "
                    "their weighted directions oppose, so the blend is weaker than it looks"
                )
            if high > DUPLICATE_COSINE:
                at = layers[int(values.argmax())]
                warnings.append(
                    f"{names[a]} and {names[b]} duplicate each other (cosine {high:.2f} at layer "
                    f"{at}); the blend adds the same direction twice"
                )
    for message in warnings:
        log.warning("blend interference: %s", message)
    return InterferenceReport(names, tuple(layers), cosine, retained, tuple(warnings))


# --------------------------------------------------------------------------- building


@dataclass
class Plan:
    """Validated handlers for one generation, in hook order, and what they report back."""

    handlers: list[Handler]
    steer: Steer | None = None
    readout: Readout | None = None
    interference: InterferenceReport | None = None
    steered_layers: dict[int, float] = field(default_factory=dict)


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
    strengths = layer_strengths(spec.layers, spec.strength, n_layers, _best_layer(lead), spec.band)
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
    n_layers, width = lm.info.n_layers, lm.info.mlp_width
    units: dict[tuple[int, int], float] = {}
    site: Site = "mlp_hidden"
    if spec.neuron_set is not None:
        if spec.neuron_set not in neuron_sets:
            known = ", ".join(sorted(neuron_sets)) or "none registered"
            raise InterventionError(f"unknown neuron set {spec.neuron_set!r}; known sets: {known}")
        nset = neuron_sets[spec.neuron_set]
        if nset.site not in ("mlp_hidden", "gate"):
            raise InterventionError(
                f"neuron set {spec.neuron_set!r} has unknown site {nset.site!r}"
            )
        site = "gate" if nset.site == "gate" else "mlp_hidden"
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
            check_neuron(layer, index, n_layers, width)
            value = float(nset.means[i]) if nset.means is not None else 0.0
            check_finite(value, f"baseline mean of neuron {layer}:{index} in {spec.neuron_set!r}")
            units[(layer, index)] = value
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
    for key in typed:
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
        width=width,
        site=site,
        rows=mask,
        dtype=dtype,
        positions=spec.positions,
        last_n=spec.last_n,
        prompt_len=prompt_len,
    )


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
    layers = layer_strengths(spec.layers, 1.0, lm.info.n_layers, _best_layer(vector), 2)
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
    if readout:
        plan.readout = build_readout(lm, vectors, readout)
        handlers.append(plan.readout)
    return plan
