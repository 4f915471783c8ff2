"""Read activations while replies are generated: one pass instead of generate, then capture.

``generate_live`` answers prompts with the model's own ``generate`` (greedy or sampled, seeded
per batch, the settings ``GenerationConfig`` names) and pools every position kind on the way,
into the same ``Capture`` sums and spill a teacher-forced pass fills:

- each batch's persona prefixes run once (``personachat.activations.prefix``) and their KV cache
  is copied to the rows that share them; prompt kinds pool that forward's states and then the
  prefill's (the rest of each prompt);
- each decode step feeds the token chosen at the step before, so its states are that token's:
  ``response_avg`` adds them, for the rows still answering; one more forward, stopped after the
  last layer needed, feeds the last token of the rows that did not end with an EOS.

The ids read are exactly those a teacher-forced pass over the rendered prompt plus the generated
ids reads: the response is every generated token before the first EOS (at most ``max_tokens``
in all, as ``build_samples`` truncates). A reply whose first token is an EOS has no response
token: it is returned uncaptured (``Reply.ids`` empty) for a teacher-forced pass over its text.
Memory stays flat: each batch's pooled sums, then the spill.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from personachat.activations.capture import Capture, CaptureSpec
from personachat.activations.encode import Encoded
from personachat.activations.prefix import Layout, layout, prefix_cache, shared_prefix, weights
from personachat.hooks import Site, StopForward, intervene
from personachat.model import LoadedModel


@dataclass(frozen=True)
class GenerationConfig:
    """How missing responses are generated."""

    max_new_tokens: int = 64
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 8


@dataclass(frozen=True)
class LivePrompt:
    """A prompt to answer: its persona and question indices and its rendered ids and spans."""

    persona: int
    question: int
    encoded: Encoded  # the prompt alone (no response)


@dataclass(frozen=True)
class Reply:
    """A generated reply: its text (decoded as responses are stored) and the response ids read
    (empty when the first token was an EOS: not captured)."""

    persona: int
    question: int
    text: str
    ids: tuple[int, ...]


class _LivePool:
    """Pools the prefix forward, the prefill and every decode step of one batch."""

    def __init__(self, spec: CaptureSpec, wp: torch.Tensor, ws: torch.Tensor, lay: Layout):
        self.spec = spec
        self.slot = {layer: i for i, layer in enumerate(spec.layers)}
        self.last = max(spec.layers)
        kinds = spec.positions
        self.reply = kinds.index("response_avg") if "response_avg" in kinds else None
        self.wp, self.ws, self.group = wp, ws, lay.group
        self.phase = "prefix"  # then "prompt", "reply" (set after the prompt), "final"
        self.feed = torch.zeros(ws.shape[1], dtype=torch.bool)
        self.pooled: torch.Tensor | None = None  # [n_pos, B, L, D]
        self.norms = torch.zeros((ws.shape[0], ws.shape[1], len(spec.layers)))

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [(self.spec.site, layer) for layer in self.spec.layers]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        i, xf = self.slot[layer], x.detach().float()
        if self.pooled is None:
            shape = (self.ws.shape[0], self.ws.shape[1], len(self.spec.layers), xf.shape[-1])
            self.pooled = torch.zeros(shape, device=xf.device)
            self.norms = self.norms.to(xf.device)
        if self.phase in ("prefix", "prompt"):
            w = (self.wp if self.phase == "prefix" else self.ws).to(xf.device)
            rows = xf[self.group.to(xf.device)] if self.phase == "prefix" else xf
            self.pooled[:, :, i] += torch.einsum("pbt,btd->pbd", w, rows)
            self.norms[:, :, i] += torch.einsum("pbt,bt->pb", w, rows.norm(dim=-1))
        elif self.reply is not None:
            fed = self.feed.to(xf.device, torch.float32)
            self.pooled[self.reply, :, i] += xf[:, -1] * fed[:, None]
            self.norms[self.reply, :, i] += xf[:, -1].norm(dim=-1) * fed
        if layer == self.last:
            if self.phase == "prompt":
                self.phase = "reply"
            elif self.phase == "final":
                raise StopForward
        return None

    def collect(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, n_pos, L, D] pooled vectors and [B, n_pos, L] mean token norms, on the CPU; the
        response sums divided by each row's ``counts``."""
        assert self.pooled is not None, "the batch never reached a captured layer"
        pooled, norms = self.pooled.cpu(), self.norms.cpu()
        if self.reply is not None:
            n = counts.clamp(min=1).float()
            pooled[self.reply] /= n[:, None, None]
            norms[self.reply] /= n[:, None]
        return pooled.permute(1, 0, 2, 3), norms.permute(1, 0, 2)


