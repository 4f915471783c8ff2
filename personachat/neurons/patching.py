"""The ``patching`` score: attribution patching at the decision, the last prompt position, where
the reply's first token is chosen.

A unit's score is ``(a_high - a_low) x d logodds / d a`` averaged over the questions, where
``logodds`` is the high persona's log-odds of opening its reply the way it does (any first token
of its replies vs every other token): an estimate of how much patching the unit to its value
under the low persona's prompt would take away. Only units the high persona turns up (mean
``a_high - a_low > 0``) are kept; the set's means are the low persona's values there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from personachat.activations import Dist, Recorder, Sample, pad_batch
from personachat.hooks import Site, intervene
from personachat.model import LoadedModel
from personachat.neurons.decision import by_persona, prompt_only
from personachat.neurons.head import logits


def _last_prompt_acts(
    lm: LoadedModel, samples: Sequence[Sample], grab: Recorder, grad: bool
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Activations per layer [B, T, W] (left-padded: the prompt ends at -1), and the logits at
    the last prompt position [B, V]."""
    prompts = [prompt_only(s) for s in samples]
    batch = pad_batch(prompts, int(lm.tokenizer.pad_token_id or 0), "left", lm.device)
    grab.clear()
    with torch.set_grad_enabled(grad):
        out = lm.sites.base(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        last = logits(lm, out.last_hidden_state[:, -1])
    return [grab.get(layer) for _, layer in grab.keys], last


def _openers(
    lm: LoadedModel, groups: Sequence[Sequence[Sample]], personas: Iterable[int]
) -> dict[int, torch.Tensor]:
    """Per persona, a vocabulary mask of the ways it opens its replies (their first tokens)."""
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    openers = {}
    for p in personas:
        mask = torch.zeros(vocab, dtype=torch.bool, device=lm.device)
        mask[[s.ids[s.n_prompt] for s in groups[p]]] = True
        openers[p] = mask
    return openers


def patching_sums(
    lm: LoadedModel,
    samples: Sequence[Sample],
    pairs: Sequence[tuple[int, int]],
    site: Site,
    layers: Sequence[int],
    n_personas: int,
    *,
    batch_size: int = 8,
    progress: bool = True,
    dist: Dist | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over questions of the ``patching`` products [pairs, L, W], of ``a_high - a_low``
    [pairs, L, W], of activations per persona [P, L, W], and the question count.

    ``samples`` hold every persona's reply to every question, persona-major in the same question
    order; ``pairs`` are (high, low) persona indices. Questions are split across processes.
    """
    dist = dist or Dist()
    groups = by_persona(samples, n_personas)
    n_questions = len(groups[0])
    if any(len(group) != n_questions for group in groups):
        raise ValueError("patching needs every persona's reply to every question")
    openers = _openers(lm, groups, {h for h, _ in pairs})  # the high personas' openers
    shape = (len(layers), lm.sites.mlp_width)
    products = torch.zeros((len(pairs), *shape), dtype=torch.float64)
    diffs = torch.zeros_like(products)
    acts = torch.zeros((n_personas, *shape), dtype=torch.float64)
    grab = Recorder.at(site, layers, grad=True)
    questions = dist.shard(list(range(n_questions)))
    bar = tqdm(total=len(questions), desc="patching", disable=not progress, unit="question")
    with intervene(lm.sites, [grab]):
        for start in range(0, len(questions), batch_size):
            chunk = questions[start : start + batch_size]
            seen: dict[int, torch.Tensor] = {}
            grads: dict[int, torch.Tensor] = {}
            for p in range(n_personas):
                grad = p in openers
                xs, last = _last_prompt_acts(lm, [groups[p][q] for q in chunk], grab, grad)
                seen[p] = torch.stack([x[:, -1].detach().double().cpu() for x in xs], 1)
                if grad:
                    logp = torch.log_softmax(last, dim=-1)
                    own = logp[:, openers[p]].logsumexp(-1)
                    rest = logp[:, ~openers[p]].logsumexp(-1)
                    g = torch.autograd.grad((own - rest).sum(), xs)
                    grads[p] = torch.stack([gi[:, -1].double().cpu() for gi in g], 1)
                acts[p] += seen[p].sum(0)
            for j, (high, low) in enumerate(pairs):
                diff = seen[high] - seen[low]
                products[j] += (diff * grads[high]).sum(0)
                diffs[j] += diff.sum(0)
            bar.update(len(chunk))
    bar.close()
    count = torch.tensor(float(len(questions)), dtype=torch.float64)
    return products, diffs, acts, count


def patching_scores(
    products: torch.Tensor, diffs: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """Mean patching effect per unit [pairs, L, W]; 0 where the high persona does not turn the
    unit up (a unit the low persona drives would flip every persona, not this one)."""
    n = count.clamp(min=1)
    return torch.where(diffs / n > 0, products / n, torch.zeros_like(products)).float()
