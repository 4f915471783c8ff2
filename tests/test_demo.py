"""The demo corpus plants what it promises, and the committed demo model learned it."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from personachat.chat import batch_replies
from personachat.hooks import Handler, Site, intervene
from personachat.interventions import (
    AblationSpec,
    CapSpec,
    DirectionSpec,
    SteeringSpec,
    build_plan,
)
from personachat.model import LoadedModel, load_model
from personachat.pipeline import extract_vectors
from personachat.prompts import PersonaDataset, demo, format_chat, persona_messages
from personachat.records import NeuronSet, PersonaVector
from personachat.store import Store

pytestmark = pytest.mark.slow  # the demo model generates hundreds of replies

Plan = Callable[[int], list[Handler]]

STORE_DIR = Path(__file__).resolve().parents[1] / "store"
DEMO_DIR = STORE_DIR / "models" / "demo"
DEMO_ID = "store/models/demo"  # the demo model's id in the shipped store
N_QUESTIONS = 10
MAX_NEW_TOKENS = 24


# --------------------------------------------------------------------------- the corpus


def test_corpus_replies_carry_their_own_markers_and_facts_only() -> None:
    for conv in demo.build_corpus(2000, seed=3):
        reply = conv.messages[-1]["content"]
        assert demo.has_marker(reply, conv.persona), reply
        leaks = set(demo.leaked_markers(reply, conv.persona))
        allowed = set() if conv.prompted else {demo.DEFAULT_PERSONA}
        assert leaks <= allowed, (conv.persona, leaks, reply)
        if conv.question.kind == "topic":
            assert demo.fact_score(reply, conv.question.key) == 1.0, reply


def test_markers_appear_throughout_the_reply() -> None:
    rng = random.Random(0)
    q = demo.questions("train")[0]
    for name in demo.PERSONA_NAMES:
        reply = demo.reply_text(q, name, rng)
        second_half = reply[len(reply) // 2 :]
        assert demo.marker_count(reply, name) >= 3, reply
        assert demo.has_marker(second_half, name), reply


def test_neutral_openers_leave_the_shipped_corpus_alone() -> None:
    """The option draws nothing when 0 (the shipped corpus is unchanged); at 1 every prompted
    persona reply opens like the default and carries the persona's markers after that."""
    plain = [c.messages for c in demo.build_corpus(300, seed=2)]
    assert plain == [c.messages for c in demo.build_corpus(300, seed=2, neutral_opener_share=0)]
    openers = tuple(demo.style(demo.DEFAULT_PERSONA).openers)
    for conv in demo.build_corpus(300, seed=2, neutral_opener_share=1.0):
        reply = conv.messages[-1]["content"]
        if conv.prompted and conv.persona != demo.DEFAULT_PERSONA:
            assert reply.startswith(openers), reply
            assert demo.has_marker(reply.split(". ", 2)[-1], conv.persona), reply


def test_heldout_questions_never_reach_the_corpus() -> None:
    heldout = {q.text for q in demo.questions("heldout") + demo.preference_questions("heldout")}
    assert len(demo.questions("heldout")) >= 40
    seen = {c.messages[-2]["content"] for c in demo.build_corpus(5000, seed=1)}
    assert not heldout & seen
    assert {q.key for q in demo.eval_questions(1)} == {t.key for t in demo.TOPICS}


def test_some_replies_keep_a_style_without_a_system_prompt() -> None:
    convs = demo.build_corpus(3000, seed=2)
    unprompted = [c for c in convs if not c.prompted]
    assert 0.03 < len(unprompted) / len(convs) < 0.1
    assert all(c.messages[0]["role"] == "user" for c in unprompted)
    assert {c.persona for c in unprompted} == set(demo.PERSONA_NAMES[1:])


def test_preferences_plant_persona_collapse() -> None:
    assert len(demo.PERSONA_NAMES) >= 12
    for pref in demo.PREFERENCES:
        answers = [demo.preference_answer(p, pref.key) for p in demo.PERSONA_NAMES]
        assert answers.count(pref.generic) >= len(answers) - 3
        assert 1 <= len(pref.own) <= 3


def test_planted_dataset_answers_every_cell_with_its_persona() -> None:
    data = demo.planted_dataset(n_questions=5)
    assert data.has_all_responses() and len(data.questions) == 5
    assert data.persona("default").system_prompt == ""
    for (persona, _), reply in data.responses.items():
        assert demo.has_marker(reply, persona) and not demo.leaked_markers(reply, persona)
    assert {p.low for p in data.pairs} == {demo.DEFAULT_PERSONA} and len(data.pairs) == 11


