"""One request inside the scheduler: its prefill alone, then its rows' state step by step.

A ``Running`` request holds what its rows need in a shared batch: the tokens to feed next and
their position, which rows have ended, the logits processors ``generate`` would use for it (none:
plain argmax), the effects of its plan on each row at generated tokens (stacked with the other
rows' by ``personachat.interventions.shared``), the token its extra handlers are attached under,
and its readout so far. ``prepare`` builds those before the request is queued; ``prefill`` runs
the prompt alone (no padding, in the reader's thread), under the request's own plan exactly as
a lone ``generate`` does, and picks the first token of each row. A stop asked for while the
prompt runs ends it at the next layer (``StopCheck``): no token is picked then.
"""

from __future__ import annotations

import queue
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
)

from personachat.chat.job import END, Failed, Job, StopCheck
from personachat.hooks import StopForward, attached, intervene
from personachat.interventions.shared import RowEffects, row_effects
from personachat.model import LoadedModel


def generate_processors(lm: LoadedModel, job: Job) -> LogitsProcessorList:
    """The logits processors ``generate`` runs for ``job``, built by transformers' own builder
    the way ``generate`` calls it (the model's generation defaults merged in, lengths set from
    the prompt), with the job's own (the seeded sampler) last. Empty for plain greedy decoding.
    """
    model = lm.model
    config, _ = model._prepare_generation_config(job.config)
    model._prepare_special_tokens(config, True, device=job.input_ids.device, batch_size=job.rows)
    config = model._prepare_generated_length(
        generation_config=config,
        has_default_max_length=True,
        has_default_min_length=True,
        model_input_name="input_ids",
        input_ids_length=job.prompt_len,
        inputs_tensor=job.input_ids,
    )
    processors: LogitsProcessorList = model._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=job.prompt_len,
        encoder_input_ids=job.input_ids,
        logits_processor=job.processors,
        device=job.input_ids.device,
        model_kwargs={},
    )
    return processors


def eos_floor(processors: LogitsProcessorList, prompt_len: int) -> tuple[int, list[int]] | None:
    """When all ``processors`` do is keep end-of-sequence out until a length: the number of
    tokens generated before it may come, and its ids (the scheduler then does it for all rows
    in one op); else None."""
    floors = (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor)
    if not processors or not all(type(p) in floors for p in processors):
        return None
    floor, ids = 0, set[int]()
    for p in processors:
        if isinstance(p, MinNewTokensLengthLogitsProcessor):
            floor = max(floor, p.prompt_length_to_skip + p.min_new_tokens - prompt_len)
        else:
            floor = max(floor, p.min_length - prompt_len)
        ids.update(int(i) for i in torch.as_tensor(p.eos_token_id).flatten().tolist())
    return floor, sorted(ids)


