"""The one prompt renderer: spans found by the template's behaviour, for any template.

Templates written here cover the ways a chat template can take a system prompt (its own turn,
folded into the first user turn by the template, refused with an error, dropped without a word),
with and without a BOS, with a default system prompt and with a date; a property test checks the
span invariants on all of them. The real templates of five families are checked token by token
in tests/test_chat_models.py.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from personachat.model.tiny import tiny_tokenizer
from personachat.prompts.render import (
    RenderConditions,
    chat_spans,
    conditions,
    encode_text,
    format_chat,
    prompt_spans,
)

CHATML_DEFAULT = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NATIVE_BOS = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FOLDING = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}{% for m in loop_messages %}{% if m['role'] == 'user' %}"
    "{% if loop.first and sys is defined %}"
    "{{ ' [INST] ' + sys + '\n\n' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' [INST] ' + m['content'] + ' [/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for m in loop_messages %}{% if m['role'] == 'user' %}"
    "{% if loop.first and sys is defined %}{{ bos_token + '[INST] <<SYS>>\n' + sys + "
    "'\n<</SYS>>\n\n' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)
RAISING = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
DROPPING = (
    "{% for m in messages %}{% if m['role'] in ['user', 'assistant'] %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DATED = (
    "{% if date_string is not defined %}{% set date_string = '01 Jan 1999' %}{% endif %}"
    "<|im_start|>system\nToday: {{ date_string }}\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}<|im_end|>\n"
    "{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATES: dict[str, tuple[str | None, str, bool]] = {
    # name: (template, expected system mode, folded here)
    "chatml_default": (CHATML_DEFAULT, "native", False),
    "native_bos": (NATIVE_BOS, "native", False),
    "folding": (FOLDING, "folded", False),
    "llama2": (LLAMA2, "folded", False),
    "raising": (RAISING, "folded", True),
    "dropping": (DROPPING, "folded", True),
    "dated": (DATED, "native", False),
    "plain": (None, "native", False),
}


@functools.cache
def tokenizer_for(name: str) -> Any:
    tok = copy.deepcopy(tiny_tokenizer())
    tok.bos_token = "<|endoftext|>"
    tok.chat_template = TEMPLATES[name][0]
    return tok


TEXT = st.text(alphabet="abcdefghij klmnopqrstuvwxyz.,!?'AEIOU", min_size=1, max_size=40)


def words(text: str) -> str:
    return " ".join(text.split()) or "x"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@settings(max_examples=25, deadline=None)
@given(system=TEXT, question=TEXT)
def test_span_invariants_hold_for_every_kind_of_template(
    name: str, system: str, question: str
) -> None:
    tok = tokenizer_for(name)
    system, question = "Persona " + words(system), words(question) + "?"  # no "P" in questions
    persona = prompt_spans(tok, system, question)
    default = prompt_spans(tok, None, question)
    mode = TEMPLATES[name][1]
    for spans in (persona, default):
        assert spans.input_ids == encode_text(tok, spans.text)
        assert spans.prompt_last == len(spans.input_ids) - 1
        assert spans.question[1] == len(spans.input_ids)
        assert spans.system_mode == mode
        assert question in tok.decode(spans.input_ids[slice(*spans.question)])
    assert default.system is None and persona.system is not None
    s0, s1 = persona.system
    assert system in tok.decode(persona.input_ids[s0:s1])
    assert persona.question[0] >= s1, "the question span covers system text"
    assert system not in tok.decode(persona.input_ids[slice(*persona.question)])
    q_persona = persona.input_ids[slice(*persona.question)]
    q_default = default.input_ids[slice(*default.question)]
    if mode == "native":  # the same user turn and assistant header, token for token
        assert q_persona == q_default
    else:  # folded: the persona's span starts at the user's own text, after the header
        assert tok.decode(q_default).endswith(tok.decode(q_persona).lstrip())


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_system_mode_and_conditions_come_from_the_template(name: str) -> None:
    template, mode, folded_here = TEMPLATES[name]
    got = conditions(tokenizer_for(name))
    assert (got.system_mode, got.folded_here) == (mode, folded_here)
    assert got.bos == ("tokenizer" if template is None else "template")
    assert got.variables == ((("date_string", "26 Jul 2024"),) if name == "dated" else ())
    assert RenderConditions.from_json(got.to_json()) == got


def test_folding_here_writes_system_blank_line_question() -> None:
    for name in ("raising", "dropping"):
        text = format_chat(
            tokenizer_for(name),
            [
                {"role": "system", "content": "Be a pirate."},
                {"role": "user", "content": "Hello?"},
            ],
        )
        assert "Be a pirate.\n\nHello?" in text


def test_bos_is_written_once() -> None:
    tok = tokenizer_for("native_bos")
    spans = prompt_spans(tok, "Be brief.", "Why?")
    assert spans.input_ids[0] == tok.bos_token_id
    assert spans.input_ids.count(tok.bos_token_id) == 1


def test_a_date_template_renders_the_pinned_date(monkeypatch: pytest.MonkeyPatch) -> None:
    tok = tokenizer_for("dated")
    assert "Today: 26 Jul 2024" in prompt_spans(tok, None, "Why?").text
    monkeypatch.setenv("PERSONACHAT_DATE", "02 Dec 2026")
    assert "Today: 02 Dec 2026" in prompt_spans(tok, None, "Why?").text


def test_multi_turn_spans_cover_the_last_user_turn() -> None:
    tok = tokenizer_for("chatml_default")
    messages = [
        {"role": "system", "content": "Be a pirate."},
        {"role": "user", "content": "First?"},
        {"role": "assistant", "content": "Arr."},
        {"role": "user", "content": "Second?"},
    ]
    spans = chat_spans(tok, messages)
    q = tok.decode(spans.input_ids[slice(*spans.question)])
    assert q == "<|im_start|>user\nSecond?<|im_end|>\n<|im_start|>assistant\n"
    folded = chat_spans(tokenizer_for("folding"), messages)
    q = tokenizer_for("folding").decode(folded.input_ids[slice(*folded.question)])
    assert q.strip() == "[INST] Second? [/INST]"


def test_a_conversation_must_end_with_a_user_message() -> None:
    with pytest.raises(ValueError, match="ends with a user message"):
        chat_spans(tokenizer_for("chatml_default"), [{"role": "assistant", "content": "Hi"}])
