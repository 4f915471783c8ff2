"""The one prompt renderer: a conversation becomes the token ids a model is fed, with its parts.

``prompt_spans(tokenizer, system_prompt, question)`` (and ``chat_spans`` for a whole
conversation) renders through the tokenizer's chat template and says where the system text and
the last question sit, in tokens. Extraction, capture, response generation, neuron finding,
analysis and chat all render here, so the ids a vector was read from are the ids it is applied to.

Everything is learnt from the template's own behaviour, never from its family's name. Once per
template, distinct sentinel texts are rendered and located:

- how it takes a system prompt (``SystemMode``): in a turn of its own (``native``), or inside the
  first user turn (``folded``). A template that folds it itself is used as it is; one that raises
  on a system turn or drops the text without a word gets it folded here, the way folding
  templates do: ``system + "\\n\\n" + question`` as the first user message;
- the user header: the text a template writes before a user message (``<|im_start|>user\\n``),
  the common end of what precedes the first user message and what follows an assistant turn.

The question span runs from the last user turn's header (from the user's own text where the
system text was folded into that turn) through the assistant header, and never covers system
text. Template variables that change with the day (Llama-3's ``date_string``) are pinned
(``DEFAULT_VARIABLES``; ``PERSONACHAT_DATE`` overrides the date). One BOS rule holds everywhere: a
template writes its own BOS into the text, so its text is tokenized without special tokens; a
tokenizer without a template adds its own. ``RenderConditions`` records all of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from personachat.prompts.chat import Message, fallback_chat, persona_messages, plain_messages
from personachat.prompts.tokens import tokenize

log = logging.getLogger(__name__)

SystemMode = Literal["native", "folded"]
Span = tuple[int, int]
FOLD_SEPARATOR = "\n\n"
DEFAULT_DATE = "26 Jul 2024"
# Sentinels that no tokenizer or template alters (no spaces to trim, nothing to escape).
_SYS, _ASK, _OLD, _REPLY = "Zqxsysqz", "Zqxaskqz", "Zqxoldqz", "Zqxrepqz"


def default_variables() -> dict[str, str]:
    """Template variables pinned at extraction and chat alike (the date some templates write)."""
    return {"date_string": os.environ.get("PERSONACHAT_DATE", DEFAULT_DATE)}


@dataclass(frozen=True)
class RenderConditions:
    """How a prompt was rendered; a vector keeps these and warns when used under others."""

    template_sha256: str  # "" for the plain fallback (no chat template)
    system_mode: SystemMode  # where a system prompt goes with this template
    folded_here: bool  # the template raises on or drops a system turn, so it is folded here
    bos: Literal["template", "tokenizer"]  # who writes the BOS token (if any)
    variables: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> str:
        return json.dumps(
            {
                "template_sha256": self.template_sha256,
                "system_mode": self.system_mode,
                "folded_here": self.folded_here,
                "bos": self.bos,
                "variables": dict(self.variables),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> RenderConditions:
        data = json.loads(text)
        return cls(
            template_sha256=str(data["template_sha256"]),
            system_mode=data["system_mode"],
            folded_here=bool(data["folded_here"]),
            bos=data["bos"],
            variables=tuple(sorted((str(k), str(v)) for k, v in data["variables"].items())),
        )

    def differences(self, other: RenderConditions) -> list[str]:
        """What differs from ``other``, in words (empty when the same)."""
        out = []
        if self.template_sha256 != other.template_sha256:
            out.append("another chat template")
        if self.system_mode != other.system_mode or self.folded_here != other.folded_here:
            out.append(f"system prompts {other.system_mode} instead of {self.system_mode}")
        if self.bos != other.bos:
            out.append(f"BOS from the {other.bos} instead of the {self.bos}")
        if self.variables != other.variables:
            out.append(
                f"template variables {dict(other.variables)} instead of {dict(self.variables)}"
            )
        return out


@dataclass(frozen=True)
class PromptSpans:
    """A rendered prompt: exactly the ids the model is fed, and where its parts are.

    ``system`` and ``question`` are half-open token ranges; ``question`` ends at the prompt's end
    (the assistant header included); ``prompt_last`` is the index of the last prompt token.
    """

    input_ids: list[int]
    system: Span | None
    question: Span
    prompt_last: int
    system_mode: SystemMode
    text: str = field(repr=False)
    conditions: RenderConditions = field(repr=False)


@dataclass(frozen=True)
class _Template:
    """What one template does, learnt from rendering sentinels."""

    sha256: str
    mode: SystemMode
    folded_here: bool
    user_header: str
    writes_template: bool
    uses: tuple[str, ...]  # the pinned variables that change what the template writes


_TEMPLATES: dict[tuple[int, str, str], _Template] = {}


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _apply(
    tokenizer: Any, messages: Sequence[Message], generation: bool, variables: Mapping[str, str]
) -> str:
    if not has_template(tokenizer):
        return fallback_chat(messages, generation)
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation, **variables
    )
    return str(text)


def _try(
    tokenizer: Any, messages: Sequence[Message], generation: bool, variables: Mapping[str, str]
) -> str | None:
    try:
        return _apply(tokenizer, messages, generation, variables)
    except Exception as err:  # templates raise (jinja's TemplateError) on roles they refuse
        log.debug("chat template refused %s: %s", [m["role"] for m in messages], err)
        return None


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n :]


def _user_header(tokenizer: Any, variables: Mapping[str, str]) -> str:
    """The text the template writes before a user message's content."""
    first = _apply(tokenizer, [{"role": "user", "content": _ASK}], True, variables)
    before_first = first[: first.rfind(_ASK)]
    turns = [{"role": "user", "content": _OLD}, {"role": "assistant", "content": _REPLY}]
    closed = _try(tokenizer, turns, False, variables)
    later = _try(tokenizer, [*turns, {"role": "user", "content": _ASK}], True, variables)
    if closed is None or later is None or _REPLY not in closed or _REPLY not in later:
        return before_first  # one turn is all the template takes: all before it is the header
    after_reply = closed[closed.rfind(_REPLY) + len(_REPLY) :]
    between = later[later.rfind(_REPLY) + len(_REPLY) : later.rfind(_ASK)]
    if between.startswith(after_reply):
        between = between[len(after_reply) :]  # the assistant turn's own ending
    return _common_suffix(before_first, between)


