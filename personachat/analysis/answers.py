"""Every persona's greedy answer to every phrasing of a preference: the answer span located in the
reply, and the next-token distribution at the step that produced it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from personachat.activations import pad
from personachat.analysis.groups import Placement, encode_prompt
from personachat.analysis.preferences import PreferenceItem
from personachat.model import LoadedModel
from personachat.records import Persona


@dataclass(frozen=True)
class Answer:
    """One persona's answer to one phrasing: the span, and the next-token distribution there."""

    persona: str
    key: str
    question: str
    text: str  # the generated reply
    answer: str  # the normalised answer span ("" if none was found)
    top: dict[int, float]  # top next-token probabilities at the answer position
    first_token: int  # greedy token at the answer position


def normalise_answer(span: str) -> str:
    """Lower-case, first clause, without surrounding spaces, quotes and punctuation."""
    first = re.split(r"[.,!?;:\n]", span.strip(), maxsplit=1)[0]
    return first.strip().strip("\"'*").lower()


def _span_from_reply(item: PreferenceItem, reply: str) -> tuple[str, int]:
    """(answer span, character offset of it in ``reply``); ("", -1) when the pattern misses."""
    if item.answer_pattern:
        m = re.search(item.answer_pattern, reply, flags=re.IGNORECASE)
        return (m.group(1), m.start(1)) if m else ("", -1)
    rest = reply[len(item.answer_prefix) :]
    return rest, len(item.answer_prefix) + len(rest) - len(rest.lstrip())


def generate_answers(
    lm: LoadedModel,
    personas: Sequence[Persona],
    items: Sequence[PreferenceItem],
    *,
    placement: Placement = "early",
    max_new_tokens: int = 24,
    batch_size: int = 16,
    top_k: int = 50,
    progress: bool = False,
) -> list[Answer]:
    """Greedy replies of every persona to every phrasing, with the answer span located in each.

    The next-token distribution is taken at the step that generated the first token of the
    answer span (so for a free reply it is the persona's own answer position).
    """
    jobs = [(p, it, q) for p in personas for it in items for q in it.questions]
    prompts = [encode_prompt(lm, p, q, it.answer_prefix, placement) for p, it, q in jobs]
    pad_id = int(lm.tokenizer.pad_token_id or 0)
    eos = lm.tokenizer.eos_token_id
    out: list[Answer] = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="answers", disable=not progress):
        chunk = prompts[start : start + batch_size]
        batch = pad([p.ids for p in chunk], pad_id, "left", lm.device)
        ids, mask = batch.input_ids, batch.attention_mask
        with torch.inference_mode():
            gen = lm.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=pad_id,
                eos_token_id=eos,
            )
        new = gen.sequences[:, ids.shape[1] :].cpu()
        for b, (persona, item, question) in enumerate(jobs[start : start + batch_size]):
            toks = [int(t) for t in new[b]]
            if eos is not None and eos in toks:
                toks = toks[: toks.index(eos)]
            reply = item.answer_prefix + str(lm.tokenizer.decode(toks, skip_special_tokens=True))
            span, char = _span_from_reply(item, reply)
            step = _step_at(lm, toks, char - len(item.answer_prefix)) if char >= 0 else 0
            step = min(step, len(gen.logits) - 1)
            probs = gen.logits[step][b].float().softmax(-1).cpu()
            top = torch.topk(probs, min(top_k, probs.shape[-1]))
            out.append(
                Answer(
                    persona=persona.name,
                    key=item.key,
                    question=question,
                    text=reply,
                    answer=normalise_answer(span),
                    top={int(i): float(v) for i, v in zip(top.indices, top.values, strict=True)},
                    first_token=int(new[b, step]),
                )
            )
    return out


def _step_at(lm: LoadedModel, toks: Sequence[int], char: int) -> int:
    """Generation step whose token starts the text at ``char`` of the decoded reply."""
    if char <= 0:
        return 0
    for i in range(1, len(toks) + 1):
        if len(str(lm.tokenizer.decode(list(toks[:i]), skip_special_tokens=True))) > char:
            return i - 1
    return max(0, len(toks) - 1)
