"""Batched, padding-aware, teacher-forced capture of pooled activations, accumulated as sums.

Each sample is one (persona, question, response) conversation, tokenized once with the spans of
every position kind (``personachat.records.POSITIONS``):

- ``response_avg``: the response tokens (teacher-forced);
- ``prompt_last``: the last prompt token (the end of the assistant header);
- ``prompt_avg``: every prompt token (system turn, user turn, assistant header);
- ``question_span``: the user turn plus the assistant header.

A forward pass runs the *base* model (``sites.base``: no LM head) through
``personachat.hooks.intervene`` and stops after the last layer needed (``StopForward``). The
handler pools each position's span per sample ([B, D] per layer) and, once per batch, adds the
pooled vectors into per-persona float64 sums on the CPU, so memory does not grow with the number
of samples. Per-sample pooled vectors (needed later for AUC) are appended to a file in a
temporary folder, read back in chunks by ``Capture.iter_pooled``.

Padding: position ids are passed explicitly (``cumsum(mask) - 1``), so left and right padding
give the same numbers as batch size 1. Multi-process runs shard samples with ``Dist`` and sum
the accumulators across processes (``torch.distributed``, gloo on CPU).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from personachat.hooks import Site, StopForward, intervene
from personachat.model import LoadedModel
from personachat.prompts import format_chat, persona_messages
from personachat.records import POSITIONS

log = logging.getLogger(__name__)

Span = tuple[int, int]


@dataclass(frozen=True)
class Sample:
    """One tokenized conversation: its persona index, token ids and one span per position."""

    persona: int
    ids: tuple[int, ...]
    spans: tuple[Span, ...]
    n_prompt: int


@dataclass(frozen=True)
class Encoded:
    """A conversation's token ids and the span of each position kind, in ``POSITIONS`` terms."""

    ids: list[int]
    n_prompt: int
    user_start: int

    def span(self, position: str) -> Span:
        n, p = len(self.ids), self.n_prompt
        spans = {
            "response_avg": (p, n),
            "prompt_last": (p - 1, p),
            "prompt_avg": (0, p),
            "question_span": (self.user_start, p),
        }
        if position not in spans:
            raise ValueError(f"unknown position {position!r}; use one of {POSITIONS}")
        return spans[position]


_HEADERS: dict[tuple[int, str], str] = {}


def _user_header(tokenizer: PreTrainedTokenizerBase) -> str:
    """The text a chat template puts before a user message's content (``<|im_start|>user\\n``)."""
    key = (id(tokenizer), str(getattr(tokenizer, "chat_template", "")))
    if key not in _HEADERS:
        probe = [{"role": "system", "content": "S"}]
        try:
            ref = format_chat(tokenizer, [*probe, {"role": "user", "content": "Q?"}])
            prefix = format_chat(tokenizer, probe, add_generation_prompt=False)
            at = ref.rfind("Q?")
            _HEADERS[key] = ref[len(prefix) : at] if ref.startswith(prefix) and at > 0 else ""
        except Exception:  # a template that rejects system turns
            _HEADERS[key] = ""
    return _HEADERS[key]


def _user_turn_start(
    tokenizer: PreTrainedTokenizerBase, system: str, question: str, prompt: str
) -> int:
    """Character offset where the user turn (its role header included) starts in ``prompt``."""
    if system:
        try:
            prefix = format_chat(
                tokenizer, [{"role": "system", "content": system}], add_generation_prompt=False
            )
        except Exception:  # a template that rejects a lone system turn
            prefix = ""
        if prefix and prompt.startswith(prefix):
            return len(prefix)
    # No system turn (or a template that folds it in): find the question, step back over the
    # user header.
    header = _user_header(tokenizer)
    at = prompt.rfind(question)
    if at < 0:
        return 0
    if header and prompt[:at].endswith(header):
        return at - len(header)
    return at


