"""What a chat reply reports: the reply after each token and the readout of its residual stream."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from personachat.interventions import InterferenceReport, Plan


@dataclass(frozen=True, eq=False)
class ReplyReadout:
    """Projections of one row's residual stream onto unit persona vectors, per token and layer.

    ``projections[t, i, k]``: token ``tokens[t]`` (prompt then reply), layer ``layers[i]``,
    persona ``personas[k]``, read after the interventions at that layer. The last reply token
    was never fed back through the model, so its row is NaN.
    """

    personas: tuple[str, ...]
    layers: tuple[int, ...]
    tokens: tuple[int, ...]
    prompt_len: int
    projections: torch.Tensor  # [tokens, layers, personas], float32 CPU

    @property
    def reply(self) -> torch.Tensor:
        """``[reply tokens, layers, personas]``."""
        return self.projections[self.prompt_len :]

    def pooled(self, positions: str, question_start: int | None = None) -> torch.Tensor:
        """``[layers, personas]``: the projections pooled the way a vector of ``positions`` kind
        was read (``response_avg``: the reply's fed tokens; ``prompt_last``: the last prompt
        token; ``prompt_avg``: the prompt; ``question_span``: from ``question_start`` through
        the prompt's end), so they compare with that vector's reference distribution."""
        p = self.prompt_len
        if positions == "prompt_last":
            return self.projections[p - 1]
        spans = {"response_avg": (p, len(self.tokens)), "prompt_avg": (0, p)}
        if positions == "question_span":
            if question_start is None:
                raise ValueError("pooling over the question span needs where it starts")
            spans["question_span"] = (question_start, p)
        if positions not in spans:
            raise ValueError(f"unknown positions {positions!r}")
        lo, hi = spans[positions]
        return self.projections[lo:hi].nanmean(dim=0)


@dataclass(frozen=True, eq=False)
class ChatUpdate:
    """The state of a reply after a token. ``baseline_*`` is the unsteered row (side by side)."""

    text: str
    tokens: tuple[int, ...]
    baseline_text: str | None = None
    baseline_tokens: tuple[int, ...] | None = None
    done: bool = False
    stopped: bool = False
    readout: ReplyReadout | None = None
    baseline_readout: ReplyReadout | None = None
    interference: InterferenceReport | None = None
    steered_layers: dict[int, float] = field(default_factory=dict)
    # vectors read from prompts rendered otherwise than this model's are now
    warnings: tuple[str, ...] = ()


def row_readout(
    plan: Plan, result: torch.Tensor, row: int, prompt: list[int], reply: list[int]
) -> ReplyReadout:
    """Row ``row`` of a plan's readout ``result``, over the prompt and that row's reply; tokens
    the readout never saw are NaN."""
    assert plan.readout is not None
    n = len(prompt) + len(reply)
    out = torch.full((n, len(plan.readout.layers), len(plan.readout.names)), float("nan"))
    have = min(n, result.shape[1]) if result.numel() else 0
    if have:
        out[:have] = result[row, :have]
    return ReplyReadout(
        personas=tuple(plan.readout.names),
        layers=tuple(plan.readout.layers),
        tokens=(*prompt, *reply),
        prompt_len=len(prompt),
        projections=out,
    )
