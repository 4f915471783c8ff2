"""Score MLP units for contrast pairs, keep the top k, and measure their stability across pairs.

Four scoring methods (``records.NEURON_METHODS``):

- ``effect``: standardized effect of each unit's pooled activation, high persona vs low persona,
  over many prompts: (mean_high - mean_low) / pooled std (Cohen's d). Ranked by ``|d|``.
- ``attribution``: activation x gradient of the log-probability of the persona's own reply,
  summed over every token of the conversation (the first-order change in log-prob if the unit
  were zeroed, negated), averaged over the persona's samples; the pair's score is
  ``attr(high) - attr(low)``: units that support the high persona's replies more than the low
  persona's. Ranked by the signed score, largest first.
- ``patching``: attribution patching at the decision: at the last prompt position (where the
  reply's first token is chosen), ``(a_high - a_low) x d logodds / d a``, averaged over the
  questions, where ``logodds`` is the high persona's log-odds of opening its reply the way it
  does (any first token of its replies vs every other token). It estimates how much patching
  the unit to its value under the low persona's prompt would take away. Only units the high
  persona turns up (mean ``a_high - a_low > 0``) are kept. The set's means are the low persona's
  values there, so ``AblationSpec(mode="mean", positions="prompt")`` is that patch. A model
  whose style, once started, carries itself through the reply is steered by its first tokens:
  units found over the whole reply then change nothing (see the demo model's card).
- ``exact``: exact activation patching at the same place, unit by unit: each unit set to the low
  persona's mean there, the drop of the high persona's log-odds minus the mean drop of every
  other persona's (their own openers, under their own prompts). The set's order is then chosen
  greedily, units patched together, so that the high persona stops opening its way while no
  other persona does (``exact_selection``). Slower (a forward per unit of the chosen layers) but
  not fooled where the log-odds is far from linear in a unit, as in layer 0 of the demo model,
  whose patching sets miss 7 of its 11 personas. Meant for ``AblationSpec(mode="mean",
  positions="prompt", last_n=1)``.

Sets are labelled ``{pair or kind}.{site}.{method}`` (``teacher_student.gate.effect``).
Cross-pair stability: for pairs of the same ``kind`` each unit's rank (0 = best) in every pair
is kept (``NeuronSet.ranks``), with the fraction of those pairs that have it in their top k.
Gradients are taken with ``torch.autograd.grad`` on activations captured by a
``hooks.intervene`` handler; no hook is registered here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial

import torch
from tqdm.auto import tqdm

from personachat.activations import Dist, Recorder, Sample, pad_batch
from personachat.hooks import Site
from personachat.hooks import intervene as _intervene
from personachat.model import LoadedModel
from personachat.prompts import ContrastPair
from personachat.records import NeuronSet


def standardized_effect(
    mean_h: torch.Tensor,
    sq_h: torch.Tensor,
    n_h: int,
    mean_l: torch.Tensor,
    sq_l: torch.Tensor,
    n_l: int,
) -> torch.Tensor:
    """Cohen's d per unit from means and mean squares (``sq`` = mean of squares) of both sides."""
    var_h = (sq_h - mean_h.square()).clamp(min=0) * (n_h / max(n_h - 1, 1))
    var_l = (sq_l - mean_l.square()).clamp(min=0) * (n_l / max(n_l - 1, 1))
    pooled = (((n_h - 1) * var_h + (n_l - 1) * var_l) / max(n_h + n_l - 2, 1)).sqrt()
    diff = mean_h - mean_l
    return torch.where(pooled > 1e-12, diff / pooled.clamp(min=1e-12), torch.zeros_like(diff))


def rank_key(scores: torch.Tensor, by_abs: bool) -> torch.Tensor:
    return scores.abs() if by_abs else scores


def ranks(scores: torch.Tensor, by_abs: bool) -> torch.Tensor:
    """Rank of every unit (0 = best) in ``scores`` [L, W], flattened order kept."""
    flat = rank_key(scores, by_abs).flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    out = torch.empty_like(order)
    out[order] = torch.arange(len(order))
    return out.view(scores.shape)


