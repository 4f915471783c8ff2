"""Activation patching: write persona B's activations into persona A's run and score the answer.

Sites: the residual stream (``residual``), the MLP (``mlp_hidden``: the input of the MLP's output
projection, which fixes the MLP output at that position) and attention (``attn_heads``: the input
of the attention output projection; one head is its ``head_dim`` slice). One layer (or one layer
and head) and token group is patched at a time; the score is the fraction of the answer logit
difference restored, ``(LD_patched - LD_A) / (LD_B - LD_A)`` with
``LD = logit[B's answer] - logit[A's answer]``. ``patch_restored`` scores a joint patch of
several ``PatchSite``s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from personachat.activations import Recorder, pad, run_forward
from personachat.analysis.groups import GROUPS, Placement, Prompt, encode_prompt
from personachat.hooks import Site, intervene
from personachat.model import LoadedModel
from personachat.records import Persona

SITE_LABEL = {"residual": "residual", "mlp_hidden": "MLP", "attn_heads": "attention"}


@dataclass(eq=False)
class PatchingResult:
    """Fraction of the answer logit difference restored by patching B into A, per site.

    ``restored[(site, group)]`` is a curve over layers (``attn_heads`` there patches every head
    of the layer, i.e. the whole attention output); ``heads[group]`` is ``[layers, n_heads]``,
    one attention head's slice of ``attn_heads`` patched at a time.
    """

    model_id: str
    target: str  # persona A (patched)
    source: str  # persona B (patched from)
    question: str
    answer_a: str  # A's greedy first answer token (decoded)
    answer_b: str
    same_answer: bool  # A and B pick the same first token (a collapsed pair)
    token_a: int
    token_b: int
    ld_a: float
    ld_b: float
    layers: list[int]
    restored: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (site, group)->[L]
    skipped: dict[str, str] = field(default_factory=dict)  # group -> why it was not patched
    heads: dict[str, np.ndarray] = field(default_factory=dict)  # group -> [L, n_heads]

    def best(self, site: str, group: str) -> tuple[int, float]:
        curve = self.restored[(site, group)]
        i = int(np.nanargmax(curve))
        return self.layers[i], float(curve[i])

    def top_heads(self, group: str, k: int = 3) -> list[tuple[int, int, float]]:
        """The ``k`` heads restoring the most at ``group``: ``(layer, head, restored)``."""
        grid = self.heads.get(group)
        if grid is None:
            return []
        order = np.argsort(-np.nan_to_num(grid, nan=-np.inf), axis=None, kind="stable")[:k]
        return [
            (self.layers[i], int(h), float(grid[i, h]))
            for i, h in zip(*np.unravel_index(order, grid.shape), strict=True)
        ]


@dataclass(frozen=True)
class PatchSite:
    """One site patched from B's run into A's: a whole site, or one head of ``attn_heads``."""

    site: Site
    layer: int
    group: str
    head: int | None = None

    @property
    def node(self) -> str:
        """The site's name as a circuit node: ``a{layer}.h{head}`` or ``m{layer}``."""
        if self.site == "attn_heads" and self.head is not None:
            return f"a{self.layer}.h{self.head}"
        if self.site == "mlp_hidden":
            return f"m{self.layer}"
        raise ValueError(f"{self} has no circuit node name (only single heads and MLPs do)")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"site": self.site, "layer": self.layer, "group": self.group}
        if self.head is not None:
            out["head"] = self.head
        return out


# One patch in one batch row: (site, layer, target positions, source positions, columns).
Patch = tuple[Site, int, list[int], list[int], slice]


