"""Persona analysis: geometry, collapse metrics, probes, patching and the report, on tiny models.

Expected values come from hand-built geometry or from the model's own forward pass; the demo
test checks that the collapse analysis finds the collapse planted in ``personachat.prompts.demo``.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from personachat.analysis.answers import Answer, generate_answers, normalise_answer
from personachat.analysis.circuit import circuit_candidates, find_circuit
from personachat.analysis.collapse import collapse_from_answers, js_divergence, persona_collapse
from personachat.analysis.contrasts import contrasts, own_answers_kept, pair_stats
from personachat.analysis.findings import HEAD_THRESHOLD, carrying_heads, heads_finding
from personachat.analysis.groups import GROUPS, Prompt, encode_prompt
from personachat.analysis.patching import (
    PatchingResult,
    PatchSite,
    activation_patching,
    patch_restored,
)
from personachat.analysis.preferences import PreferenceItem, demo_preferences
from personachat.analysis.probes import collect_group_features, persona_probe
from personachat.analysis.report import write_report
from personachat.analysis.run import analyze_model
from personachat.analysis.space import PersonaSpace, compare_spaces, persona_space, upper_triangle
from personachat.model import LoadedModel
from personachat.model.tiny import tiny_model
from personachat.records import LayerMetrics, Persona, PersonaVector
from tests.scripts import cli_module

QUESTIONS = ("What is the capital of France?", "Tell me about the ocean.", "What is history?")
PREFIX = "The answer is"
STAR = Persona("star", "You are a star.")  # these two tokenize to the same length (6)
COOK = Persona("cook", "You are a cook.")
PIRATE = Persona("pirate", "You are a pirate.")  # 5 tokens
DEFAULT = Persona("default", "")
DEMO = Path(__file__).resolve().parents[1] / "store" / "models" / "demo"


# ---- persona space ----------------------------------------------------------------------------


def cross_space() -> PersonaSpace:
    # e1, -e1, e2, -e2: mean zero; cos(e1, -e1) = -1, cos(e1, e2) = 0.
    e = np.eye(3)
    vecs = {"default": e[0], "rebel": -e[0], "poet": e[1], "pirate": -e[1]}
    return persona_space(vecs, n_components=3)


def test_persona_space_known_geometry() -> None:
    s = cross_space()
    expected = np.array([[1, -1, 0, 0], [-1, 1, 0, 0], [0, 0, 1, -1], [0, 0, -1, 1]], float)
    np.testing.assert_allclose(s.cosine, expected, atol=1e-12)
    # Two equal singular values carry all the variance.
    np.testing.assert_allclose(s.explained[:2], [0.5, 0.5], atol=1e-12)
    assert s.explained[2] == pytest.approx(0.0, abs=1e-12)
    # Axis = default - mean(rebel, poet, pirate) = 4/3 e1; projections on the unit axis.
    assert s.neutral == ["default"]
    np.testing.assert_allclose(s.axis, [4 / 3, 0, 0], atol=1e-12)
    np.testing.assert_allclose(s.projection, [1, -1, 0, 0], atol=1e-12)
    assert s.ranking()[0] == "default" and s.ranking()[-1] == "rebel"


def test_persona_space_from_vectors_adds_baseline_and_picks_best_layer() -> None:
    def vec(name: str, rows: list[list[float]], auc: list[float]) -> PersonaVector:
        t = torch.tensor(rows, dtype=torch.float32)
        metrics = LayerMetrics(torch.tensor(auc), torch.zeros(2), t.norm(dim=-1), torch.ones(2))
        return PersonaVector(
            "m", name, t, baseline="default", metrics=metrics, created_at=datetime.now(UTC)
        )

    vectors = [
        vec("a", [[9, 9], [1, 0]], [0.5, 0.9]),
        vec("b", [[9, 9], [0, 1]], [0.6, 0.8]),
        vec("c", [[9, 9], [1, 1]], [0.5, 1.0]),
    ]
    s = persona_space(vectors)
    assert s.layer == 1  # highest mean AUC
    assert s.personas == ["default", "a", "b", "c"]  # the baseline is the zero vector
    x = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], float)
    c = x - x.mean(0)
    u = c / np.linalg.norm(c, axis=1, keepdims=True)
    np.testing.assert_allclose(s.cosine, u @ u.T, atol=1e-12)
    assert s.neutral == ["default"]


def test_compare_spaces_aligns_by_name_and_is_rotation_invariant() -> None:
    rng = np.random.default_rng(0)
    names = ["default", "pirate", "poet", "cynic", "robot", "chef"]
    x = rng.normal(size=(6, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    a = persona_space(dict(zip(names, x, strict=True)), model_id="A")
    rotated = {n: x[i] @ q for i, n in reversed(list(enumerate(names)))}  # other order
    b = persona_space(rotated, model_id="B")
    cmp = compare_spaces(a, b)
    assert cmp.pearson == pytest.approx(1.0)
    assert cmp.spearman == pytest.approx(1.0)
    assert cmp.axis_spearman == pytest.approx(1.0)
    assert cmp.rank_shift() == dict.fromkeys(names, 0)
    # Swapping two personas' vectors changes the geometry by a known permutation.
    swapped = dict(zip(names, x[[0, 2, 1, 3, 4, 5]], strict=True))
    c2 = compare_spaces(a, persona_space(swapped, model_id="C"))
    perm = a.cosine[np.ix_([0, 2, 1, 3, 4, 5], [0, 2, 1, 3, 4, 5])]
    expected = np.corrcoef(upper_triangle(a.cosine), upper_triangle(perm))[0, 1]
    assert c2.pearson == pytest.approx(expected)
    assert c2.pearson < 0.99


def test_persona_space_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="neutral and role personas"):
        persona_space({"a": np.ones(2), "b": np.zeros(2), "c": -np.ones(2)})
    with pytest.raises(ValueError, match="at least 3 personas"):
        persona_space({"default": np.ones(2), "b": np.zeros(2)})


# ---- collapse metrics -----------------------------------------------------------------------


def test_js_divergence_values() -> None:
    assert js_divergence({0: 1.0}, {1: 1.0}) == pytest.approx(math.log(2))
    assert js_divergence({0: 0.3, 1: 0.7}, {0: 0.3, 1: 0.7}) == pytest.approx(0.0)
    # Missing mass is one bucket: {0: .5} vs {1: .5} share the 0.5 "other" bucket.
    m = 0.25
    kl = 0.5 * math.log(0.5 / m) + 0.5 * math.log(0.5 / 0.5)
    assert js_divergence({0: 0.5}, {1: 0.5}) == pytest.approx(kl)


def _ans(persona: str, key: str, q: str, answer: str, top: dict[int, float]) -> Answer:
    return Answer(persona, key, q, f"My favourite {key} is {answer}", answer, top, min(top))


def planted_answers() -> list[Answer]:
    rows = []
    for q in ("q1", "q2"):
        rows += [
            _ans("default", "dessert", q, "cake", {1: 0.9}),
            _ans("chef", "dessert", q, "cake", {1: 0.8}),
            _ans("poet", "dessert", q, "cake", {1: 0.7}),
            _ans("pirate", "dessert", q, "pudding" if q == "q1" else "cake", {2: 0.9}),
        ]
        rows += [
            _ans(p, "colour", q, c, {i: 1.0})
            for i, (p, c) in enumerate(
                [("default", "blue"), ("chef", "red"), ("poet", "silver"), ("pirate", "")]
            )
        ]
    return rows


def test_collapse_from_answers_flags_and_divergence() -> None:
    r = collapse_from_answers(planted_answers(), threshold=0.5, neutral="default")
    dessert, colour = r.question("dessert"), r.question("colour")
    # pirate: "pudding" once and "cake" once -> tie, first seen ("pudding") is its answer.
    want = {"default": "cake", "chef": "cake", "poet": "cake", "pirate": "pudding"}
    assert dessert.answers == want
    assert dessert.modal_answer == "cake" and dessert.modal_share == 0.75 and dessert.collapsed
    assert dessert.distinct_personas == ["pirate"]
    assert dessert.collapsed_personas == ["default", "chef", "poet"]
    assert dessert.generic_prob == pytest.approx(0.9)  # default's p of cake's first token
    # Span JS: three personas always "cake", pirate half/half.
    half = js_divergence({"cake": 1.0}, {"pudding": 0.5, "cake": 0.5})
    assert dessert.span_js == pytest.approx(3 * half / 6)
    tops = [{1: 0.9}, {1: 0.8}, {1: 0.7}, {2: 0.9}]
    pairs = [(tops[i], tops[j]) for i in range(4) for j in range(i + 1, 4)]
    expected_tok = np.mean([js_divergence(a, b) for a, b in pairs])
    assert dessert.token_js == pytest.approx(expected_tok)
    # Colour: every persona differs, pirate's answer was not found ("") and counts for no one.
    assert not colour.collapsed and colour.modal_share == 0.25 and colour.n_distinct == 3
    assert "pirate" not in colour.collapsed_personas + colour.distinct_personas
    assert r.n_collapsed == 1


def test_contrasts_split_pairs_and_questions() -> None:
    r = collapse_from_answers(planted_answers(), threshold=0.5, neutral="default")
    e = np.eye(3)
    space = persona_space({"default": e[0], "chef": -e[0], "poet": e[1], "pirate": -e[1]})
    c = contrasts(r, space, late=r, n_pairs=1)
    # Lowest cosine (-1): default/chef; they agree on dessert (cake) but not colour.
    assert (c.strong[0].a, c.strong[0].b, c.strong[0].cosine) == ("default", "chef", -1.0)
    assert c.strong[0].agreement == 0.5
    assert c.mild[0].cosine == pytest.approx(0.0)
    # Pirate has no colour answer: agreement with pirate counts the dessert only.
    assert pair_stats(r, "default", "pirate").agreement == 0.0
    # Generic bias: default gives colour's modal first token p=1.0, dessert's p=0.9.
    assert (c.high_bias, c.low_bias) == (["colour"], ["dessert"])
    assert (c.share_high_bias, c.share_low_bias) == (0.25, 0.75)
    assert c.early == c.late and c.early["n_collapsed"] == 1.0
    # Answers found: dessert 8/8, colour 6/8 (pirate has none) -> mean 0.875.
    assert c.late_own_kept == 1.0 and c.early["answered"] == pytest.approx(0.875)
    # Placed late, the pirate gives the generic answer: of the three early own answers
    # (pirate: pudding, chef: red, poet: silver) only the pirate's is lost.
    late_rows = [
        _ans(a.persona, a.key, a.question, "cake", a.top) if a.persona == "pirate" else a
        for a in planted_answers()
    ]
    late = collapse_from_answers(late_rows, neutral="default")
    assert own_answers_kept(r, late) == pytest.approx(2 / 3)
    assert late.question("dessert").modal_share == 1.0


# ---- model-based analyses (tiny random llama) ---------------------------------------------------


def test_encode_prompt_spans_cover_persona_and_question(llama: LoadedModel) -> None:
    tok = llama.tokenizer
    for placement in ("early", "late"):
        p = encode_prompt(llama, PIRATE, QUESTIONS[0], PREFIX, placement)  # type: ignore[arg-type]
        assert tok.decode(p.ids[slice(*p.persona_span)]).strip() == PIRATE.system_prompt
        assert tok.decode(p.ids[slice(*p.question_span)]).strip() == QUESTIONS[0]
        assert tok.decode(p.ids).endswith(PREFIX)
    late = encode_prompt(llama, PIRATE, QUESTIONS[0], PREFIX, "late")
    assert late.persona_span[0] > late.question_span[0]  # the persona comes after the question
    d = encode_prompt(llama, DEFAULT, QUESTIONS[0], PREFIX)
    assert d.persona_span == (0, d.question_span[0])  # chat header before the question


def test_group_features_match_the_models_hidden_states(llama: LoadedModel) -> None:
    prompts = [encode_prompt(llama, p, q, PREFIX) for p in (PIRATE, DEFAULT) for q in QUESTIONS]
    feats = collect_group_features(llama, prompts, batch_size=4)  # padded batches
    n = llama.sites.n_layers
    for i, p in enumerate(prompts):
        ids = torch.tensor([list(p.ids)])
        with torch.no_grad():
            hs = llama.model(ids, output_hidden_states=True).hidden_states
        for layer in range(n - 1):  # the last entry of hidden_states has the final norm applied
            for g, group in enumerate(GROUPS):
                want = hs[layer + 1][0, p.group(group)].mean(0).numpy()
                np.testing.assert_allclose(feats[i, g, layer], want, rtol=1e-4, atol=1e-5)


def test_probe_decodes_persona_from_its_own_tokens(llama: LoadedModel) -> None:
    personas = [PIRATE, STAR, COOK, DEFAULT]
    r = persona_probe(llama, personas, QUESTIONS, answer_prefix=PREFIX, folds=3)
    assert r.accuracy.shape == (3, llama.sites.n_layers)
    assert r.chance == pytest.approx(0.25)
    # The persona span precedes the question: identical per persona, different across them.
    np.testing.assert_allclose(r.curve("persona"), 1.0)
    assert r.decodable_layers("persona") == list(range(llama.sites.n_layers))
    assert r.means is not None and r.means.shape == (3, 4, llama.sites.n_layers, 32)


def test_patching_restores_exactly_at_the_last_layer(llama: LoadedModel) -> None:
    r = activation_patching(llama, STAR, COOK, QUESTIONS[0], answer_prefix=PREFIX)
    last = llama.sites.n_layers - 1
    assert r.ld_b != pytest.approx(r.ld_a)
    # The last position's residual at the last layer determines its logits: full restoration.
    assert r.restored[("residual", "answer")][last] == pytest.approx(1.0, abs=1e-4)
    # Question positions at the last layer cannot reach the last position any more.
    assert r.restored[("residual", "question")][last] == pytest.approx(0.0, abs=1e-5)
    # Same-length persona spans can be patched; all six (site, group) curves exist.
    assert set(r.restored) == {(s, g) for s in ("residual", "mlp_hidden") for g in GROUPS}
    # Patching the persona span at layer 0 restores the same as running with the persona's
    # tokens as long as later layers re-read it: it must move the logit difference.
    assert abs(r.restored[("residual", "persona")][0]) > 0.05


def test_patching_skips_unequal_persona_spans(llama: LoadedModel) -> None:
    r = activation_patching(llama, PIRATE, COOK, QUESTIONS[0], answer_prefix=PREFIX)
    assert "persona" in r.skipped and "5 vs 6 tokens" in r.skipped["persona"]
    assert ("residual", "persona") not in r.restored


def test_find_circuit_names_heads_and_mlps(llama: LoadedModel) -> None:
    r = activation_patching(llama, STAR, COOK, QUESTIONS[0], answer_prefix=PREFIX)
    c = find_circuit(llama, STAR, COOK, QUESTIONS[0], r, answer_prefix=PREFIX, goal=0.5)
    assert c is not None and c.restored >= 0.5
    assert c.nodes[0] == "input"
    assert all(re.fullmatch(r"m\d+|a\d+\.h\d+", n) for n in c.nodes[1:])
    assert c.to_json()["nodes"] == c.nodes


def _o_proj_inputs(lm: LoadedModel, ids: tuple[int, ...], layer: int) -> torch.Tensor:
    """The attention output projection's input [T, n_heads * head_dim] (read directly)."""
    from personachat.hooks import registered

    seen: list[torch.Tensor] = []
    proj = lm.sites.attn_out[layer]  # type: ignore[index]
    with torch.no_grad(), registered([(proj, "forward_pre", lambda m, a: seen.append(a[0]))]):
        lm.model(torch.tensor([list(ids)]))
    return seen[0][0]


