"""Streaming chat generation under live interventions: one ``ChatEngine`` per loaded model.

``ChatEngine(lm, vectors, neuron_sets).stream(messages, settings, steering=..., ...)`` checks the
request (raising ``InterventionError`` before the model is touched), then returns an iterator of
``ChatUpdate``: the reply so far after each generated token, and a last update (``done=True``)
carrying the readout projections. Generation runs in a worker thread whose target runs inside
``contextvars.copy_context().run``, so the hooks of ``personachat.hooks.intervene`` act only for
this request; an engine holds no mutable state, so any number of sessions (threads) can share it.

Side by side (``side_by_side=True``): the unsteered and the steered reply come from ONE batched
generation of two identical rows, row 0 without and row 1 with the interventions; greedy
outputs equal those of two separate runs. Sampling uses a private generator per row seeded
with ``settings.seed``, so replies are reproducible and independent of other threads.

Stopping: set the ``stop`` event, or stop iterating (close the iterator); either ends the
generation after the current token. Every hook is removed before the iterator finishes, also
when a hook raises (the error is re-raised to the consumer).
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from personachat.chat.generation import EventStop, GenerationSettings, QueueStreamer, SeededSampler
from personachat.chat.updates import ChatUpdate, ReplyReadout, row_readout
from personachat.hooks import Handler, intervene
from personachat.interventions import (
    AblationSpec,
    CapSpec,
    DirectionSpec,
    InterventionError,
    Plan,
    SteeringSpec,
    build_plan,
)
from personachat.model import LoadedModel
from personachat.prompts import Message, encode_text, format_chat
from personachat.records import NeuronSet, PersonaVector


@dataclass
class _Failed:
    error: BaseException


_END = object()


@dataclass
class _Job:
    """Everything one generation needs, built and checked before the worker starts."""

    input_ids: torch.Tensor
    plan: Plan
    handlers: list[Handler]
    config: GenerationConfig
    processors: LogitsProcessorList
    eos: frozenset[int]
    side_by_side: bool
    replies: list[list[int]] = field(default_factory=list)
    stopped: bool = False
    readout_result: torch.Tensor | None = None


class ChatEngine:
    """Chat with a loaded model under steering, ablation and readout, one request at a time each.

    ``vectors`` (persona name -> ``PersonaVector``) and ``neuron_sets`` (label -> ``NeuronSet``)
    are the catalog requests name; they are copied and never changed. All settings come per
    call, so one engine serves many sessions and threads.
    """

    def __init__(
        self,
        lm: LoadedModel,
        vectors: Mapping[str, PersonaVector] | Iterable[PersonaVector] = (),
        neuron_sets: Mapping[str, NeuronSet] | Iterable[NeuronSet] = (),
    ) -> None:
        self.lm = lm
        self.vectors: Mapping[str, PersonaVector] = (
            dict(vectors) if isinstance(vectors, Mapping) else {v.persona: v for v in vectors}
        )
        self.neuron_sets: Mapping[str, NeuronSet] = (
            dict(neuron_sets)
            if isinstance(neuron_sets, Mapping)
            else {n.label: n for n in neuron_sets}
        )

    # ------------------------------------------------------------------ public API

    def stream(
        self,
        messages: Sequence[Message],
        settings: GenerationSettings = GenerationSettings(),
        *,
        steering: SteeringSpec | None = None,
        ablation: AblationSpec | None = None,
        direction: DirectionSpec | None = None,
        readout: Sequence[str | PersonaVector] = (),
        side_by_side: bool = False,
        stop: threading.Event | None = None,
        handlers: Sequence[Handler] = (),
        cap: CapSpec | None = None,
    ) -> Generator[ChatUpdate, None, None]:
        """Check the request now, then stream ``ChatUpdate``s as the reply grows.

        ``handlers`` are extra hook handlers run after the built ones (for capture in tests and
        research code). Raises ``InterventionError`` here, before generation, on bad input.
        """
        coefficients = [0.0, 1.0] if side_by_side else None
        job = self._prepare(
            messages,
            settings,
            steering,
            ablation,
            direction,
            readout,
            coefficients,
            handlers,
            cap=cap,
        )
        return self._run(job, stop)

    def sweep(
        self,
        messages: Sequence[Message],
        settings: GenerationSettings,
        steering: SteeringSpec,
        strengths: Sequence[float],
        *,
        readout: Sequence[str | PersonaVector] = (),
        stop: threading.Event | None = None,
    ) -> list[ChatUpdate]:
        """One reply per strength multiplier of ``steering``, all in ONE batched generation.

        Row ``i`` is steered with ``strengths[i]`` times the spec's per-layer strengths (0 is the
        unsteered reply); the i-th update holds that row's text, tokens and readout.
        """
        if not strengths:
            raise InterventionError("give at least one strength to sweep")
        job = self._prepare(
            messages, settings, steering, None, None, readout, [float(s) for s in strengths], ()
        )
        for _ in self._run(job, stop):
            pass
        return [
            self._final(job, job.replies, job.stopped, row=row) for row in range(len(strengths))
        ]

    def reply(self, messages: Sequence[Message], *args: Any, **kwargs: Any) -> ChatUpdate:
        """The final ``ChatUpdate`` of ``stream`` (same arguments)."""
        last = None
        for last in self.stream(messages, *args, **kwargs):  # noqa: B007
            pass
        assert last is not None
        return last

    def token_pieces(self, tokens: Sequence[int]) -> list[str]:
        """The text of each token on its own (for per-token displays of a readout)."""
        return [str(self.lm.tokenizer.decode([int(t)])) for t in tokens]

    def prompt_ids(self, messages: Sequence[Message]) -> torch.Tensor:
        """``[1, T]`` token ids of the conversation as ``personachat.prompts.format_chat``
        renders it, ready to reply (the ids extraction reads prompts as)."""
        text = format_chat(self.lm.tokenizer, messages, add_generation_prompt=True)
        ids = encode_text(self.lm.tokenizer, text)
        if not ids:
            raise InterventionError("the conversation is empty; send a message first")
        return torch.tensor([ids], dtype=torch.long)

    # ------------------------------------------------------------------ internals

    def _prepare(
        self,
        messages: Sequence[Message],
        settings: GenerationSettings,
        steering: SteeringSpec | None,
        ablation: AblationSpec | None,
        direction: DirectionSpec | None,
        readout: Sequence[str | PersonaVector],
        coefficients: list[float] | None,
        extra: Sequence[Handler],
        cap: CapSpec | None = None,
    ) -> _Job:
        settings.check()
        ids = self.prompt_ids(messages)
        rows = 1 if coefficients is None else len(coefficients)
        plan = build_plan(
            self.lm,
            self.vectors,
            steering=steering,
            ablation=ablation,
            direction=direction,
            readout=readout,
            neuron_sets=self.neuron_sets,
            prompt_len=ids.shape[1],
            rows=coefficients,
            cap=cap,
        )
        eos = self._eos_ids()
        tokenizer = self.lm.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
        config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            min_new_tokens=settings.min_new_tokens or None,
            do_sample=False,
            num_beams=1,
            repetition_penalty=settings.repetition_penalty,
            eos_token_id=sorted(eos) or None,
            pad_token_id=pad,
        )
        processors = LogitsProcessorList()
        if settings.temperature > 0:
            processors.append(SeededSampler(settings, rows, self.lm.device))
        return _Job(
            input_ids=ids.repeat(rows, 1).to(self.lm.device),
            plan=plan,
            handlers=[*plan.handlers, *extra],
            config=config,
            processors=processors,
            eos=frozenset(eos),
            side_by_side=coefficients is not None and len(coefficients) == 2,
        )

    def _eos_ids(self) -> set[int]:
        found: set[int] = set()
        model_eos = self.lm.model.generation_config.eos_token_id
        for source in (self.lm.tokenizer.eos_token_id, model_eos):
            if isinstance(source, int):
                found.add(source)
            elif isinstance(source, list | tuple):
                found.update(int(s) for s in source)
        return found

    def _generate(self, job: _Job, sink: queue.Queue[Any], events: list[threading.Event]) -> None:
        """Worker body, run inside a copied context: hooks live exactly as long as generate."""
        try:
            with intervene(self.lm.sites, job.handlers):
                self.lm.model.generate(
                    input_ids=job.input_ids,
                    attention_mask=torch.ones_like(job.input_ids),
                    generation_config=job.config,
                    logits_processor=job.processors,
                    stopping_criteria=StoppingCriteriaList([EventStop(events)]),
                    streamer=QueueStreamer(sink),
                )
        except BaseException as err:  # re-raised in the consumer
            sink.put(_Failed(err))
        finally:
            sink.put(_END)

    def _run(self, job: _Job, stop: threading.Event | None) -> Generator[ChatUpdate, None, None]:
        halt = threading.Event()
        sink: queue.Queue[Any] = queue.Queue()
        rows = job.input_ids.shape[0]
        replies: list[list[int]] = [[] for _ in range(rows)]
        job.replies = replies
        finished = [False] * rows
        failure: BaseException | None = None
        context = contextvars.copy_context()
        events = [halt] if stop is None else [halt, stop]
        worker = threading.Thread(
            target=context.run, args=(self._generate, job, sink, events), daemon=True
        )
        worker.start()
        try:
            while True:
                item = sink.get()
                if item is _END:
                    break
                if isinstance(item, _Failed):
                    failure = item.error
                    continue
                for row, token in enumerate(item):
                    if not finished[row]:
                        replies[row].append(int(token))
                        finished[row] = int(token) in job.eos
                yield self._update(job, replies, partial=True)
            if failure is not None:
                raise failure
            job.stopped = stop is not None and stop.is_set()
            yield self._final(job, replies, job.stopped)
        finally:
            halt.set()
            worker.join()

    def _decode(self, tokens: Sequence[int], partial: bool) -> str:
        text = str(self.lm.tokenizer.decode(list(tokens), skip_special_tokens=True))
        if partial:
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 character: wait for the rest
        return text

    def _update(self, job: _Job, replies: list[list[int]], partial: bool) -> ChatUpdate:
        steered = replies[-1]
        base = replies[0] if job.side_by_side else None
        return ChatUpdate(
            text=self._decode(steered, partial),
            tokens=tuple(steered),
            baseline_text=None if base is None else self._decode(base, partial),
            baseline_tokens=None if base is None else tuple(base),
        )

    def _final(
        self, job: _Job, replies: list[list[int]], stopped: bool, row: int | None = None
    ) -> ChatUpdate:
        """The last update: of the steered row and the baseline, or of one ``row`` alone."""
        if row is not None:
            replies = [replies[row]]
        update = self._update(job, replies, partial=False)
        readouts: list[ReplyReadout | None] = [None] * len(replies)
        if job.plan.readout is not None:
            if job.readout_result is None:
                job.readout_result = job.plan.readout.result()
            prompt = job.input_ids[0].tolist()
            rows = [row] if row is not None else list(range(len(replies)))
            for i, r in enumerate(rows):
                readouts[i] = row_readout(job.plan, job.readout_result, r, prompt, replies[i])
        side = job.side_by_side and row is None
        return ChatUpdate(
            text=update.text,
            tokens=update.tokens,
            baseline_text=update.baseline_text if side else None,
            baseline_tokens=update.baseline_tokens if side else None,
            done=True,
            stopped=stopped,
            readout=readouts[-1],
            baseline_readout=readouts[0] if side else None,
            interference=job.plan.interference,
            steered_layers=dict(job.plan.steered_layers),
            warnings=tuple(job.plan.warnings),
        )
