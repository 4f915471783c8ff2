"""Chat replies from interp-engine (``pip install "interp-engine[vllm]"``): many users, many GPUs.

``InterpChatEngine(lm, model, vectors, neuron_sets)`` is a ``ChatEngine`` whose replies come from
an interp-engine model: its vLLM backend (``load_vllm``; tensor parallel over ``num_gpus``), or
its eager transformers backend, which runs on a CPU and is how this path is tested. Requests
are checked and planned by PersonaChat exactly as ``ChatEngine`` plans them (``build_plan``); the
plan is then written as interp-engine steering requests by ``personachat.chat.interp_specs``,
which refuses what the engine cannot express. On vLLM each row is its own request, steered per
request, so co-batched requests from other users are never touched; on the eager backend the
steering hooks act on the whole model, so its requests run one at a time.

Greedy replies equal PersonaChat's own (tested on the demo model and a tiny one); sampled replies
use interp-engine's sampler, seeded with the request's seed, and differ from the hf engine's.
Updates are the same ``ChatUpdate``s, without a readout.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Generator, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from personachat.chat.engine import ChatEngine
from personachat.chat.interp_specs import RowSteering, row_steering
from personachat.chat.job import END, Failed, Job, Request, prepare
from personachat.chat.replies import stream_updates
from personachat.chat.updates import ChatUpdate
from personachat.model import LoadedModel
from personachat.records import NeuronSet, PersonaVector

NO_READOUT = "no per-token readout with --engine vllm; use --engine hf to see one"


@dataclass
class InterpJob(Job):
    """A prepared request with each row's interp-engine steering."""

    rows_steering: list[RowSteering] = field(default_factory=list)


def vllm_problem() -> str | None:
    """Why ``--engine vllm`` cannot run on this machine (no GPU, no vLLM), or None."""
    if not torch.cuda.is_available():
        return "--engine vllm needs a CUDA GPU and this machine has none; use --engine hf"
    try:
        from interp_engine import vllm_installed
    except ImportError:
        vllm_installed = None
    if vllm_installed is None or not vllm_installed():
        return (
            "--engine vllm needs interp-engine with vLLM: pip install 'interp-engine[vllm]' "
            "(or use --engine hf)"
        )
    return None


def load_vllm(lm: LoadedModel, num_gpus: int = 1) -> Any:
    """``lm``'s checkpoint on interp-engine's hooked vLLM backend, sharded over ``num_gpus``
    (``PERSONACHAT_VLLM_MEMORY``: the share of each GPU's memory vLLM may take, default 0.5, so
    the transformers model the page's other tools use fits beside it)."""
    problem = vllm_problem()
    if problem is not None:
        raise RuntimeError(problem)
    from interp_engine import load_model

    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    share = float(os.environ.get("PERSONACHAT_VLLM_MEMORY", "0.5"))
    name = str(getattr(lm.model, "name_or_path", "") or lm.info.model_id)
    return load_model(
        name, backend="vllm", num_gpus=num_gpus, dtype=dtype, gpu_memory_utilization=share
    )


def eager_model(lm: LoadedModel) -> Any:
    """interp-engine's eager backend over ``lm``'s own model and tokenizer (no second copy)."""
    from interp_engine import EagerModel, RecommendedSampling

    model = EagerModel(str(lm.info.model_id), hf_model=lm.model, tokenizer=lm.tokenizer)
    # every sampling setting comes with the request, so the checkpoint's recommendation (which
    # the engine would look up by id, on the hub for a name that is no folder) is never needed
    model._recommended_sampling = RecommendedSampling()
    return model


class InterpChatEngine(ChatEngine):
    """A ``ChatEngine`` whose replies come from an interp-engine model (see the module)."""

    reads_out = False

    def __init__(
        self,
        lm: LoadedModel,
        model: Any,
        vectors: Mapping[str, PersonaVector] | Iterable[PersonaVector] = (),
        neuron_sets: Mapping[str, NeuronSet] | Iterable[NeuronSet] = (),
    ) -> None:
        super().__init__(lm, vectors, neuron_sets)
        self.model = model
        from interp_engine import EagerModel

        # eager steering hooks act on every forward of the model: one request at a time
        self._lock = threading.Lock() if isinstance(model, EagerModel) else None

    def _prepare(self, request: Request, coefficients: list[float] | None) -> Job:
        job = prepare(self.lm, self.vectors, self.neuron_sets, request, coefficients)
        rows = row_steering(request, job)  # raises what the engine cannot express
        job.plan.warnings.append(NO_READOUT)
        return InterpJob(**vars(job), rows_steering=rows)

    def _run(self, job: Job, stop: threading.Event | None) -> Generator[ChatUpdate, None, None]:
        assert isinstance(job, InterpJob)
        halt = threading.Event()
        sink: queue.Queue[Any] = queue.Queue()
        events = [halt] if stop is None else [halt, stop]
        worker = threading.Thread(target=self._steps, args=(job, sink, events), daemon=True)
        yield from stream_updates(
            self.lm.tokenizer, job, sink, stop, halt, worker.start, worker.join
        )

    def _steps(
        self, job: InterpJob, sink: queue.Queue[Any], events: Sequence[threading.Event]
    ) -> None:
        """Run every row as its own request; put one token per row per step on ``sink`` (a row
        that ended is fed an end-of-sequence id, which the reader ignores after its own), then
        ``END``."""
        outs: list[queue.Queue[Any]] = [queue.Queue() for _ in range(job.rows)]
        threads = [
            threading.Thread(target=self._row, args=(job, r, outs[r], events), daemon=True)
            for r in range(job.rows)
        ]
        for thread in threads:
            thread.start()
        filler = min(job.eos, default=0)
        last = [filler] * job.rows
        live = [True] * job.rows
        try:
            while any(live):
                step = []
                for r, out in enumerate(outs):
                    item: Any = out.get() if live[r] else END
                    if isinstance(item, Failed):
                        sink.put(item)
                        return
                    if item is END:
                        live[r], last[r] = False, filler
                    else:
                        last[r] = int(item)
                    step.append(last[r])
                if any(live):
                    sink.put(step)
        finally:
            for event in events[:1]:
                event.set()  # the rows stop at their next token
            sink.put(END)

    def _row(
        self, job: InterpJob, row: int, out: queue.Queue[Any], events: Sequence[threading.Event]
    ) -> None:
        from interp_engine import generate_stream, steer

        asked = job.rows_steering[row]
        ids = job.input_ids[row : row + 1].cpu()
        settings = job.settings
        try:
            with ExitStack() as stack:
                if self._lock is not None:
                    stack.enter_context(self._lock)
                if asked.spec is not None:
                    stack.enter_context(
                        steer(
                            self.model,
                            asked.spec,
                            prompt_token_ids=ids,
                            position_mask=asked.position_mask,
                            generated=asked.generated,
                        )
                    )
                steps = generate_stream(
                    self.model,
                    ids,
                    max_tokens=settings.max_new_tokens,
                    temperature=settings.temperature,
                    top_k=0,
                    top_p=settings.top_p,
                    presence_penalty=0.0,
                    seed=settings.seed,
                )
                for step in steps:
                    out.put(int(step.token_id))
                    if int(step.token_id) in job.eos or any(e.is_set() for e in events):
                        break
        except BaseException as err:  # handed to the reader
            out.put(Failed(err))
        finally:
            out.put(END)