def top_units(scores: torch.Tensor, k: int, by_abs: bool) -> list[tuple[int, int]]:
    """(layer slot, unit index) of the ``k`` best units of ``scores`` [L, W], best first."""
    flat = rank_key(scores, by_abs).flatten()
    order = torch.argsort(flat, descending=True, stable=True)[:k]
    width = scores.shape[1]
    return [(int(i) // width, int(i) % width) for i in order]


def neuron_sets(
    *,
    model_id: str,
    site: str,
    method: str,
    layers: Sequence[int],
    pairs: Sequence[ContrastPair],
    scores: dict[str, torch.Tensor],
    means: dict[str, torch.Tensor],
    k: int,
    source: str = "",
    orders: dict[str, list[tuple[int, int]]] | None = None,
) -> list[NeuronSet]:
    """One set per pair, plus one per kind with two or more pairs (units ranked across pairs).

    A pair's set holds its top ``k`` units by score, or ``orders[pair]`` where a method chose
    them otherwise (``exact``: greedily, together).
    """
    by_abs = method == "effect"
    rank_of = {p.name: ranks(scores[p.name], by_abs) for p in pairs}
    kinds: dict[str, list[ContrastPair]] = {}
    for pair in pairs:
        kinds.setdefault(pair.kind or pair.name, []).append(pair)
    out = []

    def make(
        label: str,
        units: list[tuple[int, int]],
        group: list[ContrastPair],
        score: torch.Tensor,
        mean: torch.Tensor,
    ) -> NeuronSet:
        unit_ranks = {g.name: [int(rank_of[g.name][s, i]) for s, i in units] for g in group}
        stable = [
            sum(r[j] < k for r in unit_ranks.values()) / len(group) for j in range(len(units))
        ]
        return NeuronSet(
            model_id=model_id,
            label=f"{label}.{site}.{method}",
            site=site,
            layers=[int(layers[s]) for s, _ in units],
            indices=[i for _, i in units],
            scores=[float(score[s, i]) for s, i in units],
            method=method,
            pairs=[g.name for g in group],
            means=[float(mean[s, i]) for s, i in units],
            ranks=unit_ranks,
            stability=stable,
            source=source,
        )

    for pair in pairs:
        group = kinds[pair.kind or pair.name]
        units = (orders or {}).get(pair.name) or top_units(scores[pair.name], k, by_abs)
        out.append(make(pair.name, units, group, scores[pair.name], means[pair.name]))
    for kind, group in kinds.items():
        if len(group) < 2:
            continue
        stacked = torch.stack([rank_key(scores[g.name], by_abs) for g in group])
        mean_rank = torch.stack([rank_of[g.name] for g in group]).double().mean(0)
        in_top = torch.stack([rank_of[g.name] < k for g in group]).sum(0).double()
        key = in_top * 1e9 - mean_rank  # most pairs with it in the top k, then best mean rank
        units = top_units(key, k, by_abs=False)
        score = stacked.mean(0) if by_abs else torch.stack([scores[g.name] for g in group]).mean(0)
        mean = torch.stack([means[g.name] for g in group]).mean(0)
        out.append(make(kind, units, group, score, mean))
    return out


def _logits(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head (and its soft-capping, where the model has one) on final hidden states."""
    logits = lm.model.get_output_embeddings()(hidden).float()
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _reply_logprob(
    lm: LoadedModel, hidden: torch.Tensor, ids: torch.Tensor, pred: torch.Tensor
) -> torch.Tensor:
    """Summed log-prob of the tokens after the positions in ``pred`` [B, T] (bool)."""
    b, t = pred.nonzero(as_tuple=True)
    logp = torch.log_softmax(_logits(lm, hidden[b, t]), dim=-1)
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
    with _intervene(lm.sites, [grab]), torch.enable_grad():
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


def _last_prompt_acts(
    lm: LoadedModel, samples: Sequence[Sample], grab: Recorder, grad: bool
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Activations per layer [B, T, W] (left-padded: the prompt ends at -1), and the logits at
    the last prompt position [B, V]."""
    prompts = [Sample(s.persona, s.ids[: s.n_prompt], (), s.n_prompt) for s in samples]
    batch = pad_batch(prompts, int(lm.tokenizer.pad_token_id or 0), "left", lm.device)
    grab.clear()
    with torch.set_grad_enabled(grad):
        out = lm.sites.base(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        logits = _logits(lm, out.last_hidden_state[:, -1])
    return [grab.get(layer) for _, layer in grab.keys], logits


def _by_persona(samples: Sequence[Sample], n_personas: int) -> list[list[Sample]]:
    """``samples`` grouped by persona index, each group in the samples' order."""
    groups: list[list[Sample]] = [[] for _ in range(n_personas)]
    for sample in samples:
        groups[sample.persona].append(sample)
    return groups


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
    by_persona = _by_persona(samples, n_personas)
    n_questions = len(by_persona[0])
    if any(len(group) != n_questions for group in by_persona):
        raise ValueError("patching needs every persona's reply to every question")
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    openers = {}
    for high in {h for h, _ in pairs}:  # the ways the high persona opens its replies
        mask = torch.zeros(vocab, dtype=torch.bool, device=lm.device)
        mask[[s.ids[s.n_prompt] for s in by_persona[high]]] = True
        openers[high] = mask
    width = lm.sites.mlp_width
    shape = (len(layers), width)
    products = torch.zeros((len(pairs), *shape), dtype=torch.float64)
    diffs = torch.zeros_like(products)
    acts = torch.zeros((n_personas, *shape), dtype=torch.float64)
    grab = Recorder.at(site, layers, grad=True)
    questions = dist.shard(list(range(n_questions)))
    bar = tqdm(total=len(questions), desc="patching", disable=not progress, unit="question")
    with _intervene(lm.sites, [grab]):
        for start in range(0, len(questions), batch_size):
            chunk = questions[start : start + batch_size]
            seen: dict[int, torch.Tensor] = {}
            grads: dict[int, torch.Tensor] = {}
            for p in range(n_personas):
                grad = p in openers
                xs, logits = _last_prompt_acts(lm, [by_persona[p][q] for q in chunk], grab, grad)
                seen[p] = torch.stack([x[:, -1].detach().double().cpu() for x in xs], 1)
                if grad:
                    logp = torch.log_softmax(logits, dim=-1)
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


class _PatchLast:
    """Sets chosen units at the last position of every row (left-padded prompts) to fixed values
    and keeps the site's activations there; ``units`` is swapped between forwards."""

    def __init__(self, site: Site, layers: Sequence[int]) -> None:
        self.site = site
        self.layers = list(layers)
        self.units: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.seen: dict[int, torch.Tensor] = {}

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [(self.site, layer) for layer in self.layers]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        self.seen[layer] = x[:, -1].detach()
        patch = self.units.get(layer)
        if patch is None:
            return None
        index, values = patch
        out = x.clone()
        out[:, -1, index] = values.to(out.dtype)
        return out


class _Decision:
    """Every persona's prompts in one left-padded batch, and each row's log-odds of opening the
    way its own persona does, with chosen units patched (see ``exact_selection``)."""

    def __init__(
        self,
        lm: LoadedModel,
        by_persona: Sequence[Sequence[Sample]],
        n_questions: int,
        site: Site,
        layers: Sequence[int],
    ) -> None:
        self.lm = lm
        self.layers = list(layers)
        self.n_personas, self.n_questions = len(by_persona), n_questions
        prompts = [
            Sample(s.persona, s.ids[: s.n_prompt], (), s.n_prompt)
            for group in by_persona
            for s in group[:n_questions]
        ]
        self.batch = pad_batch(prompts, int(lm.tokenizer.pad_token_id or 0), "left", lm.device)
        vocab = lm.model.get_output_embeddings().weight.shape[0]
        own = torch.zeros((self.n_personas, vocab), dtype=torch.bool, device=lm.device)
        for p, group in enumerate(by_persona):  # the ways each persona opens its replies
            own[p, [s.ids[s.n_prompt] for s in group]] = True
        self.own = own.repeat_interleave(n_questions, 0)  # [rows, V]
        self.patch = _PatchLast(site, layers)

    def run(self, units: Sequence[tuple[int, int]], values: torch.Tensor) -> torch.Tensor:
        """Log-odds [personas, questions] with ``units`` (layer slot, index) set to ``values``
        [L, W] at the last prompt token."""
        by_slot: dict[int, list[int]] = {}
        for slot, index in units:
            by_slot.setdefault(slot, []).append(index)
        self.patch.units = {
            self.layers[slot]: (
                torch.tensor(idx, device=values.device),
                values[slot, idx],
            )
            for slot, idx in by_slot.items()
        }
        out = self.lm.sites.base(
            input_ids=self.batch.input_ids,
            attention_mask=self.batch.attention_mask,
            position_ids=self.batch.position_ids,
            use_cache=False,
        )
        logp = torch.log_softmax(_logits(self.lm, out.last_hidden_state[:, -1]).double(), -1)
        own = logp.masked_fill(~self.own, -torch.inf).logsumexp(-1)
        rest = logp.masked_fill(self.own, -torch.inf).logsumexp(-1)
        return (own - rest).view(self.n_personas, self.n_questions).cpu()

    def run_units(
        self, grid: Sequence[tuple[int, int]], values: torch.Tensor, picks: Sequence[int]
    ) -> torch.Tensor:
        """``run`` with the units ``grid[i]`` for ``i`` in ``picks``."""
        return self.run([grid[i] for i in picks], values)

    def activations(self) -> torch.Tensor:
        """Mean activation per persona at the last prompt token [P, L, W], unpatched."""
        self.run([], torch.zeros(0))
        seen = torch.stack([self.patch.seen[layer].double().cpu() for layer in self.layers], 1)
        return seen.view(self.n_personas, self.n_questions, *seen.shape[1:]).mean(1)


# The greedy objectives of ``exact_selection``: how far other personas may sink below their
# unpatched log-odds before it counts (a level), or None: only their distance below ``margin``
# counts, wherever they started. The first keeps units that lower other personas out; the
# second, more lenient, serves pairs where no unit is free of side effects.
OBJECTIVES: tuple[float | None, ...] = (4.5, None)


def _exact_loss(
    logodds: torch.Tensor,
    clean: torch.Tensor,
    high: int,
    others: Sequence[int],
    margin: float,
    weight: float,
    level: float | None,
) -> torch.Tensor:
    """How far the high persona still opens its own way (log-odds above ``-margin``), plus
    ``weight`` times the worst-hit other persona's loss: with a ``level``, how much further below
    it its log-odds went than without the patch (``clean``); without, how far below ``margin``
    it is. Softplus hinges averaged over the questions."""
    hinge = torch.nn.functional.softplus
    loss = hinge(logodds[high] + margin).mean()
    if others:
        rows = list(others)
        if level is None:
            harm = hinge(margin - logodds[rows]).mean(1)
        else:
            harm = (hinge(level - logodds[rows]) - hinge(level - clean[rows])).mean(1)
        loss = loss + weight * harm.max().clamp(min=0)
    return loss


def _flips(logodds: torch.Tensor, high: int, others: Sequence[int], margin: float) -> bool:
    """Whether the high persona opens otherwise on >= 3/4 of the questions while every other
    persona still opens its own way, with log-odds above ``margin / 2``, on >= 95% of them (the
    neuron floor at the decision, with room for questions not seen here)."""
    if float((logodds[high] < 0).double().mean()) < 0.75:
        return False
    return all(float((logodds[o] > margin / 2).double().mean()) >= 0.95 for o in others)


def exact_selection(
    lm: LoadedModel,
    samples: Sequence[Sample],
    pairs: Sequence[tuple[int, int]],
    site: Site,
    layers: Sequence[int],
    n_personas: int,
    *,
    k: int,
    n_questions: int = 16,
    greedy: int = 16,
    candidates: int = 32,
    margin: float = 2.0,
    weight: float = 2.0,
    spare: float = 0.1,
    progress: bool = True,
    dist: Dist | None = None,
) -> tuple[list[torch.Tensor], list[list[tuple[int, int]]], list[torch.Tensor]]:
    """Per pair: the units' specific effects [L, W], the chosen order of the top ``k`` and the
    low persona's values [L, W] (what the set's mean ablation patches in).

    Exact activation patching at the last prompt token, where the first token of the reply is
    chosen. One unit at a time is set to the low persona's mean there, over the first
    ``n_questions`` questions of every persona under its own prompt. A unit's effect on persona
    ``p`` is the drop of ``p``'s log-odds of opening its reply its own way; its score for the pair
    is the effect on the high persona minus the mean effect on the other personas (not the low
    one). Units are then picked greedily among the ``candidates`` best (by score and by effect),
    patched together, minimising ``_exact_loss``: the high persona must stop opening its way
    while the other personas keep theirs. The greedy run stops once ``_flips`` holds on these
    questions (the high persona opens otherwise on 3/4 of them, every other persona keeps its
    opener, with log-odds above ``margin / 2``, on 95%) or after ``greedy`` picks. Each
    objective of ``OBJECTIVES`` is tried; the fewest picks that got there are kept (else the
    first objective's). The set then goes on by score, units that alone lower another persona's
    log-odds by more than ``spare`` coming last: the greedy picks are the set's core (2 to 16
    units on the demo model), and longer prefixes add little.
    Costs one forward of every persona's prompts per unit of ``layers`` (per distinct low
    persona) and per greedy candidate. Under ``dist`` the units are shared out between the
    processes and their effects summed; the greedy picks, cheap, run on every process alike.
    """
    by_persona = _by_persona(samples, n_personas)
    count = min(len(group) for group in by_persona)
    if count == 0:
        raise ValueError("exact patching needs every persona's reply to some question")
    decision = _Decision(lm, by_persona, min(n_questions, count), site, layers)
    width = lm.sites.mlp_width
    n_units = len(layers) * width
    grid = [(slot, index) for slot in range(len(layers)) for index in range(width)]
    dist = dist or Dist()
    mine = range(dist.rank, n_units, dist.world)  # this process's share of the units
    with torch.inference_mode(), _intervene(lm.sites, [decision.patch]):
        acts = decision.activations()
        clean = decision.run([], acts[0])
        base = clean.mean(1)
        effects: dict[int, torch.Tensor] = {}  # per low persona: [L, W, P]
        lows = sorted({low for _, low in pairs})
        bar = tqdm(
            total=len(lows) * len(mine), desc="exact patching", disable=not progress, unit="unit"
        )
        for low in lows:
            values = acts[low].to(lm.device)
            eff = torch.zeros((n_units, n_personas), dtype=torch.float64)
            for i in mine:
                eff[i] = base - decision.run([grid[i]], values).mean(1)
                bar.update(1)
            effects[low] = dist.all_reduce(eff).view(len(layers), width, n_personas)
        bar.close()
        scores, orders, means = [], [], []
        for high, low in tqdm(pairs, desc="greedy units", disable=not progress, unit="pair"):
            eff, values = effects[low], acts[low].to(lm.device)
            others = [p for p in range(n_personas) if p not in (high, low)]
            score = eff[..., high] - (eff[..., others].mean(-1) if others else 0.0)
            flat_score, flat_eff = score.flatten(), eff[..., high].flatten()
            pool = list(
                dict.fromkeys(
                    torch.argsort(flat_score, descending=True, stable=True)[
                        : candidates // 2
                    ].tolist()
                    + torch.argsort(flat_eff, descending=True, stable=True)[:candidates].tolist()
                )
            )[:candidates]
            tries = []  # (got there, picks) per objective
            for level in OBJECTIVES:
                picked, met = _greedy(
                    partial(decision.run_units, grid, values),
                    pool,
                    min(greedy, k),
                    partial(
                        _exact_loss,
                        clean=clean,
                        high=high,
                        others=others,
                        margin=margin,
                        weight=weight,
                        level=level,
                    ),
                    partial(_flips, high=high, others=others, margin=margin),
                )
                tries.append((met, picked))
            reached = [picked for met, picked in tries if met]
            chosen = min(reached, key=len) if reached else tries[0][1]
            # then by score, units that alone lower another persona's log-odds by more than
            # ``spare`` last, so that a longer prefix of the set still spares the others
            harm = eff[..., others].amax(-1).flatten() if others else torch.zeros_like(flat_score)
            taken = set(chosen)
            by_score = torch.argsort(flat_score, descending=True, stable=True).tolist()
            rest = [i for i in by_score if i not in taken and harm[i] <= spare]
            rest += [i for i in by_score if i not in taken and harm[i] > spare]
            orders.append([grid[i] for i in (chosen + rest)[:k]])
            scores.append(score.float())
            means.append(acts[low].float())
    return scores, orders, means


def _greedy(
    run: Callable[[Sequence[int]], torch.Tensor],
    pool: Sequence[int],
    steps: int,
    loss: Callable[[torch.Tensor], torch.Tensor],
    done: Callable[[torch.Tensor], bool],
) -> tuple[list[int], bool]:
    """Up to ``steps`` units of ``pool``, each the one whose addition gives the lowest ``loss``
    of ``run(units)``; stops early once ``done``. Returns the picks and whether it got there."""
    chosen: list[int] = []
    for _ in range(min(steps, len(pool))):
        best: tuple[float, int] | None = None
        for i in pool:
            if i in chosen:
                continue
            value = float(loss(run([*chosen, i])))
            if best is None or value < best[0]:
                best = (value, i)
        assert best is not None
        chosen.append(best[1])
        if done(run(chosen)):
            return chosen, True
    return chosen, False