@dataclass(eq=False)
class Running:
    """A request from submission to its last token (see the module docstring)."""

    job: Job
    stop: threading.Event | None
    halt: threading.Event = field(default_factory=threading.Event)
    sink: queue.Queue[Any] = field(default_factory=queue.Queue)
    released: threading.Event = field(default_factory=threading.Event)
    processors: LogitsProcessorList | None = None
    floor: int = 0  # tokens to generate before end-of-sequence may come (when no processors)
    floor_ids: list[int] = field(default_factory=list)
    effects: list[RowEffects] = field(default_factory=list)
    seen: torch.Tensor | None = None  # [rows, tokens] prompt + reply, for the processors
    last: list[int] = field(default_factory=list)  # per row: the token to feed next
    ended: list[bool] = field(default_factory=list)  # per row: end-of-sequence seen
    generated: int = 0
    readout: list[list[torch.Tensor]] = field(default_factory=list)  # per row: its parts
    token: object | None = None  # the extras' attachment token, while in the batch
    cache: DynamicCache | None = None  # the prompt's KV cache, until it joins the batch's
    hooks: ExitStack = field(default_factory=ExitStack)

    @property
    def rows(self) -> int:
        return self.job.rows

    @property
    def position(self) -> int:
        """The position of the tokens fed next (the same in every row)."""
        return self.job.prompt_len + self.generated - 1

    @property
    def asked_to_stop(self) -> bool:
        return self.halt.is_set() or (self.stop is not None and self.stop.is_set())

    @property
    def done(self) -> bool:
        finished = all(self.ended) or self.generated >= self.job.settings.max_new_tokens
        return finished or self.asked_to_stop

    def prepare(self, lm: LoadedModel) -> None:
        """Build what the steps need (logits processors, each row's effects); run in the
        reader's thread before the request is queued, so the worker does not wait on it."""
        job = self.job
        processors = generate_processors(lm, job)
        floor = eos_floor(processors, job.prompt_len)
        if floor is not None:
            (self.floor, self.floor_ids), processors = floor, LogitsProcessorList()
        self.processors = processors or None
        self.seen = job.input_ids if self.processors is not None else None
        self.ended = [False] * job.rows
        self.effects = [row_effects(job.plan, row) for row in range(job.rows)]
        self.readout = [[] for _ in range(job.rows)]

    def prefill(self, lm: LoadedModel, logits_to_keep: bool) -> None:
        """Run the prompt alone under the request's own handlers; pick and send the first
        tokens; keep the prompt's cache; attach the extra handlers for the shared steps."""
        job = self.job
        ids = job.input_ids
        positions = torch.arange(job.prompt_len, device=ids.device).expand(job.rows, -1)
        cache = DynamicCache(config=lm.model.config)
        extra: dict[str, Any] = {"logits_to_keep": 1} if logits_to_keep else {}
        events = [self.halt] + ([self.stop] if self.stop is not None else [])
        check = StopCheck(lm.info.n_layers, events)
        try:
            with intervene(lm.sites, [*job.handlers, check]):
                out = lm.model(
                    input_ids=ids, position_ids=positions, cache=cache, use_cache=True, **extra
                )
        except StopForward:  # asked to stop while the prompt ran: no token, nothing kept
            return
        scores = self.process(out.logits[:, -1].to(copy=True, dtype=torch.float32))
        self.advance(scores.argmax(dim=-1).tolist())
        if job.plan.readout is not None:
            self.add_readout(list(job.plan.readout.result()))
        self.cache = cache
        if job.extras and not self.done:
            self.token = self.hooks.enter_context(attached(lm.sites, list(job.extras)))

    def process(self, scores: torch.Tensor) -> torch.Tensor:
        """This request's rows of a step's float32 logits, through its logits processors."""
        if self.floored:
            scores[:, self.floor_ids] = float("-inf")
        if self.processors is None or self.seen is None:
            return scores
        return self.processors(self.seen, scores)  # type: ignore[arg-type]

    @property
    def floored(self) -> bool:
        """Whether end-of-sequence is still kept out of the next token."""
        return self.generated < self.floor

    def advance(self, picks: list[int]) -> None:
        """Take each row's pick (the pad token once a row has ended, as ``generate`` does),
        send them to the reader, and note which rows ended."""
        pad = int(self.job.config.pad_token_id)
        tokens = [pad if ended else pick for pick, ended in zip(picks, self.ended, strict=True)]
        self.generated += 1
        self.last = tokens
        self.ended = [e or t in self.job.eos for e, t in zip(self.ended, tokens, strict=True)]
        if self.seen is not None:
            column = torch.tensor(tokens, dtype=self.seen.dtype, device=self.seen.device)
            self.seen = torch.cat([self.seen, column[:, None]], dim=1)
        self.sink.put(tokens)

    def add_readout(self, parts: list[torch.Tensor | None]) -> None:
        """Append each row's ``[tokens, layers, vectors]`` projections (None: none this time)."""
        for row, part in enumerate(parts):
            if part is not None and part.shape[0]:
                self.readout[row].append(part)

    def finish(self, error: BaseException | None = None) -> None:
        """Hand the reader its readout (or the error) and the end; detach the extra handlers."""
        try:
            self.hooks.close()
            if error is not None:
                self.sink.put(Failed(error))
            elif self.job.plan.readout is not None and self.readout and all(self.readout):
                self.job.readout_result = self._readout_result()
        except BaseException as err:  # the reader gets it
            self.sink.put(Failed(err))
        finally:
            self.sink.put(END)
            self.released.set()

    def _readout_result(self) -> torch.Tensor:
        rows = [torch.cat(parts) for parts in self.readout]
        n = min(r.shape[0] for r in rows)
        return torch.stack([r[:n] for r in rows])
