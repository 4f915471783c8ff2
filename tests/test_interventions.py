"""Interventions checked against the model's own computation.

Steering adds exactly, ablation zeroes, readout projects, positions and rows are honoured, and
bad requests fail before the model is touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
import torch

from personachat.activations import Recorder
from personachat.hooks import hook_count, intervene
from personachat.interventions import (
    AblationSpec,
    DirectionSpec,
    InterventionError,
    SteeringSpec,
    build_ablation,
    build_plan,
    build_steer,
    parse_layer_spec,
    parse_neurons,
)
from personachat.model import LoadedModel
from personachat.records import LayerMetrics, NeuronSet, PersonaVector
from tests.conftest import tiny


def vectors_for(lm: LoadedModel, names: Iterable[str], seed: int = 0) -> dict[str, PersonaVector]:
    g = torch.Generator().manual_seed(seed)
    n, h = lm.info.n_layers, lm.info.hidden_size
    out = {}
    for name in names:
        metrics = LayerMetrics(
            auc=torch.rand(n, generator=g),
            separation=torch.rand(n, generator=g),
            norm=torch.ones(n),
            resid_norm=torch.rand(n, generator=g) * 10 + 1,
        )
        out[name] = PersonaVector(
            lm.info.model_id, name, torch.randn(n, h, generator=g), metrics=metrics
        )
    return out


def ids_for(lm: LoadedModel, text: str = "Tell me about the ocean and the stars") -> torch.Tensor:
    return lm.tokenizer(text, return_tensors="pt")["input_ids"]


def clean_residuals(lm: LoadedModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """Residual stream per layer without interventions (raw block outputs, via a capture)."""
    cap = Recorder([("residual", i) for i in range(lm.info.n_layers)], every=True)
    with torch.no_grad(), intervene(lm.sites, [cap]):
        lm.model(ids)
    return [cap.history[("residual", i)][0] for i in range(lm.info.n_layers)]


# ----------------------------------------------------------------------------- steering


def test_steered_layer_equals_clean_plus_strength_times_vector(any_arch: LoadedModel) -> None:
    lm = any_arch
    vecs = vectors_for(lm, ["pirate"])
    ids = ids_for(lm)
    clean = clean_residuals(lm, ids)
    steer, _, strengths = build_steer(lm, vecs, SteeringSpec({"pirate": 1.0}, layers="1:2.5"))
    assert strengths == {1: 2.5}
    cap = Recorder([("residual", i) for i in range(lm.info.n_layers)], every=True)
    with torch.no_grad(), intervene(lm.sites, [steer, cap]):
        lm.model(ids)
    got = cap.history[("residual", 1)][0]
    expected = clean[1] + 2.5 * vecs["pirate"].vector[1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cap.history[("residual", 0)][0], clean[0], rtol=0, atol=0)
    assert not torch.allclose(cap.history[("residual", 2)][0], clean[2], atol=1e-3)  # downstream


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_downstream_logits_match_manual_head(arch: str) -> None:
    """Steering the last block: logits equal lm_head(final_norm(clean + s*v)) computed by hand."""
    lm = tiny(arch)
    vecs = vectors_for(lm, ["pirate"], seed=3)
    ids = ids_for(lm)
    last = lm.info.n_layers - 1
    clean = clean_residuals(lm, ids)[last]
    spec = SteeringSpec({"pirate": -0.7}, layers=f"{last}:1.5")
    plan = build_plan(lm, vecs, steering=spec)
    with torch.no_grad(), intervene(lm.sites, plan.handlers):
        logits = lm.model(ids).logits
    norm: Any = lm.sites.base.ln_f if arch == "gpt2" else lm.sites.base.norm
    with torch.no_grad():
        manual = lm.model.lm_head(norm(clean + (-0.7 * 1.5) * vecs["pirate"].vector[last]))
    torch.testing.assert_close(logits, manual, rtol=1e-5, atol=1e-5)


def test_blend_and_calibrated_units(llama: LoadedModel) -> None:
    vecs = vectors_for(llama, ["pirate", "philosopher", "cynic"])
    blend = {"pirate": 0.7, "philosopher": 0.5, "cynic": -0.3}
    raw, _, _ = build_steer(llama, vecs, SteeringSpec(blend, layers="0-1:2"))
    expected = 2 * sum(w * vecs[p].vector[1] for p, w in blend.items())
    torch.testing.assert_close(raw.deltas[1], expected)
    cal, _, _ = build_steer(
        llama, vecs, SteeringSpec({"pirate": 1.0}, layers="2:3", units="calibrated")
    )
    v = vecs["pirate"]
    assert v.metrics is not None
    expected_cal = 3 * v.metrics.resid_norm[2] * v.vector[2] / v.vector[2].norm()
    torch.testing.assert_close(cal.deltas[2], expected_cal)
    assert float(cal.deltas[2].norm()) == pytest.approx(
        3 * float(v.metrics.resid_norm[2]), rel=1e-5
    )


def test_presets_follow_best_layer(llama: LoadedModel) -> None:
    vecs = vectors_for(llama, ["pirate", "cynic"])
    v = vecs["cynic"]
    assert v.metrics is not None
    best = v.metrics.best_layer
    _, _, best_only = build_steer(llama, vecs, SteeringSpec({"pirate": 0.1, "cynic": 2.0}))
    assert best_only == {best: 1.0}
    _, _, band = build_steer(llama, vecs, SteeringSpec({"cynic": 1.0}, layers="band", band=1))
    assert band == {layer: 1.0 for layer in range(max(best - 1, 0), min(best + 1, 2) + 1)}
    _, _, every = build_steer(llama, vecs, SteeringSpec({"cynic": 1.0}, layers="all", strength=4))
    assert every == {0: 4.0, 1: 4.0, 2: 4.0}


def test_per_row_coefficients_in_one_batch() -> None:
    lm = tiny("gpt2")
    vecs = vectors_for(lm, ["pirate"])
    ids = ids_for(lm)
    clean = clean_residuals(lm, ids)[0]
    plan = build_plan(lm, vecs, steering=SteeringSpec({"pirate": 1.0}, layers="0:2"), rows=[0, 1])
    cap = Recorder([("residual", 0)], every=True)
    with torch.no_grad(), intervene(lm.sites, [*plan.handlers, cap]):
        lm.model(ids.repeat(2, 1))
    got = cap.history[("residual", 0)][0]
    torch.testing.assert_close(got[0], clean[0], rtol=1e-5, atol=1e-5)  # batch of 2 vs 1
    torch.testing.assert_close(
        got[1], clean[0] + 2 * vecs["pirate"].vector[0], rtol=1e-5, atol=1e-5
    )


def _two_phase(
    lm: LoadedModel, ids: torch.Tensor, prefill: list, decode: list
) -> list[torch.Tensor]:
    """Residual at layer 1 in a prefill and one cached decode step, with handlers per phase."""
    cap = Recorder([("residual", 1)], every=True)
    with torch.no_grad():
        with intervene(lm.sites, [*prefill, cap]):
            out = lm.model(ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        with intervene(lm.sites, [*decode, cap]):
            lm.model(nxt, past_key_values=out.past_key_values, use_cache=True)
    return cap.history[("residual", 1)]


@pytest.mark.parametrize(
    ("positions", "last_n", "prompt_rows", "decode_steered"),
    [
        ("all", None, "all", True),
        ("prompt", None, "all", False),
        ("prompt", 2, "last2", False),
        ("generated", None, "none", True),
    ],
)
def test_positions_prompt_last_n_and_generated(
    llama: LoadedModel, positions: str, last_n: int | None, prompt_rows: str, decode_steered: bool
) -> None:
    vecs = vectors_for(llama, ["pirate"])
    ids = ids_for(llama)
    n = ids.shape[1]
    spec = SteeringSpec({"pirate": 1.0}, layers="1:3", positions=positions, last_n=last_n)  # type: ignore[arg-type]
    base = _two_phase(llama, ids, [], [])
    plan = build_plan(llama, vecs, steering=spec, prompt_len=n)
    got = _two_phase(llama, ids, plan.handlers, plan.handlers)
    ref = _two_phase(llama, ids, build_plan(llama, vecs, steering=spec, prompt_len=n).handlers, [])
    delta = 3 * vecs["pirate"].vector[1]
    mask = torch.zeros(n, 1)
    if prompt_rows == "all":
        mask[:] = 1
    elif prompt_rows == "last2":
        mask[-2:] = 1
    torch.testing.assert_close(got[0][0], base[0][0] + mask * delta, rtol=1e-5, atol=1e-5)
    expected_decode = ref[1] + (delta if decode_steered else 0.0)
    torch.testing.assert_close(got[1], expected_decode, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- ablation


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_ablated_neurons_are_zero_or_mean_at_down_proj_input(arch: str) -> None:
    lm = tiny(arch)
    ids = ids_for(lm)
    width = lm.info.mlp_width
    cap0 = Recorder([("mlp_hidden", 1), ("mlp_hidden", 2)], every=True)
    with torch.no_grad(), intervene(lm.sites, [cap0]):
        lm.model(ids)
    clean = cap0.history[("mlp_hidden", 1)][0]
    zero = build_ablation(lm, AblationSpec(neurons=f"1:3,1:5-7,2:{width - 1}"), {})
    cap = Recorder([("mlp_hidden", 1), ("mlp_hidden", 2)], every=True)
    with torch.no_grad(), intervene(lm.sites, [zero, cap]):
        lm.model(ids)
    got = cap.history[("mlp_hidden", 1)][0]
    assert torch.equal(got[..., [3, 5, 6, 7]], torch.zeros_like(got[..., [3, 5, 6, 7]]))
    keep = [i for i in range(width) if i not in (3, 5, 6, 7)]
    torch.testing.assert_close(got[..., keep], clean[..., keep], rtol=0, atol=0)  # layer 1 input
    after = cap.history[("mlp_hidden", 2)][0]
    assert torch.equal(after[..., width - 1], torch.zeros(got.shape[:2]))
    nset = NeuronSet(
        lm.info.model_id,
        "pirate-vs-default",
        "mlp_hidden",
        [1, 1],
        [4, 9],
        [0.9, 0.8],
        means=[0.25, -1.5],
    )
    mean = build_ablation(
        lm, AblationSpec(neuron_set="pirate-vs-default", mode="mean"), {"pirate-vs-default": nset}
    )
    cap = Recorder([("mlp_hidden", 1)], every=True)
    with torch.no_grad(), intervene(lm.sites, [mean, cap]):
        lm.model(ids)
    got = cap.history[("mlp_hidden", 1)][0]
    assert torch.all(got[..., 4] == 0.25) and torch.all(got[..., 9] == -1.5)
    torch.testing.assert_close(got[..., 0], clean[..., 0], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("positions", "last_n", "prompt_ablated", "decode_ablated"),
    [
        ("prompt", None, "all", False),
        ("prompt", 2, "last2", False),
        ("generated", None, "none", True),
    ],
)
def test_ablation_positions(
    llama: LoadedModel,
    positions: str,
    last_n: int | None,
    prompt_ablated: str,
    decode_ablated: bool,
) -> None:
    """Mean ablation at prompt positions (or its last n) or generated ones, and nowhere else."""
    ids = ids_for(llama)
    n = ids.shape[1]
    nset = NeuronSet(llama.info.model_id, "s", "mlp_hidden", [1], [5], [1.0], means=[0.75])
    spec = AblationSpec(neuron_set="s", mode="mean", positions=positions, last_n=last_n)  # type: ignore[arg-type]

    def run(prefill: list, decode: list) -> list[torch.Tensor]:
        cap = Recorder([("mlp_hidden", 1)], every=True)
        with torch.no_grad():
            with intervene(llama.sites, [*prefill, cap]):
                out = llama.model(ids, use_cache=True)
            with intervene(llama.sites, [*decode, cap]):
                llama.model(
                    torch.tensor([[7]]), past_key_values=out.past_key_values, use_cache=True
                )
        return cap.history[("mlp_hidden", 1)]

    def ablate() -> list:
        return [build_ablation(llama, spec, {"s": nset}, prompt_len=n)]

    clean = run([], [])
    same = ablate()  # one handler for both phases: it counts the positions it has seen
    both = run(same, same)
    got = both[0][0], both[1][0, 0]
    hit = torch.zeros(n, dtype=torch.bool)
    hit[:] = prompt_ablated == "all"
    if prompt_ablated == "last2":
        hit[-2:] = True
    prefill, clean_prefill = got[0], clean[0][0]
    assert torch.all(prefill[hit, 5] == 0.75)
    torch.testing.assert_close(prefill[~hit], clean_prefill[~hit], rtol=0, atol=0)
    torch.testing.assert_close(prefill[:, :5], clean_prefill[:, :5], rtol=0, atol=0)
    # the decode step: ablated there, or exactly what it is after an ablated prefill alone
    untouched = run(ablate(), [])[1][0, 0]
    if decode_ablated:
        assert got[1][5] == 0.75 and torch.equal(got[1][:5], untouched[:5])
    else:
        torch.testing.assert_close(got[1], untouched, rtol=0, atol=0)
        assert untouched[5] != 0.75


def test_directional_ablation_removes_the_direction(llama: LoadedModel) -> None:
    vecs = vectors_for(llama, ["cynic"])
    ids = ids_for(llama)
    clean = clean_residuals(llama, ids)[0]
    plan = build_plan(llama, vecs, direction=DirectionSpec("cynic", layers="0", mode="zero"))
    cap = Recorder([("residual", 0)], every=True)
    with torch.no_grad(), intervene(llama.sites, [*plan.handlers, cap]):
        llama.model(ids)
    u = vecs["cynic"].vector[0] / vecs["cynic"].vector[0].norm()
    got = cap.history[("residual", 0)][0]
    assert float((got @ u).abs().max()) < 1e-4
    torch.testing.assert_close(got, clean - (clean @ u)[..., None] * u, rtol=1e-5, atol=1e-5)
    with pytest.raises(InterventionError, match=r"baseline 'default'.*mode='zero'"):
        build_plan(llama, vecs, direction=DirectionSpec("cynic", layers="0"))  # no baseline mean


def test_mean_directional_ablation_moves_the_component_to_the_baseline_level(
    llama: LoadedModel,
) -> None:
    """At the last 2 prompt positions only, the component along u becomes the baseline's."""
    vecs = vectors_for(llama, ["cynic"])
    base = torch.randn(llama.info.n_layers, llama.info.hidden_size)
    vecs["cynic"].baseline_mean = base
    ids = ids_for(llama)
    n = ids.shape[1]
    clean = clean_residuals(llama, ids)[1]
    spec = DirectionSpec("cynic", layers="1", positions="prompt", last_n=2)
    plan = build_plan(llama, vecs, direction=spec, prompt_len=n)
    cap = Recorder([("residual", 1)], every=True)
    with torch.no_grad(), intervene(llama.sites, [*plan.handlers, cap]):
        llama.model(ids)
    u = vecs["cynic"].vector[1] / vecs["cynic"].vector[1].norm()
    level = float(base[1] @ u)
    got = cap.history[("residual", 1)][0][0]
    want = clean[0].clone()
    want[-2:] = clean[0][-2:] - ((clean[0][-2:] @ u) - level)[:, None] * u
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[-2:] @ u, torch.full((2,), level), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- readout


