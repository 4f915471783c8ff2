"""Preference questions ('favourite X'), each asked in several phrasings: a general set and the
demo model's planted ones."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PreferenceItem:
    """A preference ('favourite X') asked in several phrasings.

    ``answer_prefix`` is forced as the start of the reply (the answer follows it directly);
    ``answer_pattern`` is a regex whose first group picks the answer out of a free reply (for
    models that answer after an opener). With neither, the answer is the reply's first clause.
    """

    key: str
    questions: tuple[str, ...]
    answer_prefix: str = ""
    answer_pattern: str = ""


def default_preferences() -> list[PreferenceItem]:
    """A small general-purpose set of preference questions, with a forced answer prefix."""
    keys = ("dessert", "colour", "season", "animal", "drink", "pastime", "music genre", "city")
    templates = (
        "What is your favourite {k}?",
        "Which {k} do you like best?",
        "Tell me your favourite {k}.",
    )
    return [
        PreferenceItem(k, tuple(t.format(k=k) for t in templates), f"My favourite {k} is")
        for k in keys
    ]


def demo_preferences(forced: bool = True) -> list[PreferenceItem]:
    """The demo model's planted preference questions (``personachat.prompts.demo``), all phrasings.

    ``forced`` starts every reply with ``My favourite {key} is`` so all personas share the tokens
    after the question (needed for patching); otherwise the answer is found in the free reply.
    """
    from personachat.prompts import demo

    return [
        PreferenceItem(
            key=p.key,
            questions=tuple(t.format(key=p.key) for t in demo.PREFERENCE_TEMPLATES),
            answer_prefix=f"My favourite {p.key} is" if forced else "",
            answer_pattern=rf"favourite {p.key} is\s*([^.,!?;]+)",
        )
        for p in demo.PREFERENCES
    ]
