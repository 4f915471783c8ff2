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
generation after the current token (a prompt still running ends at its next layer). Every hook
is removed before the iterator finishes, also when a hook raises (the error is re-raised to the
consumer).

Many sessions: by default each request runs its own ``generate`` in its own thread. Given a
``Scheduler`` (``ChatEngine(lm, vectors, scheduler=Scheduler(lm))``; engines over one model may
share one), requests run instead as rows of shared batched forwards, each row with its own
interventions; the updates are the same (``personachat.chat.scheduler``). A scheduled request
runs its own interventions only: an ``intervene`` block around the call does not reach it (on a
shared forward it would act on other sessions' rows).
"""

from __future__ import annotations

import contextvars
import copy
import queue
import threading
from collections.abc import Generator, Iterable, Mapping, Sequence
from typing import Any

import torch

from personachat.chat.generation import GenerationSettings
from personachat.chat.job import Job, Request, prepare, prompt_ids, run_generate
from personachat.chat.replies import final_update, stream_updates
from personachat.chat.scheduler import Scheduler
from personachat.chat.updates import ChatUpdate
from personachat.hooks import Handler
from personachat.interventions import (
    AblationSpec,
    CapSpec,
    DirectionSpec,
    InterventionError,
    SteeringSpec,
)
from personachat.model import LoadedModel
from personachat.prompts import Message
from personachat.records import NeuronSet, PersonaVector

_Job = Job  # the prepared request (``personachat.chat.job``), under its old name


class ChatEngine:
    """Chat with a loaded model under steering, ablation and readout, one request at a time each.

    ``vectors`` (persona name -> ``PersonaVector``) and ``neuron_sets`` (label -> ``NeuronSet``)
    are the catalog requests name; they are copied and never changed. All settings come per
    call, so one engine serves many sessions and threads. ``scheduler`` (for ``lm``) runs the
    requests of all sessions as rows of shared batches instead of one ``generate`` each.
    """

    reads_out = True  # whether replies can carry the per-token readout

    def __init__(
        self,
        lm: LoadedModel,
        vectors: Mapping[str, PersonaVector] | Iterable[PersonaVector] = (),
        neuron_sets: Mapping[str, NeuronSet] | Iterable[NeuronSet] = (),
        scheduler: Scheduler | None = None,
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
        if scheduler is not None and scheduler.lm is not lm:
            raise ValueError(
                f"the scheduler serves {scheduler.lm.info.model_id!r}, not this engine's "
                f"{lm.info.model_id!r}; give each loaded model its own Scheduler"
            )
        self.scheduler = scheduler

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
        request = Request(messages, settings, steering, ablation, direction, readout, handlers, cap)
        return self._run(self._prepare(request, coefficients), stop)

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
        request = Request(messages, settings, steering, readout=readout)
        job = self._prepare(request, [float(s) for s in strengths])
        for _ in self._run(job, stop):
            pass
        tokenizer = self.lm.tokenizer
        return [
            final_update(tokenizer, job, job.replies, job.stopped, row=row)
            for row in range(len(strengths))
        ]

    def reply(self, messages: Sequence[Message], *args: Any, **kwargs: Any) -> ChatUpdate:
        """The final ``ChatUpdate`` of ``stream`` (same arguments)."""
        last = None
        for last in self.stream(messages, *args, **kwargs):  # noqa: B007
            pass
        assert last is not None
        return last

    def with_vectors(self, extra: Mapping[str, PersonaVector]) -> ChatEngine:
        """This engine (same model, sets and scheduler) with ``extra`` vectors added by name."""
        other = copy.copy(self)
        other.vectors = {**self.vectors, **extra}
        return other

    def token_pieces(self, tokens: Sequence[int]) -> list[str]:
        """The text of each token on its own (for per-token displays of a readout)."""
        return [str(self.lm.tokenizer.decode([int(t)])) for t in tokens]

    def prompt_ids(self, messages: Sequence[Message]) -> torch.Tensor:
        """``[1, T]`` token ids of the conversation under the chat template, ready to reply."""
        return prompt_ids(self.lm, messages)

    # ------------------------------------------------------------------ internals

    def _prepare(self, request: Request, coefficients: list[float] | None) -> Job:
        return prepare(self.lm, self.vectors, self.neuron_sets, request, coefficients)

    def _run(self, job: Job, stop: threading.Event | None) -> Generator[ChatUpdate, None, None]:
        """The updates of ``job``: through the scheduler, or a ``generate`` thread of its own
        whose target runs in a copy of this context (so the hooks act for this request)."""
        if self.scheduler is not None:
            yield from self.scheduler.submit(job, stop)
            return
        halt = threading.Event()
        sink: queue.Queue[Any] = queue.Queue()
        events = [halt] if stop is None else [halt, stop]
        worker = threading.Thread(
            target=contextvars.copy_context().run,
            args=(run_generate, self.lm, job, sink, events),
            daemon=True,
        )
        yield from stream_updates(
            self.lm.tokenizer, job, sink, stop, halt, worker.start, worker.join
        )