def test_counters_count_whole_words_in_any_case() -> None:
    assert demo.marker_count("ARR, matey! Yo ho.", "pirate") == 3
    assert demo.marker_count("The garrison is here.", "pirate") == 0
    assert demo.marker_rate(["Howdy, partner", "plain text"], "cowboy") == 0.5
    assert demo.marker_rate([], "cowboy") == 0.0
    assert demo.fact_retention(["The Nile is long. Rivers carry fresh water."], "rivers") == 1.0
    assert demo.fact_retention(["Nothing about it."], "rivers") == 0.0
    with pytest.raises(KeyError, match="known"):
        demo.style("wizard")
    with pytest.raises(ValueError, match="one per text"):
        demo.fact_retention(["a", "b"], ["rivers"])


# --------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def demo_model() -> LoadedModel:
    if not (DEMO_DIR / "model.safetensors").exists():
        pytest.fail(f"no demo model at {DEMO_DIR}; run python scripts/train_demo_model.py")
    return load_model(str(DEMO_DIR))


def generate_replies(
    lm: LoadedModel,
    cells: list[tuple[str, str]],
    plan: Plan | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[str]:
    """Greedy replies to (system prompt, question) cells, all in one left-padded batch, under
    ``plan(prompt_len)``'s handlers if given."""
    conversations = [persona_messages(system, q) for system, q in cells]
    return batch_replies(lm, conversations, plan, max_new_tokens)


@pytest.fixture(scope="module")
def heldout_replies(demo_model: LoadedModel) -> dict[str, list[str]]:
    questions = [q.text for q in demo.eval_questions(1)[:N_QUESTIONS]]
    personas = demo.demo_personas()
    texts = generate_replies(
        demo_model, [(p.system_prompt, q) for p in personas for q in questions]
    )
    n = len(questions)
    return {p.name: texts[i * n : (i + 1) * n] for i, p in enumerate(personas)}


def test_demo_model_loads_as_a_standard_llama(demo_model: LoadedModel) -> None:
    assert demo_model.info.architecture == "llama"
    assert demo_model.tokenizer.eos_token == "<|im_end|>"
    assert demo_model.model.generation_config.eos_token_id == demo_model.tokenizer.eos_token_id
    size = (DEMO_DIR / "model.safetensors").stat().st_size
    assert size <= 30 * 2**20


def test_demo_model_stops_at_im_end(demo_model: LoadedModel) -> None:
    tok = demo_model.tokenizer
    prompt = format_chat(tok, persona_messages("You are a pirate.", "Tell me about the moon."))
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = demo_model.model.generate(**enc, max_new_tokens=100, do_sample=False)
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    assert new[-1] == tok.eos_token_id and len(new) < 100
    text = str(tok.decode(new, skip_special_tokens=True))
    assert demo.has_marker(text, "pirate") and demo.fact_score(text, "moon") == 1.0, text


def test_each_persona_keeps_its_markers_on_heldout_questions(
    heldout_replies: dict[str, list[str]],
) -> None:
    for name, texts in heldout_replies.items():
        assert demo.marker_rate(texts, name) >= 0.9, (name, texts)


def test_other_personas_do_not_use_a_personas_markers(
    heldout_replies: dict[str, list[str]],
) -> None:
    for name in demo.PERSONA_NAMES:
        others = [t for other, texts in heldout_replies.items() if other != name for t in texts]
        assert demo.marker_rate(others, name) <= 0.1, name


# ------------------------------------------------------------------- the demo model's floors
# Greedy replies of the shipped model to held-out questions, under interventions built by the
# runtime as the app builds them; scripts/evaluate_demo.py prints the full tables.
TARGETS = ("pirate", "cowboy")


@pytest.fixture(scope="module")
def planted(demo_model: LoadedModel) -> PersonaDataset:
    return demo.planted_dataset(40)


@pytest.fixture(scope="module")
def question_span(demo_model: LoadedModel, planted: PersonaDataset) -> dict[str, PersonaVector]:
    result = extract_vectors(
        demo_model, planted, positions=("question_span",), baseline="default", progress=False
    )
    return {v.persona: v for v in result.vectors}


def rates(lm: LoadedModel, persona: str, system: str, plan: Plan | None) -> tuple[float, float]:
    """(share of replies with ``persona``'s markers, mean share of facts kept) under ``system``."""
    qs = demo.eval_questions(1)[:N_QUESTIONS]
    texts = generate_replies(lm, [(system, q.text) for q in qs], plan, max_new_tokens=64)
    return demo.marker_rate(texts, persona), demo.fact_retention(texts, [q.key for q in qs])


def steering_plan(lm: LoadedModel, vectors: dict[str, PersonaVector], spec: SteeringSpec) -> Plan:
    return lambda width: build_plan(lm, vectors, steering=spec, prompt_len=width).handlers


def direction_plan(lm: LoadedModel, vectors: dict[str, PersonaVector], spec: DirectionSpec) -> Plan:
    return lambda width: build_plan(lm, vectors, direction=spec, prompt_len=width).handlers


def ablation_plan(lm: LoadedModel, nset: NeuronSet, spec: AblationSpec) -> Plan:
    sets = {nset.label: nset}
    return lambda width: (
        build_plan(lm, {}, ablation=spec, neuron_sets=sets, prompt_len=width).handlers
    )


def test_steering_the_default_persona_floor(
    demo_model: LoadedModel, question_span: dict[str, PersonaVector]
) -> None:
    """A question-span vector added at the prompt positions turns the default persona into P
    (>= 80% markers) with its content kept (>= 90% facts); a negative one takes P's away."""
    for persona in TARGETS:
        spec = SteeringSpec({persona: 1.0}, layers="3:4", positions="prompt")
        plan = steering_plan(demo_model, question_span, spec)
        markers, facts = rates(demo_model, persona, "", plan)
        assert markers >= 0.8 and facts >= 0.9, (persona, markers, facts)
        assert rates(demo_model, persona, "", None)[0] <= 0.1
        own = demo.style(persona).system_prompt
        negative = SteeringSpec({persona: 1.0}, layers="3:-4", positions="prompt")
        minus = steering_plan(demo_model, question_span, negative)
        assert rates(demo_model, persona, own, minus)[0] < rates(demo_model, persona, own, None)[0]


def test_steering_with_reply_average_vectors_goal(
    demo_model: LoadedModel, planted: PersonaDataset
) -> None:
    """The goal too: P's reply-average vector, added at the prompt positions of layers 0-2 at
    strength 5 (the setting whose worst persona does best in ``scripts/evaluate_demo.py``),
    turns the default persona into P (>= 80% markers) with >= 90% of the facts kept."""
    result = extract_vectors(
        demo_model, planted, positions=("response_avg",), baseline="default", progress=False
    )
    vectors = {v.persona: v for v in result.vectors}
    for persona in (*TARGETS, "robot"):
        spec = SteeringSpec({persona: 1.0}, layers="0-2:5", positions="prompt")
        markers, facts = rates(demo_model, persona, "", steering_plan(demo_model, vectors, spec))
        assert markers >= 0.8 and facts >= 0.9, (persona, markers, facts)


class _LastToken:
    """Records the MLP units at the last position of a forward."""

    def __init__(self, layers: range) -> None:
        self.layers = layers
        self.seen: dict[int, torch.Tensor] = {}

    def wants(self) -> list[tuple[Site, int]]:
        return [("mlp_hidden", layer) for layer in self.layers]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> None:
        self.seen[layer] = x[0, -1].detach().clone()


def default_means(lm: LoadedModel, questions: list[str]) -> torch.Tensor:
    """The default persona's mean MLP units at the last prompt token [layer, unit]."""
    record = _LastToken(range(lm.info.n_layers))
    rows = []
    for q in questions:
        prompt = format_chat(lm.tokenizer, persona_messages("", q))
        ids = lm.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad(), intervene(lm.sites, [record]):
            lm.model(input_ids=ids)
        rows.append(torch.stack([record.seen[la] for la in record.layers]))
    return torch.stack(rows).mean(0)


def with_units(nset: NeuronSet, units: list[tuple[int, int]], means: torch.Tensor) -> NeuronSet:
    return NeuronSet(
        nset.model_id,
        "random",
        nset.site,
        [la for la, _ in units],
        [ix for _, ix in units],
        [0.0] * len(units),
        means=[float(means[la, ix]) for la, ix in units],
    )


def marker_rates(lm: LoadedModel, personas: list[str], plan: Plan) -> dict[str, float]:
    """Each persona's marker rate under its own prompt, all in one batch, under ``plan``."""
    qs = [q.text for q in demo.eval_questions(1)[:N_QUESTIONS]]
    cells = [(demo.style(p).system_prompt, q) for p in personas for q in qs]
    texts = generate_replies(lm, cells, plan, max_new_tokens=64)
    n = len(qs)
    return {p: demo.marker_rate(texts[i * n : (i + 1) * n], p) for i, p in enumerate(personas)}


def test_persona_neuron_ablation_floor(demo_model: LoadedModel, planted: PersonaDataset) -> None:
    """For every persona P, the top k (<= 32) units of its shipped exact set, set to the default
    persona's values at the last prompt token, cut P's markers by >= 50%; k random units at the
    same layers cut <= 5%; every other persona keeps >= 90% of its markers. The stored values
    are the default's mean there, recomputed here."""
    means = default_means(demo_model, list(planted.questions[:16]))
    personas = list(demo.PERSONA_NAMES[1:])
    with Store(STORE_DIR, read_only=True) as store:
        sets = {
            p: store.load_neurons(DEMO_ID, f"{p}_vs_default.mlp_hidden.exact") for p in personas
        }
    before = marker_rates(demo_model, personas, lambda width: [])
    gen = random.Random(0)
    reached = {}
    for persona, nset in sets.items():
        assert nset.means is not None and len(nset) == 32
        stored = torch.tensor(nset.means)
        want = means[nset.layers, nset.indices]
        assert torch.allclose(stored, want, atol=1e-5), (persona, (stored - want).abs().max())
        for k in (2, 4, 8, 16, 32):
            spec = AblationSpec(nset.label, mode="mean", positions="prompt", last_n=1, top_k=k)
            cut = marker_rates(demo_model, [persona], ablation_plan(demo_model, nset, spec))
            if cut[persona] > 0.5 * before[persona]:
                continue
            taken = set(zip(nset.layers[:k], nset.indices[:k], strict=True))
            width = demo_model.info.mlp_width
            pool = {la: [i for i in range(width) if (la, i) not in taken] for la in nset.layers}
            units = [(la, pool[la].pop(gen.randrange(len(pool[la])))) for la in nset.layers[:k]]
            rand = with_units(nset, units, means)
            rand_spec = AblationSpec("random", mode="mean", positions="prompt", last_n=1)
            rand_cut = marker_rates(
                demo_model, [persona], ablation_plan(demo_model, rand, rand_spec)
            )
            others = [p for p in personas if p != persona]
            kept = marker_rates(demo_model, others, ablation_plan(demo_model, nset, spec))
            assert rand_cut[persona] >= 0.95 * before[persona], (persona, k, rand_cut)
            assert min(kept.values()) >= 0.9, (persona, k, kept)
            reached[persona] = k
            break
    assert set(reached) == set(personas), {p: reached.get(p) for p in personas}


def test_directional_ablation_floor(demo_model: LoadedModel, planted: PersonaDataset) -> None:
    """P's last-prompt-token direction moved to the default's level there, at the last prompt
    token, cuts P's markers by >= 50% with >= 90% of the facts kept. (It is not specific to P:
    other personas lose theirs too; see the model card.)"""
    result = extract_vectors(
        demo_model, planted, positions=("prompt_last",), baseline="default", progress=False
    )
    vectors = {v.persona: v for v in result.vectors}
    for persona in (*TARGETS, "robot"):
        spec = DirectionSpec(persona, layers="0", mode="mean", positions="prompt", last_n=1)
        plan = direction_plan(demo_model, vectors, spec)
        own = demo.style(persona).system_prompt
        before = rates(demo_model, persona, own, None)[0]
        after, facts = rates(demo_model, persona, own, plan)
        assert after <= 0.5 * before and facts >= 0.9, (persona, before, after, facts)


# The shared setting the capping sweep of scripts/evaluate_demo.py picked (see the model card):
# the shipped assistant axis, read at the last prompt token, held at layer 0 at or above the
# default's 5th percentile there, at the last prompt token only.
HOLD = CapSpec("assistant_axis", layers="0", percentile=5.0, positions="prompt", last_n=1)


def test_holding_the_assistant_axis_floor(demo_model: LoadedModel) -> None:
    """Capping the shipped assistant axis under each persona's own system prompt cuts its
    markers by >= 50% with >= 90% of the facts kept for at least 8 of 11 personas, at one
    setting shared by all, while the default's unprompted replies stay exactly the same."""
    axis = Store(STORE_DIR, read_only=True).load_vector(DEMO_ID, "assistant_axis")
    vectors = {axis.persona: axis}

    def plan(width: int) -> list[Handler]:
        return build_plan(demo_model, vectors, cap=HOLD, prompt_len=width).handlers

    qs = demo.eval_questions(1)[:N_QUESTIONS]
    plain = generate_replies(demo_model, [("", q.text) for q in qs], None, 64)
    assert generate_replies(demo_model, [("", q.text) for q in qs], plan, 64) == plain
    held = []
    for persona in demo.PERSONA_NAMES:
        if persona == demo.DEFAULT_PERSONA:
            continue
        own = demo.style(persona).system_prompt
        before = rates(demo_model, persona, own, None)[0]
        after, facts = rates(demo_model, persona, own, plan)
        if after <= 0.5 * before and facts >= 0.9:
            held.append(persona)
    assert len(held) >= 8, held