def _used(tokenizer: Any, variables: Mapping[str, str]) -> tuple[str, ...]:
    """The variables whose value changes what the template writes."""
    if not has_template(tokenizer):
        return ()
    ask = [{"role": "user", "content": _ASK}]
    plain = _apply(tokenizer, ask, True, variables)
    return tuple(
        sorted(
            name
            for name in variables
            if _apply(tokenizer, ask, True, {**variables, name: _OLD}) != plain
        )
    )


def _learn(tokenizer: Any, variables: Mapping[str, str]) -> _Template:
    source = str(getattr(tokenizer, "chat_template", "") or "")
    sha = hashlib.sha256(source.encode()).hexdigest() if source else ""
    header = _user_header(tokenizer, variables)
    uses = _used(tokenizer, variables)
    both = [{"role": "system", "content": _SYS}, {"role": "user", "content": _ASK}]
    text = _try(tokenizer, both, True, variables)
    if text is None or _SYS not in text:
        why = "raises on" if text is None else "drops"
        log.warning(
            "the chat template %s a system turn: system prompts are folded into the first user "
            "message (system + blank line + question)",
            why,
        )
        return _Template(sha, "folded", True, header, bool(source), uses)
    between = text[text.find(_SYS) + len(_SYS) : text.rfind(_ASK)]
    native = bool(header) and between.endswith(header)
    mode: SystemMode = "native" if native else "folded"
    return _Template(sha, mode, False, header, bool(source), uses)


def _template(tokenizer: Any, variables: Mapping[str, str]) -> _Template:
    key = (
        id(tokenizer),
        str(getattr(tokenizer, "chat_template", "") or ""),
        json.dumps(dict(variables), sort_keys=True),
    )
    if key not in _TEMPLATES:
        _TEMPLATES[key] = _learn(tokenizer, variables)
    return _TEMPLATES[key]