class _Patcher:
    """Writes cached source values into rows of the batch; ``rows[r]`` lists row r's patches."""

    def __init__(
        self, rows: Sequence[Sequence[Patch]], cache: Mapping[tuple[Site, int], torch.Tensor]
    ) -> None:
        self.cache = cache
        self.plan: dict[tuple[Site, int], list[tuple[int, list[int], list[int], slice]]] = {}
        for r, patches in enumerate(rows):
            for site, layer, tgt, src, cols in patches:
                self.plan.setdefault((site, layer), []).append((r, tgt, src, cols))

    def wants(self) -> Iterable[tuple[Site, int]]:
        return list(self.plan)

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        src = self.cache[(site, layer)].to(x.dtype)
        x = x.clone()
        for row, tgt, sp, cols in self.plan[(site, layer)]:
            x[row, tgt, cols] = src[sp, cols]
        return x


def _run_cached(
    lm: LoadedModel, ids: Sequence[int], sites: Sequence[Site]
) -> tuple[torch.Tensor, dict[tuple[Site, int], torch.Tensor]]:
    """Last-position logits [V] and every layer's value at ``sites`` ([T, width]) for one prompt."""
    rec = Recorder([(s, layer) for s in dict.fromkeys(sites) for layer in range(lm.sites.n_layers)])
    batch = pad([ids], 0, "left", lm.device)
    with intervene(lm.sites, [rec]), torch.inference_mode():
        out = run_forward(lm, batch, head=True)
    cache = {key: value[0] for key, value in rec.acts.items()}
    return out.logits[0, -1].float(), cache


def group_positions(a: Prompt, b: Prompt, group: str) -> tuple[list[int], list[int]] | str:
    """Aligned (A positions, B positions) of a group, or why they cannot be aligned."""
    if group == "answer":
        return [a.answer_pos], [b.answer_pos]
    if group == "question":
        ta, tb = len(a.ids), len(b.ids)
        sa, sb = a.question_span, b.question_span
        if ta - sa[0] != tb - sb[0] or a.ids[sa[0] :] != b.ids[sb[0] :]:
            return "the question and reply tokens differ between the two prompts"
        return list(range(*sa)), [p - ta + tb for p in range(*sa)]
    pa, pb = a.persona_span, b.persona_span
    if pa != pb:
        return (
            f"persona spans differ ({pa[1] - pa[0]} vs {pb[1] - pb[0]} tokens at {pa} vs {pb}); "
            "use personas whose prompts tokenize to the same length"
        )
    return list(range(*pa)), list(range(*pb))


@dataclass(eq=False)
class PatchRuns:
    """The two clean runs of a patching experiment: prompts, B's cache, answer tokens, LDs."""

    a: Prompt
    b: Prompt
    cache: dict[tuple[Site, int], torch.Tensor]
    token_a: int
    token_b: int
    same: bool
    ld_a: float
    ld_b: float

    def restored(self, logits: torch.Tensor) -> np.ndarray:
        """Fraction restored per row of last-position ``logits`` [N, V]."""
        ld = logits[:, self.token_b] - logits[:, self.token_a]
        return ((ld - self.ld_a) / (self.ld_b - self.ld_a)).cpu().numpy()


def clean_runs(
    lm: LoadedModel,
    target: Persona,
    source: Persona,
    question: str,
    sites: Sequence[Site],
    answer_prefix: str,
    placement: Placement,
) -> PatchRuns:
    """Run A (``target``) and B (``source``) unpatched, caching B's ``sites`` at every layer.

    The answer tokens are each run's greedy first token; when they agree (a collapsed pair), B's
    is the token B prefers most relative to A.
    """
    a = encode_prompt(lm, target, question, answer_prefix, placement)
    b = encode_prompt(lm, source, question, answer_prefix, placement)
    logits_a, _ = _run_cached(lm, a.ids, [])
    logits_b, cache = _run_cached(lm, b.ids, sites)
    tok_a, tok_b = int(logits_a.argmax()), int(logits_b.argmax())
    same = tok_a == tok_b
    if same:  # collapsed pair: use the token B prefers most relative to A
        diff = (logits_b.log_softmax(-1) - logits_a.log_softmax(-1)).clone()
        diff[tok_a] = -float("inf")
        tok_b = int(diff.argmax())
    ld_a = float(logits_a[tok_b] - logits_a[tok_a])
    ld_b = float(logits_b[tok_b] - logits_b[tok_a])
    return PatchRuns(a, b, cache, tok_a, tok_b, same, ld_a, ld_b)


