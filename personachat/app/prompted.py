"""The prompted baseline: the same conversation answered under the lead persona's own system
prompt, streamed beside the steered reply, so steering can be judged against prompting.

``prompted_stream`` asks the chat engine for one more reply (no interventions) to the
conversation with the persona's system prompt in place of the page's; ``together`` advances the
steered stream and that one at once, each generating in its own worker thread, and yields the
latest update of each after every token of either.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

NO_PROMPT = "(no persona with a positive weight: nothing to prompt)"


def persona_prompt(store: Any, persona: str) -> str | None:
    """``persona``'s system prompt from the store ('' for none); None when it is unknown."""
    try:
        return str(store.persona(persona).system_prompt or "")
    except LookupError:
        return None


def prompted_messages(
    messages: Sequence[dict[str, Any]], system_prompt: str
) -> list[dict[str, Any]]:
    """``messages`` without their system turn, under ``system_prompt`` (none when empty)."""
    kept = [m for m in messages if m.get("role") != "system"]
    return [{"role": "system", "content": system_prompt}, *kept] if system_prompt else kept


def prompted_stream(
    engine: Any,
    messages: Sequence[dict[str, Any]],
    system_prompt: str,
    generation: Any,
    stop: threading.Event | None,
) -> Iterator[Any]:
    """The engine's plain reply to ``messages`` under ``system_prompt``, as a stream."""
    return iter(engine.stream(prompted_messages(messages, system_prompt), generation, stop=stop))


def together(main: Iterator[Any], other: Iterator[Any] | None) -> Iterator[tuple[Any, Any, bool]]:
    """(latest update of ``main``, latest of ``other`` or None, both finished) after each token
    of either; the last triple has both finished. Both streams are closed on the way out."""
    streams: dict[str, Iterator[Any]] = {"main": main}
    if other is not None:
        streams["other"] = other
    latest: dict[str, Any] = {"main": None, "other": None}
    try:
        while streams:
            for key in list(streams):
                try:
                    latest[key] = next(streams[key])
                except StopIteration:
                    del streams[key]
            if latest["main"] is not None and streams:
                yield latest["main"], latest["other"], False
        yield latest["main"], latest["other"], True
    finally:
        for stream in (main, other):
            close = getattr(stream, "close", None)
            if close is not None:
                close()