def conditions(tokenizer: Any, variables: Mapping[str, str] | None = None) -> RenderConditions:
    """The render conditions of ``tokenizer``'s template (see ``RenderConditions``)."""
    pinned = default_variables() if variables is None else dict(variables)
    learnt = _template(tokenizer, pinned)
    return RenderConditions(
        template_sha256=learnt.sha256,
        system_mode=learnt.mode,
        folded_here=learnt.folded_here,
        bos="template" if learnt.writes_template else "tokenizer",
        variables=tuple(sorted((name, pinned[name]) for name in learnt.uses)),
    )


def _fold(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The system message folded into the first user message (``system + blank line + text``)."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], messages[1:]
    for i, message in enumerate(rest):
        if message["role"] == "user":
            folded = {"role": "user", "content": system + FOLD_SEPARATOR + message["content"]}
            return [*rest[:i], folded, *rest[i + 1 :]]
    return [{"role": "user", "content": system}, *rest]


def format_chat(
    tokenizer: Any,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    variables: Mapping[str, str] | None = None,
) -> str:
    """The text of a conversation as the model sees it: the tokenizer's chat template (or the
    plain fallback of ``personachat.prompts.chat``), system prompts folded where needed."""
    pinned = default_variables() if variables is None else dict(variables)
    clean = [m for m in plain_messages(messages) if m["role"] != "system" or m["content"]]
    if _template(tokenizer, pinned).folded_here:
        clean = _fold(clean)
    return _apply(tokenizer, clean, add_generation_prompt, pinned)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered text under the one BOS rule (see the module docstring)."""
    ids = tokenizer(text, add_special_tokens=not has_template(tokenizer))["input_ids"]
    return [int(i) for i in ids]


def chat_spans(
    tokenizer: Any, messages: Sequence[Message], *, variables: Mapping[str, str] | None = None
) -> PromptSpans:
    """``prompt_spans`` of a whole conversation ending in a user message: the system span and
    the last user turn's question span."""
    pinned = default_variables() if variables is None else dict(variables)
    clean = [m for m in plain_messages(messages) if m["role"] != "system" or m["content"]]
    users = [m for m in clean if m["role"] == "user"]
    if not users or clean[-1]["role"] != "user":
        raise ValueError("a prompt needs a conversation that ends with a user message")
    learnt = _template(tokenizer, pinned)
    system = clean[0]["content"] if clean[0]["role"] == "system" else None
    text = format_chat(tokenizer, clean, variables=pinned)
    question = users[-1]["content"]
    q_char = text.rfind(question.strip() or question)
    if q_char < 0:
        raise ValueError(f"the chat template did not write the question {question!r:.60}")
    folded_into_this = system is not None and learnt.mode == "folded" and len(users) == 1
    start = q_char
    if not folded_into_this and learnt.user_header and text[:q_char].endswith(learnt.user_header):
        start = q_char - len(learnt.user_header)
    tokens = tokenize(tokenizer, text, add_special_tokens=not has_template(tokenizer))
    ids = tokens.ids
    sys_span = None
    if system:
        s_char = text.find(system.strip() or system)
        if s_char < 0:
            raise ValueError(f"the chat template did not write the system text {system!r:.60}")
        end_char = s_char + len(system.strip() or system) - 1
        sys_span = (tokens.token_at(s_char), tokens.token_at(end_char) + 1)
    q_start = tokens.token_at(start)
    if sys_span is not None:
        q_start = max(q_start, sys_span[1])  # a token straddling both belongs to the system
    if not ids or q_start >= len(ids):
        raise ValueError("the rendered prompt has no tokens for the question")
    return PromptSpans(
        input_ids=ids,
        system=sys_span,
        question=(q_start, len(ids)),
        prompt_last=len(ids) - 1,
        system_mode=learnt.mode,
        text=text,
        conditions=conditions(tokenizer, pinned),
    )


def prompt_spans(
    tokenizer: Any,
    system_prompt: str | None,
    question: str,
    *,
    variables: Mapping[str, str] | None = None,
) -> PromptSpans:
    """A persona's prompt for one question, rendered, with the spans of its parts."""
    return chat_spans(tokenizer, persona_messages(system_prompt, question), variables=variables)
