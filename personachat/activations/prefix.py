"""Batches of prompts that share each persona's prefix: its layout, its weights, its KV cache.

Every prompt of one persona starts with the same tokens (its system turn and whatever the
template writes before the question): ``shared_prefix`` finds them, capped so that at least one
token of each prompt is left to feed. A batch (``Layout``) holds the distinct prefixes of its
rows once, left-padded (``prefix_ids`` [G, T0]), and each row's remaining tokens, left-padded
too (``suffix_ids`` [B, W]). ``prefix_cache`` runs the prefixes once through the base model and
copies each one's KV cache to every row that shares it, so a batch's rows read as
``[its prefix | padding | its suffix]`` with one attention mask and position ids counted over
the real tokens only (``cumsum(mask) - 1``), which is how ``generate`` numbers them.

``weights`` spread each prompt position kind's averaging weights (1/len over the span) over the
prefix columns and the suffix columns, so pooling the prefix forward and the suffix forward
and adding the two gives the span's mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from personachat.activations.encode import Encoded
from personachat.hooks import StopForward
from personachat.model import LoadedModel


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """The number of leading tokens all ``prompts`` share, leaving each at least one token."""
    if not prompts:
        return 0
    limit = min(len(p) for p in prompts) - 1
    n = 0
    first = prompts[0]
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return max(n, 0)


@dataclass(frozen=True)
class Layout:
    """One batch: distinct prefixes [G, T0], per-row suffixes [B, W] and the row -> prefix map."""

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_mask: torch.Tensor
    group: torch.Tensor  # [B] the prefix row of each row
    prefix_lens: tuple[int, ...]  # [G] real prefix tokens of each prefix row

    @property
    def input_ids(self) -> torch.Tensor:
        """[B, T0 + W] every row as ``generate`` sees it: its prefix, then its suffix."""
        return torch.cat([self.prefix_ids[self.group], self.suffix_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prefix_mask[self.group], self.suffix_mask], dim=1)


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        if row:
            ids[b, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[b, width - len(row) :] = 1
    return ids, mask


def layout(
    prompts: Sequence[Sequence[int]],
    groups: Sequence[int],
    prefix_lens: dict[int, int],
    pad_id: int,
) -> Layout:
    """The layout of one batch: row b's prompt ``prompts[b]`` shares the first
    ``prefix_lens[groups[b]]`` tokens with the other rows of its group."""
    distinct = list(dict.fromkeys(groups))
    first = {g: next(p for p, gg in zip(prompts, groups, strict=True) if gg == g) for g in distinct}
    lens = tuple(prefix_lens[g] for g in distinct)
    prefix_ids, prefix_mask = _left_pad([first[g][: prefix_lens[g]] for g in distinct], pad_id)
    suffixes = [p[prefix_lens[g] :] for p, g in zip(prompts, groups, strict=True)]
    suffix_ids, suffix_mask = _left_pad(suffixes, pad_id)
    group = torch.tensor([distinct.index(g) for g in groups], dtype=torch.long)
    return Layout(prefix_ids, prefix_mask, suffix_ids, suffix_mask, group, lens)


def weights(
    encoded: Sequence[Encoded], lay: Layout, kinds: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """([n_kinds, B, T0], [n_kinds, B, W]) averaging weights of each prompt position kind over
    the prefix columns and the suffix columns (zero for ``response_avg``, read later)."""
    t0, width = lay.prefix_ids.shape[1], lay.suffix_ids.shape[1]
    wp = torch.zeros((len(kinds), len(encoded), t0))
    ws = torch.zeros((len(kinds), len(encoded), width))
    for b, enc in enumerate(encoded):
        n0 = lay.prefix_lens[int(lay.group[b])]
        suffix = enc.n_prompt - n0
        for k, kind in enumerate(kinds):
            if kind == "response_avg":
                continue
            start, end = enc.span(kind)
            w = 1.0 / (end - start)
            if start < n0:  # prefix column of prompt token t: t0 - n0 + t
                wp[k, b, t0 - n0 + start : t0 - n0 + min(end, n0)] = w
            if end > n0:  # suffix column of prompt token t: width - suffix + t - n0
                ws[k, b, width - suffix + max(start, n0) - n0 : width - suffix + end - n0] = w
    return wp, ws


def prefix_cache(lm: LoadedModel, lay: Layout) -> DynamicCache:
    """The KV cache of the batch's prefixes, computed once per prefix and copied to each row.

    Runs the base model over the prefixes (handlers that ``intervene`` attached see it).
    """
    cache = DynamicCache(config=lm.model.config)
    if lay.prefix_ids.shape[1] == 0:
        return cache
    device = lm.device
    mask = lay.prefix_mask.to(device)
    try:
        lm.sites.base(
            input_ids=lay.prefix_ids.to(device),
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            cache=cache,
            use_cache=True,
        )
    except StopForward:  # a handler must not stop it: every layer's cache is needed
        raise RuntimeError("the prefix forward was stopped before its last layer") from None
    cache.reorder_cache(lay.group.to(device))  # type: ignore[arg-type]
    return cache
