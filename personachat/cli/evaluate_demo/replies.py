"""Greedy replies to the evaluation questions, under an intervention plan, and their scores.

A plan is ``plan(prompt_len) -> handlers``, built per batch by ``personachat.interventions``;
replies are scored with ``personachat.prompts.demo``: the share with the persona's style markers
and the share of the topic's fact key phrases kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from personachat.chat import batch_replies
from personachat.hooks import Handler
from personachat.interventions import AblationSpec, DirectionSpec, SteeringSpec, build_plan
from personachat.model import LoadedModel
from personachat.prompts import demo, persona_messages
from personachat.records import NeuronSet, PersonaVector

PlanFn = Callable[[int], list[Handler]]


def generate(
    lm: LoadedModel,
    system_prompt: str,
    questions: Sequence[str],
    max_new_tokens: int,
    plan: PlanFn | None = None,
) -> list[str]:
    """Greedy replies (one left-padded batch); ``plan(prompt_len)`` gives the handlers."""
    conversations = [persona_messages(system_prompt, q) for q in questions]
    return batch_replies(lm, conversations, plan, max_new_tokens)


@dataclass(frozen=True)
class Score:
    markers: float  # share of replies with the target persona's markers
    facts: float  # mean share of the topic's facts kept


def score(texts: Sequence[str], persona: str, topics: Sequence[str]) -> Score:
    return Score(demo.marker_rate(texts, persona), demo.fact_retention(texts, list(topics)))


@dataclass(frozen=True)
class Asker:
    """Asks one model the evaluation questions greedily and scores the replies."""

    lm: LoadedModel
    texts: tuple[str, ...]
    topics: tuple[str, ...]  # the topic of each question, for fact retention
    max_new_tokens: int

    @classmethod
    def of(cls, lm: LoadedModel, qs: Sequence[demo.Question], max_new_tokens: int) -> Asker:
        return cls(lm, tuple(q.text for q in qs), tuple(q.key for q in qs), max_new_tokens)

    def replies(self, system_prompt: str, plan: PlanFn | None = None) -> list[str]:
        return generate(self.lm, system_prompt, self.texts, self.max_new_tokens, plan)

    def measure(
        self, persona: str, plan: PlanFn | None = None, *, system_prompt: str | None = None
    ) -> tuple[Score, list[str]]:
        """The score and replies of ``persona`` under its own system prompt (or another)."""
        prompt = demo.style(persona).system_prompt if system_prompt is None else system_prompt
        replies = self.replies(prompt, plan)
        return score(replies, persona, self.topics), replies

    def kept_by_others(self, others: Sequence[str], plan: PlanFn) -> dict[str, float]:
        """The marker rate each of ``others`` keeps under its own prompt with ``plan`` on."""
        return {
            o: demo.marker_rate(self.replies(demo.style(o).system_prompt, plan), o) for o in others
        }


def cut(before: float, after: float) -> float:
    """The relative drop from ``before`` to ``after`` (0 when there was nothing to cut)."""
    return (before - after) / before if before > 0 else 0.0


def steer_plan(lm: LoadedModel, vectors: dict[str, PersonaVector], spec: SteeringSpec) -> PlanFn:
    return lambda width: build_plan(lm, vectors, steering=spec, prompt_len=width).handlers


def direction_plan(
    lm: LoadedModel, vectors: dict[str, PersonaVector], spec: DirectionSpec
) -> PlanFn:
    return lambda width: build_plan(lm, vectors, direction=spec, prompt_len=width).handlers


def ablate_plan(lm: LoadedModel, sets: dict[str, NeuronSet], spec: AblationSpec) -> PlanFn:
    return lambda width: (
        build_plan(lm, {}, ablation=spec, neuron_sets=sets, prompt_len=width).handlers
    )