class _Watch(StoppingCriteria):
    """Sees each chosen token: which rows feed a response token at the next forward."""

    def __init__(self, pool: _LivePool, eos: set[int], limits: Sequence[int]):
        self.pool, self.eos, self.limits = pool, eos, list(limits)
        self.alive = [True] * len(self.limits)
        self.ids: list[list[int]] = [[] for _ in self.limits]

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        fed = []
        for b, token in enumerate(input_ids[:, -1].tolist()):
            self.alive[b] = self.alive[b] and token not in self.eos
            take = self.alive[b] and len(self.ids[b]) < self.limits[b]
            if take:
                self.ids[b].append(int(token))
            fed.append(take)
        self.pool.feed = torch.tensor(fed, dtype=torch.bool)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def eos_ids(lm: LoadedModel) -> set[int]:
    """The ids that end a reply in ``generate`` (the model's generation config)."""
    eos = getattr(lm.model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}


def reply_ids(generated: Sequence[int], eos: set[int], limit: int | None = None) -> list[int]:
    """The response ids of a generation: every token before the first EOS (at most ``limit``)."""
    out: list[int] = []
    for token in generated:
        if int(token) in eos or (limit is not None and len(out) >= limit):
            break
        out.append(int(token))
    return out


def generate_live(
    lm: LoadedModel,
    prompts: Sequence[LivePrompt],
    cap: Capture,
    cfg: GenerationConfig,
    *,
    batch_size: int,
    max_tokens: int | None = None,
    progress: bool = True,
    desc: str = "replies + activations",
) -> list[Reply]:
    """Answer ``prompts`` and add what they read to ``cap`` (see the module docstring).

    Rows are grouped by persona (prefixes shared), personas ordered by prefix length and rows by
    the length of the rest, then cut into batches of ``batch_size``; batch b is seeded with
    ``cfg.seed + b``. Replies come back in batch order.
    """
    prefix_lens = {
        g: shared_prefix([p.encoded.ids for p in prompts if p.persona == g])
        for g in {p.persona for p in prompts}
    }

    def key(p: LivePrompt) -> tuple[int, int, int]:
        return (prefix_lens[p.persona], p.persona, -(p.encoded.n_prompt - prefix_lens[p.persona]))

    order = sorted(prompts, key=key)
    replies: list[Reply] = []
    bar = tqdm(total=len(order), desc=desc, disable=not progress, unit="reply")
    try:
        with torch.inference_mode():
            for b, start in enumerate(range(0, len(order), batch_size)):
                chunk = order[start : start + batch_size]
                torch.manual_seed(cfg.seed + b)
                replies += _answer(lm, chunk, cap, cfg, prefix_lens, max_tokens)
                bar.update(len(chunk))
    finally:
        bar.close()
    return replies


def _answer(
    lm: LoadedModel,
    chunk: Sequence[LivePrompt],
    cap: Capture,
    cfg: GenerationConfig,
    prefix_lens: dict[int, int],
    max_tokens: int | None,
) -> list[Reply]:
    """One batch: prefixes, ``generate`` under the pooling handler, the last token's forward."""
    tok = lm.tokenizer
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
    lay = layout([p.encoded.ids for p in chunk], [p.persona for p in chunk], prefix_lens, pad)
    wp, ws = weights([p.encoded for p in chunk], lay, cap.spec.positions)
    pool = _LivePool(cap.spec, wp, ws, lay)
    limits = [
        cfg.max_new_tokens if max_tokens is None else max(max_tokens - p.encoded.n_prompt, 1)
        for p in chunk
    ]
    watch = _Watch(pool, eos_ids(lm), limits)
    mask = lay.attention_mask.to(lm.device)
    sample = cfg.temperature > 0
    with intervene(lm.sites, [pool]):
        cache = prefix_cache(lm, lay)
        pool.phase = "prompt"
        out = lm.model.generate(
            input_ids=lay.input_ids.to(lm.device),
            attention_mask=mask,
            cache=cache,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=sample,
            temperature=cfg.temperature if sample else None,
            top_p=cfg.top_p if sample else None,
            pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([watch]),
        )
        if bool(pool.feed.any()):
            pool.phase = "final"
            _feed_last(lm, out, mask, cache)
    new = out[:, mask.shape[1] :]
    texts = [str(tok.decode(row, skip_special_tokens=True)).strip() or "..." for row in new]
    pooled, norms = pool.collect(torch.tensor([len(ids) for ids in watch.ids]))
    kept = [b for b, ids in enumerate(watch.ids) if ids]
    if kept:
        rows = [chunk[b] for b in kept]
        cap.add([p.persona for p in rows], [p.question for p in rows], pooled[kept], norms[kept])
    return [
        Reply(p.persona, p.question, text, tuple(ids))
        for p, text, ids in zip(chunk, texts, watch.ids, strict=True)
    ]


def _feed_last(lm: LoadedModel, out: torch.Tensor, mask: torch.Tensor, cache: Any) -> None:
    """One forward over each row's last generated token (its states were never computed),
    stopped by the pooling handler after the last layer it needs."""
    grown = torch.ones((out.shape[0], out.shape[1] - mask.shape[1]), dtype=mask.dtype)
    full = torch.cat([mask, grown.to(mask.device)], dim=1)
    with contextlib.suppress(StopForward):
        lm.sites.base(
            input_ids=out[:, -1:],
            attention_mask=full,
            position_ids=full.sum(-1, keepdim=True) - 1,
            cache=cache,
            use_cache=True,
        )
