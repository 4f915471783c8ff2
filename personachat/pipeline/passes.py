"""The activations of one extraction, read in as few passes over the model as it needs.

Cells that have a response (the dataset's own, or the cache's) are captured teacher-forced.
Cells without one are answered and captured in the same pass
(``personachat.activations.generate_live``), and their replies cached with the ids generated.
Two other ways stay callable: ``one_pass=False`` generates first (``responses.generate_ids``)
and then captures everything teacher-forced over the generated ids, as extraction used to
(then over the replies' text); ``engine="vllm"`` generates the missing ids with vLLM and
captures teacher-forced over them. ``Phases`` keeps the time of each phase for the summary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from personachat.activations import (
    Capture,
    CaptureSpec,
    Dist,
    GenerationConfig,
    LivePrompt,
    Reply,
    Response,
    Sample,
    build_samples,
    capture_into,
    encode,
    generate_live,
    open_capture,
)
from personachat.model import LoadedModel
from personachat.pipeline.responses import Cell, generate_ids, read_cache, write_cache
from personachat.pipeline.selection import shard_samples
from personachat.pipeline.vllm import check_engine, vllm_replies
from personachat.prompts import PersonaDataset, prompt_spans

log = logging.getLogger(__name__)


# Rows per forward when none is asked for. On a CPU the cost of a decode step per row still
# falls from 96 to 128 rows (README, speed), and 128 rows of a ~100-token prompt keep the
# prefill's largest activation near a quarter GB at a 0.5B model's width; 64 on a GPU.
AUTO_BATCH = {"cpu": 128, "cuda": 64}


def batch_size_for(lm: LoadedModel) -> int:
    """The batch size ``AUTO_BATCH`` gives ``lm``'s device (the CPU's for any other)."""
    return AUTO_BATCH.get(lm.device.type, AUTO_BATCH["cpu"])


@dataclass
class Phases:
    """Seconds spent in each phase of a run, in the order they ran."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class PassOptions:
    """How a run reads its activations (see the module docstring)."""

    generation: GenerationConfig
    batch_size: int
    cache_dir: str | Path | None = None
    max_tokens: int | None = None
    padding_side: str | None = None
    progress: bool = True
    one_pass: bool = True
    engine: str = "transformers"


@dataclass
class _Known:
    """The responses known before capture, the cells to answer while capturing, the cache."""

    data: PersonaDataset
    ids: dict[Cell, tuple[int, ...]]
    live: list[Cell]
    path: Path | None = None


def read_activations(
    lm: LoadedModel,
    data: PersonaDataset,
    kinds: tuple[str, ...],
    spec: CaptureSpec,
    opts: PassOptions,
    dist: Dist,
    phases: Phases,
) -> Capture:
    """This process's share of the capture of every (persona, question) cell of ``data``."""
    check_engine(opts.engine)
    known = _Known(data, {}, [])
    if "response_avg" in kinds:
        known = _responses(lm, data, opts, dist, phases)
    samples = shard_samples(
        lm, known.data, kinds, opts.max_tokens, dist, ids=known.ids, skip=known.live
    )
    if not samples and not known.live:
        raise ValueError("no samples to capture: the dataset selection is empty")
    cap = open_capture(lm, spec, len(data.personas))
    try:
        if samples:
            with phases.phase("capture"):
                _teacher_forced(lm, cap, samples, opts, dist, f"{lm.info.model_id} activations")
        if known.live:
            _live(lm, known, cap, opts, dist, phases)
    except BaseException:
        cap.close()
        raise
    cap.finish()
    return cap


def _teacher_forced(
    lm: LoadedModel,
    cap: Capture,
    samples: Sequence[Sample],
    opts: PassOptions,
    dist: Dist,
    desc: str,
) -> None:
    capture_into(
        cap,
        lm,
        samples,
        batch_size=opts.batch_size,
        side=opts.padding_side,
        progress=opts.progress and dist.is_main,
        desc=desc,
    )


