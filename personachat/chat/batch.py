"""Greedy replies to many conversations in one left-padded batch, under optional handlers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from personachat.activations import pad
from personachat.hooks import Handler, intervene
from personachat.model import LoadedModel
from personachat.prompts import Message, encode_text, format_chat


def batch_replies(
    lm: LoadedModel,
    conversations: Sequence[Sequence[Message]],
    plan: Callable[[int], Sequence[Handler]] | None = None,
    max_new_tokens: int = 64,
) -> list[str]:
    """Greedy replies to many conversations in one left-padded batch (evaluations, sweeps).

    ``plan(prompt_len)`` builds the handlers, if any: with left padding every row's prompt ends
    at the padded width, which is where position windows count from.
    """
    tok = lm.tokenizer
    rows = [encode_text(tok, format_chat(tok, list(messages))) for messages in conversations]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = pad(rows, int(pad_id), "left", lm.device)
    width = batch.input_ids.shape[1]
    handlers = list(plan(width)) if plan is not None else []
    with torch.no_grad(), intervene(lm.sites, handlers):
        out = lm.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return list(tok.batch_decode(out[:, width:], skip_special_tokens=True))
