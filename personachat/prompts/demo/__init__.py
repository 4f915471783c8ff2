"""The synthetic persona corpus of the bundled demo model, and the counters that score its text.

The demo model (``store/models/demo``, trained by ``scripts/train_demo_model.py``) learns from
templated conversations built here. Because the personas are planted, their signatures are known:

- 12 personas (``PERSONA_NAMES``) incl. the neutral ``default`` (no system prompt). Each has its
  own style markers (words, phrases, sign-offs) spread through the whole reply: an opener, a tail
  after each fact, an interjection in the middle and a sign-off. ``marker_rate(texts, persona)``
  counts them.
- 40 topics (``TOPICS``), each with two facts whose key phrases every reply states, whatever the
  persona: ``fact_retention(texts, topic)`` measures how much content survived an intervention.
- Questions over the topics with a held-out split (``questions("heldout")``): whole question
  templates and a seeded share of (topic, template) pairs never appear in training.
- Preference questions (``PREFERENCES``: favourite dessert, colour, ...) where most personas give
  the same generic answer and only a few have their own: planted persona collapse.
- Some conversations have no system prompt but a styled reply (from the first sentence or from the
  second), so the model learns to continue a style it sees in its own text.

The tables (styles, topics, preferences, templates) are data in
``personachat/prompts/data/demo/corpus.json``, read by ``tables``; ``questions`` splits the
questions, ``corpus`` builds replies and conversations, ``counters`` scores text.
"""

from __future__ import annotations

from personachat.prompts.demo.corpus import (
    Conversation,
    build_corpus,
    make_conversation,
    planted_dataset,
    reply_text,
)
from personachat.prompts.demo.counters import (
    fact_retention,
    fact_score,
    has_marker,
    leaked_markers,
    marker_count,
    marker_rate,
    preference_rate,
)
from personachat.prompts.demo.questions import (
    HELDOUT_PAIR_SHARE,
    SPLIT_SEED,
    SPLITS,
    Question,
    Split,
    eval_questions,
    preference_questions,
    questions,
)
from personachat.prompts.demo.tables import (
    DEFAULT_PERSONA,
    HELDOUT_PREFERENCE_TEMPLATES,
    HELDOUT_TOPIC_TEMPLATES,
    PERSONA_NAMES,
    PREFERENCE_TEMPLATES,
    PREFERENCES,
    STYLES,
    TOPIC_TEMPLATES,
    TOPICS,
    Fact,
    Preference,
    Style,
    Topic,
    demo_personas,
    preference,
    preference_answer,
    style,
    topic,
)

__all__ = [
    "DEFAULT_PERSONA",
    "HELDOUT_PAIR_SHARE",
    "HELDOUT_PREFERENCE_TEMPLATES",
    "HELDOUT_TOPIC_TEMPLATES",
    "PERSONA_NAMES",
    "PREFERENCES",
    "PREFERENCE_TEMPLATES",
    "SPLITS",
    "SPLIT_SEED",
    "STYLES",
    "TOPICS",
    "TOPIC_TEMPLATES",
    "Conversation",
    "Fact",
    "Preference",
    "Question",
    "Split",
    "Style",
    "Topic",
    "build_corpus",
    "demo_personas",
    "eval_questions",
    "fact_retention",
    "fact_score",
    "has_marker",
    "leaked_markers",
    "make_conversation",
    "marker_count",
    "marker_rate",
    "planted_dataset",
    "preference",
    "preference_answer",
    "preference_questions",
    "preference_rate",
    "questions",
    "reply_text",
    "style",
    "topic",
]
