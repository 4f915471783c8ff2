"""Capping holds a persona: the projection is clamped exactly, and nothing else moves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from personachat.activations import Recorder
from personachat.chat import ChatEngine, GenerationSettings
from personachat.hooks import hook_count, intervene
from personachat.interventions import CapSpec, InterventionError, SteeringSpec, build_plan
from personachat.model import LoadedModel
from personachat.records import QUANTILE_LEVELS, LayerMetrics, PersonaVector, ProjectionQuantiles

MESSAGES = [{"role": "user", "content": "Tell me about the ocean."}]


def vector(lm: LoadedModel, seed: int = 0) -> PersonaVector:
    g = torch.Generator().manual_seed(seed)
    n, h = lm.info.n_layers, lm.info.hidden_size
    spread = torch.linspace(-3.0, 3.0, len(QUANTILE_LEVELS))
    return PersonaVector(
        model_id=lm.info.model_id,
        persona="axis",
        vector=torch.randn(n, h, generator=g),
        metrics=LayerMetrics(torch.rand(n), torch.rand(n), torch.rand(n), torch.ones(n)),
        quantiles=ProjectionQuantiles(
            baseline=spread.repeat(n, 1) - 1.0,
            persona=spread.repeat(n, 1) + 1.0,
            n_baseline=10,
            n_persona=10,
        ),
    )


def residuals(lm: LoadedModel, handlers: list[object], layer: int) -> torch.Tensor:
    ids = ChatEngine(lm).prompt_ids(MESSAGES)
    rec = Recorder([("residual", layer)])
    with torch.no_grad(), intervene(lm.sites, [*handlers, rec]):  # type: ignore[list-item]
        lm.model(ids)
    return rec.get(layer)[0]


def unit_at(v: PersonaVector, layer: int) -> torch.Tensor:
    return torch.nn.functional.normalize(v.vector[layer].float(), dim=-1)


def test_capping_on_the_kept_side_changes_nothing(llama: LoadedModel) -> None:
    v = vector(llama)
    engine = ChatEngine(llama, [v])
    plain = engine.reply(MESSAGES, GenerationSettings(max_new_tokens=12))
    for side, level in (("above", -1e6), ("below", 1e6)):
        cap = CapSpec("axis", layers="all", side=side, threshold=level, percentile=None)  # type: ignore[arg-type]
        capped = engine.stream(MESSAGES, GenerationSettings(max_new_tokens=12), cap=cap)
        last = list(capped)[-1]
        assert last.tokens == plain.tokens and last.text == plain.text
        plan = build_plan(llama, {"axis": v}, cap=cap)
        assert torch.equal(residuals(llama, plan.handlers, 1), residuals(llama, [], 1))


@pytest.mark.parametrize("side", ["above", "below"])
def test_clamped_projections_equal_the_level_exactly(llama: LoadedModel, side: str) -> None:
    v = vector(llama)
    layer = 1
    clean = residuals(llama, [], layer)
    u = unit_at(v, layer)
    level = float((clean @ u).median())  # half the positions on each side
    cap = CapSpec("axis", layers=[layer], side=side, threshold=level, percentile=None)  # type: ignore[arg-type]
    got = residuals(llama, build_plan(llama, {"axis": v}, cap=cap).handlers, layer)
    before, after = clean @ u, got @ u
    moved = before < level if side == "above" else before > level
    assert moved.any() and (~moved).any()
    torch.testing.assert_close(
        after[moved], torch.full_like(after[moved], level), atol=1e-4, rtol=0
    )
    assert torch.equal(got[~moved], clean[~moved])  # the kept side is left exactly as it was
    # only the component along u moved
    ortho = (got - clean) - ((got - clean) @ u)[:, None] * u
    assert float(ortho.abs().max()) < 1e-5


def test_a_percentile_level_comes_from_the_stored_reference(llama: LoadedModel) -> None:
    v = vector(llama)
    assert v.quantiles is not None
    cap = CapSpec("axis", layers=[0, 2], percentile=25.0, reference="baseline")
    handler = build_plan(llama, {"axis": v}, cap=cap).handlers[0]
    want = np.interp(0.25, QUANTILE_LEVELS, v.quantiles.baseline[0].numpy())
    assert handler.levels == pytest.approx({0: want, 2: want})  # type: ignore[attr-defined]


def test_a_cap_acts_after_steering_at_the_same_layer(llama: LoadedModel) -> None:
    v = vector(llama, 1)
    layer = 2
    steering = SteeringSpec({"axis": 1.0}, layers={layer: 3.0})
    steered = residuals(llama, build_plan(llama, {"axis": v}, steering=steering).handlers, layer)
    u = unit_at(v, layer)
    level = float((steered @ u).median())
    cap = CapSpec("axis", layers=[layer], side="below", threshold=level, percentile=None)
    plan = build_plan(llama, {"axis": v}, steering=steering, cap=cap)
    got = residuals(llama, plan.handlers, layer)
    over = (steered @ u - level).clamp(min=0)
    torch.testing.assert_close(got, steered - over[:, None] * u, atol=1e-5, rtol=0)


def test_bad_caps_are_refused_before_any_hook(llama: LoadedModel) -> None:
    v = vector(llama)
    bare = PersonaVector(llama.info.model_id, "bare", v.vector)
    before = hook_count(llama.model)
    cases = [
        (CapSpec("axis", threshold=1.0, percentile=50.0), "either a threshold or a percentile"),
        (CapSpec("axis", percentile=120.0), "percentile must be in 0..100"),
        (CapSpec("axis", side="left", percentile=10.0), "unknown cap side"),  # type: ignore[arg-type]
        (CapSpec("bare", percentile=10.0), "reference distribution"),
        (CapSpec("nobody", percentile=10.0), "unknown persona"),
    ]
    for spec, match in cases:
        with pytest.raises(InterventionError, match=match):
            build_plan(llama, {"axis": v, "bare": bare}, cap=spec)
    assert hook_count(llama.model) == before