def encode(
    tokenizer: PreTrainedTokenizerBase, system: str, question: str, response: str | None
) -> Encoded:
    """Tokenize ``system`` + ``question`` (+ ``response``) with the chat template, with spans."""
    prompt = format_chat(tokenizer, persona_messages(system, question), add_generation_prompt=True)
    text = prompt + (response or "")
    user_char = _user_turn_start(tokenizer, system, question, prompt)
    special = not bool(getattr(tokenizer, "chat_template", None))
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        ends = [end for _, end in enc["offset_mapping"]]
        n_prompt = next((i for i, end in enumerate(ends) if end > len(prompt)), len(ids))
        user_start = next((i for i, end in enumerate(ends) if end > user_char), 0)
    else:
        ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
        n_prompt = len(tokenizer(prompt, add_special_tokens=special)["input_ids"])
        user_start = len(tokenizer(prompt[:user_char], add_special_tokens=special)["input_ids"])
    return Encoded(ids=ids, n_prompt=max(1, n_prompt), user_start=min(user_start, n_prompt - 1))


def build_samples(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Iterable[tuple[int, str, str, str | None]],
    positions: Sequence[str],
    *,
    max_tokens: int | None = None,
) -> list[Sample]:
    """Samples from ``(persona index, system prompt, question, response)`` tuples.

    With a response, ``response_avg`` needs at least one response token; a response that
    tokenizes to nothing raises. ``max_tokens`` truncates long responses (never the prompt).
    """
    out = []
    for persona, system, question, response in conversations:
        enc = encode(tokenizer, system, question, response)
        ids = enc.ids if max_tokens is None else enc.ids[: max(max_tokens, enc.n_prompt + 1)]
        enc = Encoded(ids=ids, n_prompt=enc.n_prompt, user_start=enc.user_start)
        spans = tuple(enc.span(p) for p in positions)
        for pos, (start, end) in zip(positions, spans, strict=True):
            if end <= start:
                raise ValueError(
                    f"position {pos!r} is empty for question {question!r:.60} (response "
                    f"{response!r:.40}); the response needs at least one token"
                )
        out.append(Sample(persona=persona, ids=tuple(ids), spans=spans, n_prompt=enc.n_prompt))
    return out


@dataclass(frozen=True)
class Batch:
    """Padded tensors of a batch plus each sample's offset (left padding shifts spans)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    offsets: list[int]


def pad_batch(
    samples: Sequence[Sample], pad_id: int, side: Literal["left", "right"], device: torch.device
) -> Batch:
    width = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    pos = torch.zeros((len(samples), width), dtype=torch.long)
    offsets = []
    for b, s in enumerate(samples):
        n = len(s.ids)
        start = width - n if side == "left" else 0
        ids[b, start : start + n] = torch.tensor(s.ids)
        mask[b, start : start + n] = 1
        pos[b, start : start + n] = torch.arange(n)
        offsets.append(start)
    return Batch(ids.to(device), mask.to(device), pos.to(device), offsets)


def span_weights(samples: Sequence[Sample], batch: Batch, n_positions: int) -> torch.Tensor:
    """[n_positions, B, T] averaging weights (1/len over each span, 0 elsewhere)."""
    width = batch.input_ids.shape[1]
    w = torch.zeros((n_positions, len(samples), width), dtype=torch.float32)
    for b, (s, off) in enumerate(zip(samples, batch.offsets, strict=True)):
        for p, (start, end) in enumerate(s.spans):
            w[p, b, off + start : off + end] = 1.0 / (end - start)
    return w.to(batch.input_ids.device)


@dataclass(frozen=True)
class CaptureSpec:
    """What to capture: a site at some layers, pooled over some positions."""

    layers: tuple[int, ...]
    positions: tuple[str, ...] = ("response_avg",)
    site: Site = "residual"
    spill: bool = True  # keep per-sample pooled vectors on disk (for AUC)
    squares: bool = False  # accumulate per-persona sums of squares (for standardized effects)


class _PoolHandler:
    """Pools each position span at each wanted layer per batch; stops after the last layer."""

    def __init__(self, spec: CaptureSpec) -> None:
        self.spec = spec
        self.slot = {layer: i for i, layer in enumerate(spec.layers)}
        self.last = max(spec.layers)
        self.weights: torch.Tensor | None = None
        self.pooled: list[torch.Tensor | None] = []
        self.norms: list[torch.Tensor | None] = []

    def start(self, weights: torch.Tensor) -> None:
        self.weights = weights
        self.pooled = [None] * len(self.spec.layers)
        self.norms = [None] * len(self.spec.layers)

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [(self.spec.site, layer) for layer in self.spec.layers]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        assert self.weights is not None, "start() a batch before the forward pass"
        w = self.weights.to(x.device)
        xf = x.detach().float()
        i = self.slot[layer]
        self.pooled[i] = torch.einsum("pbt,btd->pbd", w, xf)
        self.norms[i] = torch.einsum("pbt,bt->pb", w, xf.norm(dim=-1))
        if layer == self.last:
            raise StopForward
        return None

    def collect(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, n_pos, L, D] pooled vectors and [B, n_pos, L] mean token norms, on the CPU."""
        if any(p is None for p in self.pooled):
            missing = [la for la, p in zip(self.spec.layers, self.pooled, strict=True) if p is None]
            raise RuntimeError(f"the forward pass never reached layers {missing}")
        pooled = torch.stack([p for p in self.pooled if p is not None], dim=2)  # [P, B, L, D]
        norms = torch.stack([n for n in self.norms if n is not None], dim=2)  # [P, B, L]
        return pooled.permute(1, 0, 2, 3).cpu(), norms.permute(1, 0, 2).cpu()


