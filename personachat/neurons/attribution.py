"""The ``attribution`` score: activation x gradient of the log-probability of the persona's own
reply, summed over every token of the conversation and averaged over the persona's samples.

A unit's attribution is the first-order change in the reply's log-prob if it were zeroed,
negated; a pair's score is ``attr(high) - attr(low)``: units that support the high persona's
replies more than the low persona's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from personachat.activations import Recorder, Sample, pad_batch
from personachat.hooks import Site, intervene
from personachat.model import LoadedModel
from personachat.neurons.head import logits


def _reply_logprob(
    lm: LoadedModel, hidden: torch.Tensor, ids: torch.Tensor, pred: torch.Tensor
) -> torch.Tensor:
    """Summed log-prob of the tokens after the positions in ``pred`` [B, T] (bool)."""
    b, t = pred.nonzero(as_tuple=True)
    logp = torch.log_softmax(logits(lm, hidden[b, t]), dim=-1)
    return logp.gather(1, ids[b, t + 1].unsqueeze(1)).sum()


def attribution_sums(
    lm: LoadedModel,
    samples: Sequence[Sample],
    site: Site,
    layers: Sequence[int],
    n_personas: int,
    *,
    batch_size: int = 4,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-persona sums of attribution [P, L, W], of mean activations [P, L, W], and counts [P].

    A sample's attribution is sum over its tokens of activation x d(log p(reply))/d(activation).
    """
    width = lm.sites.mlp_width
    attr = torch.zeros((n_personas, len(layers), width), dtype=torch.float64)
    acts = torch.zeros_like(attr)
    counts = torch.zeros(n_personas, dtype=torch.int64)
    grab = Recorder.at(site, layers, grad=True)
    pad_id = int(lm.tokenizer.pad_token_id or 0)
    bar = tqdm(total=len(samples), desc="attribution", disable=not progress, unit="sample")
    with intervene(lm.sites, [grab]), torch.enable_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            batch = pad_batch(chunk, pad_id, "right", lm.device)
            pred = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
            for i, s in enumerate(chunk):
                pred[i, s.n_prompt - 1 : len(s.ids) - 1] = True
            grab.clear()
            out = lm.sites.base(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            )
            total = _reply_logprob(lm, out.last_hidden_state, batch.input_ids, pred)
            tensors = [grab.get(layer) for layer in layers]
            grads = torch.autograd.grad(total, tensors)
            mask = batch.attention_mask.to(torch.float32)
            index = torch.tensor([s.persona for s in chunk])
            for j, (x, g) in enumerate(zip(tensors, grads, strict=True)):
                xf = x.detach().float()
                a = torch.einsum("bt,btw->bw", mask, xf * g.float())
                m = torch.einsum("bt,btw->bw", mask / mask.sum(1, keepdim=True), xf)
                attr[:, j].index_add_(0, index, a.double().cpu())
                acts[:, j].index_add_(0, index, m.double().cpu())
            counts.index_add_(0, index, torch.ones_like(index))
            bar.update(len(chunk))
    bar.close()
    return attr, acts, counts