def test_readout_is_projection_after_steering(any_arch: LoadedModel) -> None:
    lm = any_arch
    vecs = vectors_for(lm, ["pirate", "cynic"])
    ids = ids_for(lm)
    clean = clean_residuals(lm, ids)
    plan = build_plan(
        lm, vecs, steering=SteeringSpec({"pirate": 1.0}, layers="0:2"), readout=["pirate", "cynic"]
    )
    with torch.no_grad(), intervene(lm.sites, plan.handlers):
        lm.model(ids)
    assert plan.readout is not None
    got = plan.readout.result()  # [1, T, L, V]
    assert got.shape == (1, ids.shape[1], lm.info.n_layers, 2)
    steered0 = clean[0] + 2 * vecs["pirate"].vector[0]
    for k, name in enumerate(["pirate", "cynic"]):
        u = vecs[name].vector[0] / vecs[name].vector[0].norm()
        torch.testing.assert_close(got[0, :, 0, k], (steered0 @ u)[0], rtol=1e-4, atol=1e-4)


def test_readout_matches_hooks_free_hidden_states(llama: LoadedModel) -> None:
    vecs = vectors_for(llama, ["pirate"])
    ids = ids_for(llama)
    plan = build_plan(llama, vecs, readout=["pirate"])
    with torch.no_grad(), intervene(llama.sites, plan.handlers):
        llama.model(ids)
    assert plan.readout is not None
    got = plan.readout.result()[0]
    with torch.no_grad():
        hidden = llama.model(ids, output_hidden_states=True).hidden_states
    for layer in range(llama.info.n_layers - 1):
        u = vecs["pirate"].vector[layer] / vecs["pirate"].vector[layer].norm()
        torch.testing.assert_close(got[:, layer, 0], hidden[layer + 1][0] @ u, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- interference


def test_interference_warns_on_cancel_and_duplicate(llama: LoadedModel) -> None:
    vecs = vectors_for(llama, ["pirate"])
    v = vecs["pirate"].vector
    g = torch.Generator().manual_seed(9)
    vecs["copy"] = PersonaVector(
        llama.info.model_id, "copy", v * 2 + 0.01 * torch.randn(v.shape, generator=g)
    )
    vecs["other"] = PersonaVector(llama.info.model_id, "other", torch.randn(v.shape, generator=g))
    _, dup, _ = build_steer(llama, vecs, SteeringSpec({"pirate": 1, "copy": 1}, layers="all"))
    assert dup is not None and any("duplicate" in w for w in dup.warnings)
    assert float(dup.cosine[0, 0, 1]) > 0.99 and float(dup.retained[0]) == pytest.approx(
        1, abs=1e-3
    )
    _, cancel, _ = build_steer(llama, vecs, SteeringSpec({"pirate": 1, "copy": -0.5}, layers="1"))
    assert cancel is not None and any("cancel" in w for w in cancel.warnings)
    assert float(cancel.retained[0]) < 0.01
    _, fine, _ = build_steer(llama, vecs, SteeringSpec({"pirate": 1, "other": 1}, layers="1"))
    assert fine is not None and fine.warnings == ()


# ------------------------------------------------------------------ parsing and bad input


def test_layer_spec_parser() -> None:
    assert parse_layer_spec("8-12:4, 13:2", 24) == {
        8: 4.0,
        9: 4.0,
        10: 4.0,
        11: 4.0,
        12: 4.0,
        13: 2.0,
    }
    assert parse_layer_spec("3", 5, default=0.5) == {3: 0.5}
    assert parse_layer_spec("all:1, 2:-3", 3) == {0: 1.0, 1: 1.0, 2: -3.0}
    for bad, words in [
        ("8-12:x", "not a number"),
        ("12-8", "backwards"),
        ("30:1", "out of range"),
        ("a:b", "cannot read"),
        ("", "empty"),
        ("3:nan", "nan"),
    ]:
        with pytest.raises(InterventionError, match=words):
            parse_layer_spec(bad, 24)
    assert parse_neurons("3:12,3:40,5:7-8", 6, 64) == [(3, 12), (3, 40), (5, 7), (5, 8)]
    with pytest.raises(InterventionError, match="beyond the MLP width 64"):
        parse_neurons("3:64", 6, 64)
    with pytest.raises(InterventionError, match="cannot read neuron"):
        parse_neurons("3-12", 6, 64)


def test_bad_requests_fail_before_the_model_is_touched(llama: LoadedModel) -> None:
    vecs = vectors_for(llama, ["pirate", "cynic"])
    other = PersonaVector("other-model", "alien", torch.randn(3, 48))
    vecs["alien"] = other
    hooks_before = hook_count(llama.model)
    ids = ids_for(llama)
    with torch.no_grad():
        logits_before = llama.model(ids).logits
    cases = [
        (dict(steering=SteeringSpec({"wizard": 1.0})), "unknown persona 'wizard'.*cynic, pirate"),
        (dict(steering=SteeringSpec({"alien": 1.0}, layers="1")), "48 dims.*32 dims"),
        (dict(steering=SteeringSpec({"pirate": 1.0}, layers="3:1")), "out of range.*3 layers"),
        (dict(steering=SteeringSpec({"pirate": float("nan")}, layers="1")), "nan"),
        (dict(steering=SteeringSpec({"pirate": 1.0}, layers="1", strength=float("nan"))), "nan"),
        (dict(ablation=AblationSpec(neurons="1:64")), "beyond the MLP width 64"),
        (dict(ablation=AblationSpec(neurons="1:2", mode="mean")), "needs baseline means"),
        (dict(ablation=AblationSpec(neuron_set="nope")), "unknown neuron set"),
        (dict(readout=["ghost"]), "unknown persona 'ghost'"),
        (dict(direction=DirectionSpec("pirate", layers="9")), "out of range"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InterventionError, match=message):
            build_plan(llama, vecs, **kwargs)  # type: ignore[arg-type]
    assert hook_count(llama.model) == hooks_before
    with torch.no_grad():
        torch.testing.assert_close(llama.model(ids).logits, logits_before, rtol=0, atol=0)


def test_readout_over_cached_decode_steps_with_flushes(llama: LoadedModel) -> None:
    """Decode-step readouts (stashed, flushed every 2) equal the hooks-free full forward."""
    vecs = vectors_for(llama, ["pirate", "cynic"])
    ids = ids_for(llama)
    plan = build_plan(llama, vecs, readout=["pirate", "cynic"])
    assert plan.readout is not None
    plan.readout.flush_every = 2
    seq = ids
    with torch.no_grad(), intervene(llama.sites, plan.handlers):
        out = llama.model(ids, use_cache=True)
        for _ in range(5):
            nxt = out.logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], dim=1)
            out = llama.model(nxt, past_key_values=out.past_key_values, use_cache=True)
    got = plan.readout.result()[0]
    assert got.shape == (seq.shape[1], llama.info.n_layers, 2)
    with torch.no_grad():
        hidden = llama.model(seq, output_hidden_states=True).hidden_states
    for layer in range(llama.info.n_layers - 1):
        for k, name in enumerate(["pirate", "cynic"]):
            u = vecs[name].vector[layer] / vecs[name].vector[layer].norm()
            torch.testing.assert_close(
                got[:, layer, k], hidden[layer + 1][0] @ u, rtol=1e-4, atol=1e-4
            )