@dataclass(frozen=True)
class Dist:
    """This process's place in a multi-process run (``accelerate launch``/``torchrun``)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Dist:
        """Single process unless ``WORLD_SIZE`` > 1; then joins the process group (gloo on CPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as tdist

        if not tdist.is_initialized():
            from accelerate import PartialState

            PartialState()  # initialises the default process group from the launcher's env
        return cls(rank=tdist.get_rank(), world=tdist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[Any]) -> list[Any]:
        return list(items[self.rank :: self.world])

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over all processes (same shape on every process)."""
        if self.world == 1:
            return tensor
        import torch.distributed as tdist

        work = tensor.cuda() if tdist.get_backend() == "nccl" else tensor.clone()
        tdist.all_reduce(work)
        return work.to(tensor.device)

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` from every process, in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as tdist

        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as tdist

            tdist.barrier()


@dataclass(eq=False)
class Capture:
    """Per-persona sums of pooled activations ([n_pos, P, L, D], float64) and per-sample spill."""

    spec: CaptureSpec
    sums: torch.Tensor
    norm_sums: torch.Tensor  # [n_pos, P, L] sums over samples of the mean token norm
    counts: torch.Tensor  # [P] samples per persona
    sq_sums: torch.Tensor | None = None
    sample_personas: list[int] = field(default_factory=list)
    spill_path: Path | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def n_positions(self) -> int:
        return len(self.spec.positions)

    def means(self) -> torch.Tensor:
        """[n_pos, P, L, D] per-persona means (float64); NaN-free (zero where no samples)."""
        return self.sums / self.counts.clamp(min=1).to(self.sums.dtype)[None, :, None, None]

    def reduce(self, dist: Dist) -> None:
        """Sum the accumulators over processes (the spill stays per process)."""
        self.sums = dist.all_reduce(self.sums)
        self.norm_sums = dist.all_reduce(self.norm_sums)
        self.counts = dist.all_reduce(self.counts)
        if self.sq_sums is not None:
            self.sq_sums = dist.all_reduce(self.sq_sums)

    def iter_pooled(self, chunk: int = 256) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(persona indices [n], pooled [n, n_pos, L, D] float32) in chunks of ``chunk`` samples."""
        if self.spill_path is None:
            raise RuntimeError("this capture kept no per-sample vectors (spill=False)")
        row = self.n_positions * self.sums.shape[2] * self.sums.shape[3]
        personas = np.asarray(self.sample_personas, dtype=np.int64)
        with open(self.spill_path, "rb") as f:
            for start in range(0, len(personas), chunk):
                n = min(chunk, len(personas) - start)
                flat = np.fromfile(f, dtype=np.float32, count=n * row)
                block = torch.from_numpy(flat).view(n, self.n_positions, *self.sums.shape[2:])
                yield personas[start : start + n], block

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_forward(lm: LoadedModel, batch: Batch) -> Any:
    """Run the base model (no LM head) on ``batch``; a handler's ``StopForward`` ends it early."""
    try:
        return lm.sites.base(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
    except StopForward:
        return None


def padding_side(lm: LoadedModel, side: str | None) -> Literal["left", "right"]:
    chosen = side or getattr(lm.tokenizer, "padding_side", "right") or "right"
    if chosen not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {chosen!r}")
    return "left" if chosen == "left" else "right"


def capture(
    lm: LoadedModel,
    samples: Sequence[Sample],
    spec: CaptureSpec,
    n_personas: int,
    *,
    batch_size: int = 8,
    side: str | None = None,
    progress: bool = True,
    desc: str = "activations",
    spill_dir: str | Path | None = None,
) -> Capture:
    """Capture ``spec`` over ``samples``: per-persona sums, and the per-sample spill if asked."""
    if not samples:
        raise ValueError("no samples to capture: the dataset selection is empty")
    if not spec.layers:
        raise ValueError("no layers to capture")
    for layer in spec.layers:
        lm.sites.check_layer(layer)
    width = lm.sites.hidden_size if spec.site == "residual" else lm.sites.mlp_width
    shape = (len(spec.positions), n_personas, len(spec.layers), width)
    cap = Capture(
        spec=spec,
        sums=torch.zeros(shape, dtype=torch.float64),
        norm_sums=torch.zeros(shape[:3], dtype=torch.float64),
        counts=torch.zeros(n_personas, dtype=torch.int64),
        sq_sums=torch.zeros(shape, dtype=torch.float64) if spec.squares else None,
    )
    spill = None
    if spec.spill:
        cap._tmp = tempfile.TemporaryDirectory(prefix="personachat-", dir=spill_dir)
        cap.spill_path = Path(cap._tmp.name) / "pooled.f32"
        spill = open(cap.spill_path, "wb")  # noqa: SIM115 - closed in finally below
    handler = _PoolHandler(spec)
    order = sorted(samples, key=lambda s: -len(s.ids))  # similar lengths batch together
    pad_id = int(lm.tokenizer.pad_token_id or 0)
    pad_side = padding_side(lm, side)
    bar = tqdm(total=len(order), desc=desc, disable=not progress, unit="sample")
    try:
        with intervene(lm.sites, [handler]), torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = pad_batch(chunk, pad_id, pad_side, lm.device)
                handler.start(span_weights(chunk, batch, len(spec.positions)))
                run_forward(lm, batch)
                pooled, norms = handler.collect()
                index = torch.tensor([s.persona for s in chunk])
                pooled64 = pooled.double().transpose(0, 1)  # [n_pos, B, L, D]
                cap.sums.index_add_(1, index, pooled64)
                cap.norm_sums.index_add_(1, index, norms.double().transpose(0, 1))
                cap.counts.index_add_(0, index, torch.ones_like(index))
                if cap.sq_sums is not None:
                    cap.sq_sums.index_add_(1, index, pooled64.square())
                if spill is not None:
                    pooled.contiguous().numpy().tofile(spill)
                    cap.sample_personas.extend(s.persona for s in chunk)
                bar.update(len(chunk))
    except BaseException:
        cap.close()
        raise
    finally:
        bar.close()
        if spill is not None:
            spill.close()
    return cap