def activation_patching(
    lm: LoadedModel,
    target: Persona,
    source: Persona,
    question: str,
    *,
    answer_prefix: str = "",
    groups: Sequence[str] = GROUPS,
    sites: Sequence[Site] = ("residual", "mlp_hidden"),
    heads: bool | None = None,
    placement: Placement = "early",
    batch_size: int = 64,
) -> PatchingResult:
    """Patch ``source``'s activations into ``target``'s run at each layer, site and token group.

    With ``heads`` (default: when the model has an ``attn_heads`` site) every attention head's
    slice of ``attn_heads`` is also patched on its own, per layer and group (``result.heads``).
    """
    if heads is None:
        heads = lm.sites.attn_out is not None
    cache_sites: list[Site] = [*sites, "attn_heads"] if heads else list(sites)
    runs = clean_runs(lm, target, source, question, cache_sites, answer_prefix, placement)
    layers = list(range(lm.sites.n_layers))
    result = PatchingResult(
        model_id=lm.info.model_id,
        target=target.name,
        source=source.name,
        question=question,
        answer_a=str(lm.tokenizer.decode([runs.token_a])),
        answer_b=str(lm.tokenizer.decode([runs.token_b])),
        same_answer=runs.same,
        token_a=runs.token_a,
        token_b=runs.token_b,
        ld_a=runs.ld_a,
        ld_b=runs.ld_b,
        layers=layers,
    )
    every = slice(None)
    for group in groups:
        aligned = group_positions(runs.a, runs.b, group)
        if isinstance(aligned, str):
            result.skipped[group] = aligned
            continue
        ta, sb = aligned
        for site in sites:
            rows = [[(site, la, ta, sb, every)] for la in layers]
            logits = patched_logits(lm, runs.a, rows, runs.cache, batch_size)
            result.restored[(site, group)] = runs.restored(logits)
        if heads:
            n_heads = lm.sites.n_heads or 0
            rows = [
                [("attn_heads", la, ta, sb, lm.sites.head_slice(h))]
                for la in layers
                for h in range(n_heads)
            ]
            logits = patched_logits(lm, runs.a, rows, runs.cache, batch_size)
            result.heads[group] = runs.restored(logits).reshape(len(layers), n_heads)
    return result


def patch_restored(
    lm: LoadedModel,
    target: Persona,
    source: Persona,
    question: str,
    patches: Sequence[PatchSite],
    *,
    answer_prefix: str = "",
    placement: Placement = "early",
) -> float:
    """Fraction of the answer logit difference restored by patching all of ``patches`` at once."""
    needed = list(dict.fromkeys(p.site for p in patches))
    runs = clean_runs(lm, target, source, question, needed, answer_prefix, placement)
    row = []
    for p in patches:
        aligned = group_positions(runs.a, runs.b, p.group)
        if isinstance(aligned, str):
            raise ValueError(f"cannot patch {p}: {aligned}")
        cols = slice(None) if p.head is None else lm.sites.head_slice(p.head)
        row.append((p.site, lm.sites.check_layer(p.layer), *aligned, cols))
    return float(runs.restored(patched_logits(lm, runs.a, [row], runs.cache))[0])


def patched_logits(
    lm: LoadedModel,
    a: Prompt,
    rows: Sequence[Sequence[Patch]],
    cache: Mapping[tuple[Site, int], torch.Tensor],
    batch_size: int = 64,
) -> torch.Tensor:
    """Last-position logits [len(rows), V] of prompt ``a``, row r patched with ``rows[r]``."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = pad([a.ids] * len(chunk), 0, "left", lm.device)
        with intervene(lm.sites, [_Patcher(chunk, cache)]), torch.inference_mode():
            logits = run_forward(lm, batch, head=True).logits.float()
        out.append(logits[:, -1])
    return torch.cat(out)
