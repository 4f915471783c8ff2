"""The demo corpus plants what it promises, and the committed demo model learned it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from personachat import demo
from personachat.model import LoadedModel, load_model
from personachat.prompts import format_chat, persona_messages

DEMO_DIR = Path(__file__).resolve().parents[1] / "store" / "models" / "demo"
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


def generate_replies(lm: LoadedModel, cells: list[tuple[str, str]]) -> list[str]:
    """Greedy replies to (system prompt, question) cells, all in one left-padded batch."""
    tok = lm.tokenizer
    prompts = [format_chat(tok, persona_messages(system, q)) for system, q in cells]
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = side
    with torch.no_grad():
        out = lm.model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


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
