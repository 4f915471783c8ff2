"""One chat request, checked and built before anything runs, and its run through ``generate``.

``prepare`` turns a request (messages, settings, specs) into a ``Job``: the prompt's token ids
(one row, or one per coefficient side by side), the plan of handlers (``build_plan``, which
raises ``InterventionError`` before the model is touched), the ``GenerationConfig`` and the
seeded sampler. ``run_generate`` is the worker body of a request run alone: ``generate`` under
``intervene``, each step's tokens pushed to a queue; the scheduler runs the same ``Job`` as rows
of a shared batch instead. ``StopCheck`` ends a forward between layers once a stop is asked for,
so a long prompt stops without running to its last layer (in both).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from personachat.chat.generation import EventStop, GenerationSettings, QueueStreamer, SeededSampler
from personachat.hooks import Handler, Site, StopForward, intervene
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
class Failed:
    """A worker's error, handed to the consumer to re-raise."""

    error: BaseException


END = object()  # the last item a worker puts on a request's queue


@dataclass
class Job:
    """Everything one generation needs, built and checked before the worker starts."""

    input_ids: torch.Tensor
    plan: Plan
    extras: tuple[Handler, ...]
    config: GenerationConfig
    processors: LogitsProcessorList
    eos: frozenset[int]
    side_by_side: bool
    settings: GenerationSettings = GenerationSettings()
    replies: list[list[int]] = field(default_factory=list)
    stopped: bool = False
    readout_result: torch.Tensor | None = None

    @property
    def handlers(self) -> list[Handler]:
        """The plan's handlers, then the extra ones, in hook order."""
        return [*self.plan.handlers, *self.extras]

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def prompt_len(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass(frozen=True)
class Request:
    """What a chat request asks for, as ``ChatEngine.stream`` takes it."""

    messages: Sequence[Message]
    settings: GenerationSettings
    steering: SteeringSpec | None = None
    ablation: AblationSpec | None = None
    direction: DirectionSpec | None = None
    readout: Sequence[str | PersonaVector] = ()
    extras: Sequence[Handler] = ()
    cap: CapSpec | None = None


def prompt_ids(lm: LoadedModel, messages: Sequence[Message]) -> torch.Tensor:
    """``[1, T]`` token ids of the conversation as ``personachat.prompts.format_chat``
    renders it, ready to reply (the ids extraction reads prompts as)."""
    text = format_chat(lm.tokenizer, messages, add_generation_prompt=True)
    ids = encode_text(lm.tokenizer, text)
    if not ids:
        raise InterventionError("the conversation is empty; send a message first")
    return torch.tensor([ids], dtype=torch.long)


def eos_ids(lm: LoadedModel) -> set[int]:
    """The tokenizer's and the model's end-of-sequence ids."""
    found: set[int] = set()
    model_eos = lm.model.generation_config.eos_token_id
    for source in (lm.tokenizer.eos_token_id, model_eos):
        if isinstance(source, int):
            found.add(source)
        elif isinstance(source, list | tuple):
            found.update(int(s) for s in source)
    return found


def prepare(
    lm: LoadedModel,
    vectors: Mapping[str, PersonaVector],
    neuron_sets: Mapping[str, NeuronSet],
    request: Request,
    coefficients: list[float] | None,
) -> Job:
    """Check ``request`` against ``lm`` and build its job (raises before the model is touched)."""
    settings = request.settings
    settings.check()
    ids = prompt_ids(lm, request.messages)
    rows = 1 if coefficients is None else len(coefficients)
    plan = build_plan(
        lm,
        vectors,
        steering=request.steering,
        ablation=request.ablation,
        direction=request.direction,
        readout=request.readout,
        neuron_sets=neuron_sets,
        prompt_len=ids.shape[1],
        rows=coefficients,
        cap=request.cap,
    )
    eos = eos_ids(lm)
    tokenizer = lm.tokenizer
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
        processors.append(SeededSampler(settings, rows, lm.device))
    return Job(
        input_ids=ids.repeat(rows, 1).to(lm.device),
        plan=plan,
        extras=tuple(request.extras),
        config=config,
        processors=processors,
        eos=frozenset(eos),
        side_by_side=coefficients is not None and len(coefficients) == 2,
        settings=settings,
    )


class StopCheck:
    """A handler at every layer's residual output that ends the first forward it sees (the
    prompt's) with ``StopForward`` once any of ``events`` is set: a long prompt stops between
    layers, not after its last one. Past that forward's last layer it stands aside: a decode
    step is one token, and stops are seen between tokens (``EventStop``, the shared batch's
    steps), so every path ends a reply at the same token."""

    def __init__(self, n_layers: int, events: Sequence[threading.Event]) -> None:
        self.n_layers = n_layers
        self.events = list(events)
        self.prompt_ran = False

    def wants(self) -> list[tuple[Site, int]]:
        return [("residual", layer) for layer in range(self.n_layers)]

    def asked(self) -> bool:
        return any(event.is_set() for event in self.events)

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> None:
        if self.prompt_ran:
            return
        if self.asked():
            raise StopForward
        self.prompt_ran = layer == self.n_layers - 1


def run_generate(
    lm: LoadedModel, job: Job, sink: queue.Queue[Any], events: Sequence[threading.Event]
) -> None:
    """Worker body of a request run alone: hooks live exactly as long as ``generate``; each
    step's tokens go to ``sink``, then ``Failed`` on an error, then ``END``. A stop (any of
    ``events``) is seen between tokens (``EventStop``) and, while the prompt runs, at the next
    layer (``StopCheck``): the prompt's forward then ends there and no token comes of it. The
    check stays attached through the decode steps, standing aside: one Python call per layer
    and step that returns at once."""
    check = StopCheck(lm.info.n_layers, events)
    try:
        with intervene(lm.sites, [*job.handlers, check]):
            lm.model.generate(
                input_ids=job.input_ids,
                attention_mask=torch.ones_like(job.input_ids),
                generation_config=job.config,
                logits_processor=job.processors,
                stopping_criteria=StoppingCriteriaList([EventStop(events)]),
                streamer=QueueStreamer(sink),
            )
    except StopForward as err:  # a stop inside a forward ends it cleanly; else it failed
        if not check.asked():
            sink.put(Failed(err))
    except BaseException as err:  # re-raised in the consumer
        sink.put(Failed(err))
    finally:
        sink.put(END)