def _responses(
    lm: LoadedModel, data: PersonaDataset, opts: PassOptions, dist: Dist, phases: Phases
) -> _Known:
    """The cache's responses, or the missing ones generated first (``one_pass=False``, vLLM),
    or the cells to answer while capturing."""
    cached = read_cache(lm, data, data.persona_names, opts.generation, opts.cache_dir)
    if not cached.missing or cached.path is None:
        return _Known(cached.dataset, cached.ids, [])
    if opts.one_pass and opts.engine == "transformers":
        return _Known(cached.dataset, cached.ids, cached.missing, cached.path)
    log.info("generating %d responses with %s", len(cached.missing), opts.engine)
    with phases.phase("generation"):
        mine = dist.shard(cached.missing)
        if opts.engine == "vllm":
            prompts = [_prompt_ids(lm, data, cell) for cell in mine]
            made = dict(zip(mine, vllm_replies(lm, prompts, opts.generation), strict=True))
        else:
            progress = opts.progress and dist.is_main
            made = generate_ids(lm, data, mine, opts.generation, progress=progress)
        return _share(data, made, cached.path, dist)


def _prompt_ids(lm: LoadedModel, data: PersonaDataset, cell: Cell) -> list[int]:
    persona, question = cell
    system = data.persona(persona).system_prompt or None
    return prompt_spans(lm.tokenizer, system, question).input_ids


def _share(
    data: PersonaDataset, made: dict[Cell, tuple[str, list[int]]], path: Path, dist: Dist
) -> _Known:
    """Every process's replies (text, ids) gathered; the main process writes the cache."""
    merged: dict[Cell, tuple[str, list[int]]] = {}
    for part in dist.gather(made):
        merged.update(part)
    texts = {cell: text for cell, (text, _) in merged.items()}
    ids = {cell: tuple(ids) for cell, (_, ids) in merged.items() if ids}
    if dist.is_main:
        write_cache(path, texts, ids)
    return _Known(data.with_responses(texts), ids, [], path)


def _live(
    lm: LoadedModel, known: _Known, cap: Capture, opts: PassOptions, dist: Dist, phases: Phases
) -> None:
    """Answer the live cells (this process's share) while capturing them; cache the replies."""
    data = known.data
    names, questions = data.persona_names, list(data.questions)
    prompts = [
        LivePrompt(
            names.index(p),
            questions.index(q),
            encode(lm.tokenizer, data.persona(p).system_prompt, q, None),
        )
        for p, q in dist.shard(known.live)
    ]
    log.info("answering %d prompts while capturing", len(prompts))
    with phases.phase("generation + capture"):
        replies = generate_live(
            lm,
            prompts,
            cap,
            opts.generation,
            batch_size=opts.batch_size,
            max_tokens=opts.max_tokens,
            progress=opts.progress and dist.is_main,
            desc=f"{lm.info.model_id} replies + activations",
        )
    empty = [r for r in replies if not r.ids]  # the first token was an EOS: read "..." instead
    if empty:
        with phases.phase("capture"):
            samples = _fallback(lm, data, empty, cap, opts.max_tokens)
            _teacher_forced(lm, cap, samples, opts, dist, "empty replies")
    made = {(names[r.persona], questions[r.question]): (r.text, list(r.ids)) for r in replies}
    if known.path is not None:
        _share(data, made, known.path, dist)


def _fallback(
    lm: LoadedModel,
    data: PersonaDataset,
    replies: list[Reply],
    cap: Capture,
    max_tokens: int | None,
) -> list[Sample]:
    """Teacher-forced samples of replies that read nothing live: their stored text."""
    convs: list[tuple[int, str, str, Response]] = [
        (r.persona, data.personas[r.persona].system_prompt, data.questions[r.question], r.text)
        for r in replies
    ]
    return build_samples(
        lm.tokenizer, convs, cap.spec.positions, max_tokens=max_tokens, questions=data.questions
    )