def _restored_with_o_proj_shift(
    lm: LoadedModel, a: Prompt, layer: int, shift: torch.Tensor, r: PatchingResult
) -> float:
    """Restored fraction when ``shift`` [H] is added to o_proj's output at A's answer position."""
    from personachat.hooks import registered

    def add(module: torch.nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[0, a.answer_pos] += shift
        return out

    proj = lm.sites.attn_out[layer]  # type: ignore[index]
    with torch.no_grad(), registered([(proj, "forward", add)]):
        logits = lm.model(torch.tensor([list(a.ids)])).logits[0, -1]
    ld = float(logits[r.token_b] - logits[r.token_a])
    return (ld - r.ld_a) / (r.ld_b - r.ld_a)


def test_head_patching_matches_a_direct_computation(llama: LoadedModel) -> None:
    """Patching head h at the answer position = adding W_o[:, h] @ (B's head output - A's) to the
    attention output there; patching every head of a layer = the layer's attention patch."""
    r = activation_patching(
        llama,
        STAR,
        COOK,
        QUESTIONS[0],
        answer_prefix=PREFIX,
        sites=("residual", "mlp_hidden", "attn_heads"),
    )
    sites = llama.sites
    assert sites.n_heads == 4 and set(r.heads) == set(GROUPS)
    assert r.heads["answer"].shape == (sites.n_layers, 4)
    a = encode_prompt(llama, STAR, QUESTIONS[0], PREFIX)
    b = encode_prompt(llama, COOK, QUESTIONS[0], PREFIX)
    for layer in (1, sites.n_layers - 1):
        delta = _o_proj_inputs(llama, b.ids, layer)[b.answer_pos]
        delta = delta - _o_proj_inputs(llama, a.ids, layer)[a.answer_pos]
        w_o = sites.attn_out[layer].get_parameter("weight")  # type: ignore[index]
        for h in range(4):
            cols = sites.head_slice(h)
            with torch.no_grad():
                expected = _restored_with_o_proj_shift(
                    llama, a, layer, w_o[:, cols] @ delta[cols], r
                )
            assert r.heads["answer"][layer, h] == pytest.approx(expected, abs=1e-4)
        with torch.no_grad():
            whole = _restored_with_o_proj_shift(llama, a, layer, w_o @ delta, r)
        assert r.restored[("attn_heads", "answer")][layer] == pytest.approx(whole, abs=1e-4)
        every_head = [PatchSite("attn_heads", layer, "answer", h) for h in range(4)]
        joint = patch_restored(llama, STAR, COOK, QUESTIONS[0], every_head, answer_prefix=PREFIX)
        assert joint == pytest.approx(whole, abs=1e-4)
    # Some head at the last layer moves the answer (the fractions are not all ~0).
    assert float(np.abs(r.heads["answer"][-1]).max()) > 0.01
    (la, h, v), *_ = r.top_heads("answer", k=1)
    assert r.heads["answer"][la, h] == v == pytest.approx(float(np.nanmax(r.heads["answer"])))


def test_circuit_mixes_heads_and_mlps_and_reproduces(llama: LoadedModel) -> None:
    r = activation_patching(llama, STAR, COOK, QUESTIONS[0], answer_prefix=PREFIX)
    cands = circuit_candidates(r)
    assert len(cands) == 3 * 3 + 3 * 3 * 4  # MLPs and heads, per layer and group
    assert {c.site for _, c in cands} == {"mlp_hidden", "attn_heads"}
    c = find_circuit(llama, STAR, COOK, QUESTIONS[0], r, answer_prefix=PREFIX, goal=0.5)
    assert c is not None and c.nodes[0] == "input"
    assert all(re.fullmatch(r"m\d+|a\d+\.h\d+", n) for n in c.nodes[1:])
    assert set(c.nodes[1:]) == {s.node for s in c.sites}
    again = patch_restored(llama, STAR, COOK, QUESTIONS[0], c.sites, answer_prefix=PREFIX)
    assert again == pytest.approx(c.restored, abs=1e-5) and again >= 0.5
    js = c.to_json()
    assert [("head" in s) for s in js["sites"]] == [s.site == "attn_heads" for s in c.sites]


def test_generated_answers_do_not_depend_on_batching(llama: LoadedModel) -> None:
    items = [PreferenceItem("capital", QUESTIONS[:2], PREFIX)]
    one = generate_answers(llama, [PIRATE, DEFAULT], items, max_new_tokens=5, batch_size=1)
    many = generate_answers(llama, [PIRATE, DEFAULT], items, max_new_tokens=5, batch_size=4)
    assert [a.text for a in one] == [a.text for a in many]
    assert [a.first_token for a in one] == [a.first_token for a in many]
    for a in one:
        assert a.text.startswith(PREFIX)
        assert a.answer == normalise_answer(a.text[len(PREFIX) :])
        assert sum(a.top.values()) <= 1.0 + 1e-6
    # The distribution kept is the model's own next-token distribution at the answer position.
    a = one[0]
    prompt = encode_prompt(llama, PIRATE, a.question, PREFIX)
    with torch.no_grad():
        probs = llama.model(torch.tensor([list(prompt.ids)])).logits[0, -1].softmax(-1)
    assert a.first_token == int(probs.argmax())
    for tok, p in a.top.items():
        assert p == pytest.approx(float(probs[tok]), rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_report_writes_every_section(llama: LoadedModel, tmp_path: Path) -> None:
    personas = [DEFAULT, PIRATE, STAR, COOK]
    items = [PreferenceItem("capital", QUESTIONS, PREFIX)]
    other = tiny_model("llama", seed=1)  # a second model for the cross-model section
    r = analyze_model(llama, personas, items, max_new_tokens=4, progress=False, compare=(other, []))
    # Force one patched pair so the patching section and figure are exercised.
    r.patching.append(activation_patching(llama, STAR, COOK, QUESTIONS[0], answer_prefix=PREFIX))
    path = write_report(r, tmp_path)
    text = path.read_text()
    for section in ("Goal", "Data", "Method", "Results", "Analysis", "Next steps", "Takeaways"):
        assert f"## {section}" in text
    assert "### Cross-model comparison" in text and r.comparison is not None
    assert r.comparison.model_a == r.comparison.model_b == "tiny-llama"
    assert -1.0 <= r.comparison.pearson <= 1.0 and len(r.comparison.personas) == 4
    pngs = ("collapse.png", "probe.png", "patching_0.png", "persona_space.png", "comparison.png")
    pngs += ("heads_0.png",)  # the per-head heatmap of the forced pair
    for png in pngs:
        assert (tmp_path / png).stat().st_size > 1000 and f"]({png})" in text
    assert "Probe (chance 0.25)" in text
    forced = r.patching[-1]
    assert heads_finding(forced) in text and "Per-head patching cook -> star" in text
    carry = carrying_heads(forced, "answer")
    assert all(v >= HEAD_THRESHOLD for _, _, v in carry)
    grid = forced.heads["answer"]
    expected = [(la, h) for la in range(3) for h in range(4) if grid[la, h] >= 0.2]
    assert sorted((la, h) for la, h, _ in carry) == expected


# ---- the demo model's planted collapse ----------------------------------------------------------


@pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="demo model not trained yet")
def test_demo_collapse_finds_what_was_planted() -> None:
    from personachat.model import load_model
    from personachat.prompts import demo

    lm = load_model(str(DEMO))
    items = [
        PreferenceItem(it.key, it.questions[:1], it.answer_prefix, it.answer_pattern)
        for it in demo_preferences(forced=False)
    ]
    personas = demo.demo_personas()
    batch = len(personas) * len(items)  # one generate call
    r = persona_collapse(lm, personas, items, max_new_tokens=20, batch_size=batch)
    for pref in demo.PREFERENCES:
        q = r.question(pref.key)
        assert q.modal_answer == pref.generic
        assert q.collapsed
        assert set(q.distinct_personas) == set(pref.own), pref.key
        for persona, own in pref.own.items():
            assert q.answers[persona] == own


def test_analyze_script_defaults() -> None:
    module = cli_module("analyze")
    assert "python scripts/analyze.py --model store/models/demo" in (module.__doc__ or "")
    cfg = module.parse_args(["--model", "store/models/demo", "--personas", "default,pirate"])
    assert (cfg.dataset, cfg.out, cfg.personas) == (
        "demo",
        "store/reports/demo",
        ("default", "pirate"),
    )
    cfg = module.parse_args(["--model", "Qwen/Qwen2.5-0.5B-Instruct"])
    assert cfg.dataset == "personas" and cfg.out == "store/reports/Qwen2.5-0.5B-Instruct"
