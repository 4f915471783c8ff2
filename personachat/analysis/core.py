"""Persona analysis: persona space, cross-model comparison, persona collapse, probes and patching.

Pure numbers over records and models, no plotting (``personachat.report`` draws and writes):

- **Persona space** (``persona_space``): at one layer, the cosine-similarity matrix of
  mean-centered persona vectors, a PCA with variance explained, the *assistant axis* (mean of the
  neutral personas minus mean of the role personas) and each persona's projection on it.
  ``compare_spaces`` compares two models' geometries over their shared personas: Pearson and
  Spearman correlation of the upper triangles of their similarity matrices, and Spearman rank
  agreement of the personas' assistant-axis projections.
- **Persona collapse** (``persona_collapse``): for preference questions, each persona's greedy
  answer span and next-token distribution at the answer position; per question the share of
  personas giving the modal answer, mean pairwise Jensen-Shannon divergence (nats) of the answer
  distributions, and a flag when distinct personas give the same answer.
- **Persona signal by layer** (``persona_probe``): cross-validated logistic-regression accuracy
  of decoding the persona from the residual stream at each layer, pooled over three token groups:
  ``persona`` (the persona text), ``question`` (the question text) and ``answer`` (the position
  that predicts the first answer token).
- **Activation patching** (``activation_patching``): residual stream (``residual`` site), MLP
  (``mlp_hidden`` site: the input of the MLP's output projection, which fixes the MLP output at
  that position) and attention (``attn_heads``: the input of the attention output projection;
  one head is its ``head_dim`` slice) patched from persona B's run into persona A's run, one
  layer (or one layer and head) and token group at a time; the score is the fraction of the
  answer logit difference restored, ``(LD_patched - LD_A) / (LD_B - LD_A)`` with
  ``LD = logit[B's answer] - logit[A's answer]``. ``patch_restored`` scores a joint patch of
  several ``PatchSite``s. ``find_circuit`` greedily joins single heads and MLPs until their
  joint patch restores ``goal`` of it and names the nodes as seed 002 asks (``input``,
  ``a{layer}.h{head}``, ``m{layer}``).
- **Controlled contrasts** (``contrasts``): strongly vs mildly different persona pairs, high vs
  low generic-bias questions, persona placed early (system prompt) vs late (after the question).

Layers follow ``personachat.sites.LAYER_CONVENTION`` (layer i = output of decoder block i).
"""

from __future__ import annotations

import itertools
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from tqdm.auto import tqdm

from personachat.activations import Recorder, pad, run_forward
from personachat.hooks import Site, intervene
from personachat.model import LoadedModel
from personachat.prompts import Message, format_chat
from personachat.prompts.tokens import tokenize
from personachat.records import Persona, PersonaVector

log = logging.getLogger(__name__)

GROUPS = ("persona", "question", "answer")
Placement = Literal["early", "late"]
NEUTRAL_CATEGORY = "neutral"
LATE_TEMPLATE = "{question}\n\n(Answer in character. {persona})"


# --------------------------------------------------------------------------------------------
# Persona space


@dataclass(eq=False)
class PersonaSpace:
    """The geometry of a set of persona vectors at one layer (arrays are numpy float64)."""

    model_id: str
    layer: int
    personas: list[str]
    categories: list[str]
    points: np.ndarray  # [P, D] mean-centered persona vectors
    cosine: np.ndarray  # [P, P] cosine similarity of ``points``
    pca: np.ndarray  # [P, k] coordinates on the principal components
    explained: np.ndarray  # [k] share of variance of each component
    neutral: list[str]
    axis: np.ndarray  # [D] mean(neutral) - mean(roles), not normalised
    projection: np.ndarray  # [P] projection of each centered vector on the unit axis
    source: str = ""

    def subset(self, names: Sequence[str]) -> PersonaSpace:
        """The space recomputed over ``names`` only (re-centered)."""
        idx = [self.personas.index(n) for n in names]
        raw = {n: self.points[i] for n, i in zip(names, idx, strict=True)}
        cats = {n: self.categories[i] for n, i in zip(names, idx, strict=True)}
        neutral = [n for n in self.neutral if n in raw]
        return persona_space(
            raw, layer=self.layer, categories=cats, neutral=neutral or None,
            n_components=self.pca.shape[1], model_id=self.model_id, source=self.source,
        )  # fmt: skip

    def ranking(self) -> list[str]:
        """Personas from most assistant-like (largest projection) to least."""
        return [self.personas[i] for i in np.argsort(-self.projection, kind="stable")]


def centered_cosine(x: np.ndarray) -> np.ndarray:
    """[P, P] cosine similarity of the rows of ``x`` after subtracting their mean."""
    c = x - x.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    u = np.divide(c, norms, out=np.zeros_like(c), where=norms > 1e-12)
    return u @ u.T


def pca(x: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """(coordinates [P, k], variance ratio [k]) of the rows of ``x`` (centered here)."""
    c = x - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(c, full_matrices=False)
    k = max(1, min(n_components, len(s)))
    total = float((s**2).sum())
    ratio = (s[:k] ** 2) / total if total > 0 else np.zeros(k)
    return c @ vt[:k].T, ratio


def default_layer(vectors: Sequence[PersonaVector]) -> int:
    """The layer with the highest mean AUC over the vectors, else 65% of the depth (seed 003)."""
    with_metrics = [v.metrics for v in vectors if v.metrics is not None]
    if with_metrics:
        auc = torch.stack([m.auc for m in with_metrics]).mean(0)
        if float(auc.max()) > 0:
            return int(torch.argmax(auc))
    n = vectors[0].n_layers
    return min(n - 1, int(n * 0.65 + 0.5))


def vectors_at_layer(
    vectors: Sequence[PersonaVector], layer: int, *, add_baseline: bool = True
) -> dict[str, np.ndarray]:
    """``{persona: [D]}`` at ``layer``; the shared named baseline is added as the zero vector.

    Difference-of-means vectors of a named baseline (e.g. ``default``) leave the baseline out;
    its vector is zero by definition, and mean-centering then places it correctly.
    """
    if not vectors:
        raise ValueError("no persona vectors given; extract some first (scripts/extract.py)")
    out = {v.persona: v.vector[layer].double().numpy() for v in vectors}
    baselines = {v.baseline for v in vectors}
    if add_baseline and len(baselines) == 1:
        base = next(iter(baselines))
        if base not in out and base != "mean":
            out = {base: np.zeros_like(next(iter(out.values()))), **out}
    return out


def neutral_personas(names: Sequence[str], categories: Sequence[str]) -> list[str]:
    """Personas of category ``neutral``; else those named ``default*`` or ``assistant``."""
    by_cat = [n for n, c in zip(names, categories, strict=True) if c == NEUTRAL_CATEGORY]
    if by_cat:
        return by_cat
    return [n for n in names if n.startswith("default") or n == "assistant"]


def persona_space(
    vectors: Sequence[PersonaVector] | Mapping[str, np.ndarray | torch.Tensor],
    *,
    layer: int | None = None,
    categories: Mapping[str, str] | None = None,
    neutral: Sequence[str] | None = None,
    n_components: int = 3,
    model_id: str = "",
    source: str = "",
) -> PersonaSpace:
    """Persona space at ``layer`` from stored vectors or from ``{name: [D] or [L, D]}`` arrays."""
    if isinstance(vectors, Mapping):
        raw = {k: np.asarray(v, dtype=np.float64) for k, v in vectors.items()}
        if layer is not None:
            raw = {k: v[layer] if v.ndim == 2 else v for k, v in raw.items()}
        layer = -1 if layer is None else layer
    else:
        layer = default_layer(vectors) if layer is None else layer
        raw = vectors_at_layer(vectors, layer)
        model_id = model_id or vectors[0].model_id
        source = (
            source or f"stored vectors ({vectors[0].positions}, baseline {vectors[0].baseline})"
        )
    names = list(raw)
    if len(names) < 3:
        raise ValueError(f"persona space needs at least 3 personas, got {names}")
    x = np.stack([raw[n] for n in names])
    if x.ndim != 2:
        raise ValueError(f"persona vectors must be [D] at one layer; got shape {x.shape[1:]}")
    cats = [(categories or {}).get(n, "") for n in names]
    neutral_list = list(neutral) if neutral is not None else neutral_personas(names, cats)
    unknown = [n for n in neutral_list if n not in names]
    if unknown:
        raise ValueError(f"neutral personas {unknown} are not among {names}")
    roles = [n for n in names if n not in neutral_list]
    if not neutral_list or not roles:
        raise ValueError(
            f"the assistant axis needs neutral and role personas; neutral={neutral_list}, "
            f"personas={names}. Pass neutral=[...] or give personas the category 'neutral'"
        )
    centered = x - x.mean(axis=0, keepdims=True)
    ni = [names.index(n) for n in neutral_list]
    ri = [names.index(n) for n in roles]
    axis = centered[ni].mean(0) - centered[ri].mean(0)
    norm = float(np.linalg.norm(axis))
    projection = centered @ (axis / norm) if norm > 0 else np.zeros(len(names))
    coords, ratio = pca(x, n_components)
    return PersonaSpace(
        model_id=model_id, layer=layer, personas=names, categories=cats, points=centered,
        cosine=centered_cosine(x), pca=coords, explained=ratio, neutral=neutral_list, axis=axis,
        projection=projection, source=source,
    )  # fmt: skip


@dataclass(frozen=True)
class SpaceComparison:
    """How similar two models' persona geometries are over their shared personas."""

    model_a: str
    model_b: str
    personas: list[str]
    pearson: float  # of the upper triangles of the two cosine matrices
    spearman: float
    axis_spearman: float  # rank agreement of the assistant-axis projections
    ranks_a: dict[str, int]  # 0 = most assistant-like
    ranks_b: dict[str, int]

    def rank_shift(self) -> dict[str, int]:
        """Per persona: rank in B minus rank in A."""
        return {n: self.ranks_b[n] - self.ranks_a[n] for n in self.personas}


def upper_triangle(m: np.ndarray) -> np.ndarray:
    return m[np.triu_indices(m.shape[0], k=1)]


def compare_spaces(a: PersonaSpace, b: PersonaSpace) -> SpaceComparison:
    """Compare two persona spaces over the personas both have (each re-centered on them)."""
    shared = [n for n in a.personas if n in b.personas]
    if len(shared) < 3:
        raise ValueError(
            f"need at least 3 shared personas to compare {a.model_id!r} and {b.model_id!r}; "
            f"shared: {shared}"
        )
    sa, sb = a.subset(shared), b.subset(shared)
    ua, ub = upper_triangle(sa.cosine), upper_triangle(sb.cosine)
    ranks_a = {n: r for r, n in enumerate(sa.ranking())}
    ranks_b = {n: r for r, n in enumerate(sb.ranking())}
    return SpaceComparison(
        model_a=a.model_id, model_b=b.model_id, personas=shared,
        pearson=_corr(pearsonr, ua, ub), spearman=_corr(spearmanr, ua, ub),
        axis_spearman=_corr(spearmanr, sa.projection, sb.projection),
        ranks_a=ranks_a, ranks_b=ranks_b,
    )  # fmt: skip


def _corr(fn: Any, x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(fn(x, y)[0])


# --------------------------------------------------------------------------------------------
# Prompts with token groups


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt with the token spans of the persona text and the question text."""

    ids: tuple[int, ...]
    persona_span: tuple[int, int]
    question_span: tuple[int, int]

    @property
    def answer_pos(self) -> int:
        return len(self.ids) - 1

    def group(self, name: str) -> list[int]:
        """Token positions of a group (``persona``, ``question`` or ``answer``)."""
        if name == "answer":
            return [self.answer_pos]
        span = self.persona_span if name == "persona" else self.question_span
        if name not in GROUPS:
            raise ValueError(f"unknown token group {name!r}; use one of {GROUPS}")
        return list(range(*span))


def persona_messages_at(persona: Persona, question: str, placement: Placement) -> list[Message]:
    """Messages with the persona as system prompt (``early``) or after the question (``late``)."""
    if not persona.system_prompt:
        return [{"role": "user", "content": question}]
    if placement == "early":
        return [
            {"role": "system", "content": persona.system_prompt},
            {"role": "user", "content": question},
        ]
    text = LATE_TEMPLATE.format(question=question, persona=persona.system_prompt)
    return [{"role": "user", "content": text}]


def encode_prompt(
    lm: LoadedModel,
    persona: Persona,
    question: str,
    answer_prefix: str = "",
    placement: Placement = "early",
) -> Prompt:
    """Chat-format and tokenize one prompt (plus the forced start of the reply) with its spans.

    A persona without a system prompt (the model's default) has as persona span the chat tokens
    before the question (at least one token), so every sample has all three groups.
    """
    tok = lm.tokenizer
    text = format_chat(tok, persona_messages_at(persona, question, placement)) + answer_prefix
    special = not bool(getattr(tok, "chat_template", None))
    q_start = text.rfind(question)
    p_start = text.find(persona.system_prompt) if persona.system_prompt else -1
    tokens = tokenize(tok, text, add_special_tokens=special)
    ids, at = tokens.ids, tokens.token_at
    q_span = (at(q_start), max(at(q_start + len(question) - 1) + 1, at(q_start) + 1))
    if p_start >= 0:
        p_span = (at(p_start), at(p_start + len(persona.system_prompt) - 1) + 1)
    else:
        p_span = (0, max(1, q_span[0]))
    return Prompt(ids=tuple(ids), persona_span=p_span, question_span=q_span)


# --------------------------------------------------------------------------------------------
# Persona signal by layer (linear probes)


@dataclass(eq=False)
class ProbeResult:
    """Cross-validated persona-probe accuracy per token group and layer."""

    model_id: str
    layers: list[int]
    groups: tuple[str, ...]
    accuracy: np.ndarray  # [G, L] mean accuracy over folds
    std: np.ndarray  # [G, L]
    chance: float  # share of the most frequent persona
    n_samples: int
    personas: list[str]
    folds: int
    placement: str = "early"
    means: np.ndarray | None = None  # [G, P, L, D] per-persona mean features (persona space)

    def curve(self, group: str) -> np.ndarray:
        return self.accuracy[self.groups.index(group)]

    def decodable_layers(self, group: str, threshold: float = 0.9) -> list[int]:
        return [
            la for la, acc in zip(self.layers, self.curve(group), strict=True) if acc >= threshold
        ]


def collect_group_features(
    lm: LoadedModel,
    prompts: Sequence[Prompt],
    layers: Sequence[int] | None = None,
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> np.ndarray:
    """[N, G, L, D] float32 residual stream per prompt, mean-pooled over each token group."""
    chosen = list(range(lm.sites.n_layers)) if layers is None else list(layers)
    out = np.zeros((len(prompts), len(GROUPS), len(chosen), lm.sites.hidden_size), np.float32)
    pad_id = int(lm.tokenizer.pad_token_id or 0)
    rec = Recorder.at("residual", chosen, stop=True)
    starts = range(0, len(prompts), batch_size)
    with intervene(lm.sites, [rec]), torch.inference_mode():
        for start in tqdm(starts, desc="probe activations", disable=not progress):
            chunk = prompts[start : start + batch_size]
            batch = pad([p.ids for p in chunk], pad_id, "left", lm.device)
            run_forward(lm, batch)
            for li, layer in enumerate(chosen):
                acts = rec.get(layer).cpu()
                for b, (p, off) in enumerate(zip(chunk, batch.offsets, strict=True)):
                    for g, name in enumerate(GROUPS):
                        idx = [off + i for i in p.group(name)]
                        out[start + b, g, li] = acts[b, idx].mean(0).numpy()
    return out


def probe_accuracy(
    features: np.ndarray, labels: Sequence[int], *, folds: int = 5, seed: int = 0
) -> tuple[float, float]:
    """(mean, std) stratified k-fold accuracy of a logistic-regression probe on ``features``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels)
    k = min(folds, int(np.bincount(y).min()))
    if k < 2:
        raise ValueError(
            f"every persona needs >= 2 samples for cross-validation; counts {np.bincount(y)}"
        )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    scores = cross_val_score(model, features, y, cv=cv)
    return float(scores.mean()), float(scores.std())


def persona_probe(
    lm: LoadedModel,
    personas: Sequence[Persona],
    questions: Sequence[str],
    *,
    answer_prefix: str | Sequence[str] = "",
    layers: Sequence[int] | None = None,
    placement: Placement = "early",
    folds: int = 5,
    batch_size: int = 16,
    progress: bool = False,
) -> ProbeResult:
    """Decode the persona from each layer and token group across ``questions`` (cross-validated).

    ``answer_prefix`` (one, or one per question) is appended after the assistant header, so the
    ``answer`` group is the position that predicts the first answer token.
    """
    prefixes = (
        [answer_prefix] * len(questions) if isinstance(answer_prefix, str) else list(answer_prefix)
    )
    if len(prefixes) != len(questions):
        raise ValueError(f"got {len(questions)} questions but {len(prefixes)} answer prefixes")
    if len(personas) < 2:
        raise ValueError(f"the probe needs at least 2 personas, got {[p.name for p in personas]}")
    prompts, labels = [], []
    for i, persona in enumerate(personas):
        for q, prefix in zip(questions, prefixes, strict=True):
            prompts.append(encode_prompt(lm, persona, q, prefix, placement))
            labels.append(i)
    chosen = list(range(lm.sites.n_layers)) if layers is None else list(layers)
    feats = collect_group_features(lm, prompts, chosen, batch_size=batch_size, progress=progress)
    acc = np.zeros((len(GROUPS), len(chosen)))
    std = np.zeros_like(acc)
    cells = list(itertools.product(range(len(GROUPS)), range(len(chosen))))
    for g, li in tqdm(cells, desc="probes", disable=not progress):
        acc[g, li], std[g, li] = probe_accuracy(feats[:, g, li], labels, folds=folds)
    return ProbeResult(
        model_id=lm.info.model_id, layers=chosen, groups=GROUPS, accuracy=acc, std=std,
        chance=float(np.bincount(labels).max() / len(labels)), n_samples=len(labels),
        personas=[p.name for p in personas], folds=min(folds, len(questions)),
        placement=placement, means=_persona_means(feats, labels, len(personas)),
    )  # fmt: skip


def _persona_means(feats: np.ndarray, labels: Sequence[int], n: int) -> np.ndarray:
    y = np.asarray(labels)
    return np.stack([feats[y == i].mean(0) for i in range(n)], axis=1)  # [G, P, L, D]


# --------------------------------------------------------------------------------------------
# Persona collapse


@dataclass(frozen=True)
class PreferenceItem:
    """A preference ('favourite X') asked in several phrasings.

    ``answer_prefix`` is forced as the start of the reply (the answer follows it directly);
    ``answer_pattern`` is a regex whose first group picks the answer out of a free reply (for
    models that answer after an opener). With neither, the answer is the reply's first clause.
    """

    key: str
    questions: tuple[str, ...]
    answer_prefix: str = ""
    answer_pattern: str = ""


def default_preferences() -> list[PreferenceItem]:
    """A small general-purpose set of preference questions, with a forced answer prefix."""
    keys = ("dessert", "colour", "season", "animal", "drink", "pastime", "music genre", "city")
    templates = (
        "What is your favourite {k}?",
        "Which {k} do you like best?",
        "Tell me your favourite {k}.",
    )
    return [
        PreferenceItem(k, tuple(t.format(k=k) for t in templates), f"My favourite {k} is")
        for k in keys
    ]


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


@dataclass(eq=False)
class QuestionCollapse:
    """Collapse of one preference across personas."""

    key: str
    answers: dict[str, str]  # persona -> its most frequent answer over the phrasings
    modal_answer: str
    modal_share: float  # share of personas whose answer is the modal answer
    n_distinct: int  # number of distinct answers across personas
    token_js: float  # mean pairwise JS divergence (nats) of next-token distributions
    span_js: float  # mean pairwise JS divergence of answer-span distributions over phrasings
    collapsed: bool
    collapsed_personas: list[str]  # give the modal answer
    distinct_personas: list[str]  # give another answer
    generic_prob: float = float("nan")  # neutral persona's probability of the modal first token
    answered: float = 1.0  # share of replies in which an answer span was found


@dataclass(eq=False)
class CollapseResult:
    model_id: str
    personas: list[str]
    questions: list[QuestionCollapse]
    answers: list[Answer]
    threshold: float
    placement: str = "early"

    @property
    def n_collapsed(self) -> int:
        return sum(q.collapsed for q in self.questions)

    def question(self, key: str) -> QuestionCollapse:
        for q in self.questions:
            if q.key == key:
                return q
        raise KeyError(f"no preference {key!r}; known: {[q.key for q in self.questions]}")


def normalise_answer(span: str) -> str:
    """Lower-case, first clause, without surrounding spaces, quotes and punctuation."""
    first = re.split(r"[.,!?;:\n]", span.strip(), maxsplit=1)[0]
    return first.strip().strip("\"'*").lower()


def js_divergence(p: Mapping[Any, float], q: Mapping[Any, float]) -> float:
    """Jensen-Shannon divergence (nats) of two sparse distributions; missing mass is one bucket."""
    keys = set(p) | set(q)
    pa = np.array([p.get(k, 0.0) for k in keys] + [max(0.0, 1 - sum(p.values()))])
    qa = np.array([q.get(k, 0.0) for k in keys] + [max(0.0, 1 - sum(q.values()))])
    pa, qa = pa / pa.sum(), qa / qa.sum()
    m = (pa + qa) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log(a[nz] / m[nz])).sum())

    return 0.5 * kl(pa) + 0.5 * kl(qa)


def mean_pairwise_js(dists: Sequence[Mapping[Any, float]]) -> float:
    pairs = list(itertools.combinations(dists, 2))
    return float(np.mean([js_divergence(a, b) for a, b in pairs])) if pairs else 0.0


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
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                do_sample=False, output_logits=True, return_dict_in_generate=True,
                pad_token_id=pad_id, eos_token_id=eos,
            )  # fmt: skip
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


def collapse_from_answers(
    answers: Sequence[Answer],
    *,
    threshold: float = 0.5,
    neutral: str | None = None,
    model_id: str = "",
    placement: str = "early",
) -> CollapseResult:
    """Per preference: modal answer share, divergences and collapse flags from ``answers``.

    A preference is *collapsed* when at least two personas give the modal answer and their share
    is >= ``threshold``. ``neutral`` (e.g. ``default``) gives the generic-bias probability.
    """
    personas = list(dict.fromkeys(a.persona for a in answers))
    keys = list(dict.fromkeys(a.key for a in answers))
    rows = []
    for key in keys:
        mine = [a for a in answers if a.key == key]
        per: dict[str, list[Answer]] = {p: [a for a in mine if a.persona == p] for p in personas}
        modal_of = {p: _modal([a.answer for a in rows_p]) for p, rows_p in per.items()}
        counts = Counter(v for v in modal_of.values() if v)  # "" = no answer found
        modal, n_modal = counts.most_common(1)[0] if counts else ("", 0)
        share = n_modal / len(personas)
        phrasings = list(dict.fromkeys(a.question for a in mine))
        token_js = float(np.mean([
            mean_pairwise_js([a.top for a in mine if a.question == q]) for q in phrasings
        ]))  # fmt: skip
        span_js = mean_pairwise_js([_freq([a.answer for a in per[p]]) for p in personas])
        gp = float("nan")
        if neutral is not None and per.get(neutral):
            first = Counter(a.first_token for a in mine if a.answer == modal).most_common(1)
            if first:
                gp = float(np.mean([a.top.get(first[0][0], 0.0) for a in per[neutral]]))
        rows.append(
            QuestionCollapse(
                key=key,
                answers=modal_of,
                modal_answer=modal,
                modal_share=share,
                n_distinct=len(counts),
                token_js=token_js,
                span_js=span_js,
                collapsed=n_modal >= 2 and share >= threshold,
                collapsed_personas=[p for p in personas if modal and modal_of[p] == modal],
                distinct_personas=[p for p in personas if modal_of[p] and modal_of[p] != modal],
                generic_prob=gp,
                answered=sum(bool(a.answer) for a in mine) / len(mine),
            )
        )
    return CollapseResult(model_id, personas, rows, list(answers), threshold, placement)


def _modal(values: Sequence[str]) -> str:
    """The most frequent non-empty value (ties: the first seen); "" when all are empty."""
    counts = Counter(v for v in values if v)
    if not counts:
        return ""
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)  # ties: first seen


def _freq(values: Sequence[str]) -> dict[str, float]:
    counts = Counter(values)
    return {k: c / len(values) for k, c in counts.items()}


def persona_collapse(
    lm: LoadedModel,
    personas: Sequence[Persona],
    items: Sequence[PreferenceItem],
    *,
    threshold: float = 0.5,
    neutral: str | None = None,
    placement: Placement = "early",
    max_new_tokens: int = 24,
    batch_size: int = 16,
    progress: bool = False,
) -> CollapseResult:
    """Generate every persona's answers to ``items`` and measure collapse per preference."""
    if len(personas) < 2:
        raise ValueError(f"collapse needs at least 2 personas, got {[p.name for p in personas]}")
    if neutral is None:
        names = [p.name for p in personas]
        found = neutral_personas(names, [p.category for p in personas])
        neutral = found[0] if found else None
    answers = generate_answers(
        lm, personas, items, placement=placement, max_new_tokens=max_new_tokens,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    return collapse_from_answers(
        answers, threshold=threshold, neutral=neutral, model_id=lm.info.model_id,
        placement=placement,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Activation patching


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
        """Seed 002's node name: ``a{layer}.h{head}`` or ``m{layer}``."""
        if self.site == "attn_heads" and self.head is not None:
            return f"a{self.layer}.h{self.head}"
        if self.site == "mlp_hidden":
            return f"m{self.layer}"
        raise ValueError(f"{self} has no seed-002 node name (only single heads and MLPs do)")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"site": self.site, "layer": self.layer, "group": self.group}
        if self.head is not None:
            out["head"] = self.head
        return out


# One patch in one batch row: (site, layer, target positions, source positions, columns).
_Patch = tuple[Site, int, list[int], list[int], slice]


class _Patcher:
    """Writes cached source values into rows of the batch; ``rows[r]`` lists row r's patches."""

    def __init__(
        self, rows: Sequence[Sequence[_Patch]], cache: Mapping[tuple[Site, int], torch.Tensor]
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


def _group_positions(a: Prompt, b: Prompt, group: str) -> tuple[list[int], list[int]] | str:
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
class _PatchRuns:
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


def _clean_runs(
    lm: LoadedModel,
    target: Persona,
    source: Persona,
    question: str,
    sites: Sequence[Site],
    answer_prefix: str,
    placement: Placement,
) -> _PatchRuns:
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
    return _PatchRuns(a, b, cache, tok_a, tok_b, same, ld_a, ld_b)


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
    runs = _clean_runs(lm, target, source, question, cache_sites, answer_prefix, placement)
    layers = list(range(lm.sites.n_layers))
    result = PatchingResult(
        model_id=lm.info.model_id, target=target.name, source=source.name, question=question,
        answer_a=str(lm.tokenizer.decode([runs.token_a])),
        answer_b=str(lm.tokenizer.decode([runs.token_b])), same_answer=runs.same,
        token_a=runs.token_a, token_b=runs.token_b, ld_a=runs.ld_a, ld_b=runs.ld_b, layers=layers,
    )  # fmt: skip
    every = slice(None)
    for group in groups:
        aligned = _group_positions(runs.a, runs.b, group)
        if isinstance(aligned, str):
            result.skipped[group] = aligned
            continue
        ta, sb = aligned
        for site in sites:
            rows = [[(site, la, ta, sb, every)] for la in layers]
            logits = _patched_logits(lm, runs.a, rows, runs.cache, batch_size)
            result.restored[(site, group)] = runs.restored(logits)
        if heads:
            n_heads = lm.sites.n_heads or 0
            rows = [
                [("attn_heads", la, ta, sb, lm.sites.head_slice(h))]
                for la in layers
                for h in range(n_heads)
            ]
            logits = _patched_logits(lm, runs.a, rows, runs.cache, batch_size)
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
    runs = _clean_runs(lm, target, source, question, needed, answer_prefix, placement)
    row = []
    for p in patches:
        aligned = _group_positions(runs.a, runs.b, p.group)
        if isinstance(aligned, str):
            raise ValueError(f"cannot patch {p}: {aligned}")
        cols = slice(None) if p.head is None else lm.sites.head_slice(p.head)
        row.append((p.site, lm.sites.check_layer(p.layer), *aligned, cols))
    return float(runs.restored(_patched_logits(lm, runs.a, [row], runs.cache))[0])


def _patched_logits(
    lm: LoadedModel,
    a: Prompt,
    rows: Sequence[Sequence[_Patch]],
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


@dataclass(frozen=True)
class Circuit:
    """A small set of sites whose joint patch restores most of the answer difference."""

    nodes: list[str]  # seed 002 names: "input", "a{layer}.h{head}", "m{layer}"
    sites: list[PatchSite]  # patched together, in the order they were chosen
    restored: float  # joint restored fraction
    target: float

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "sites": [s.to_json() for s in self.sites],
            "restored": round(self.restored, 4),
            "target": self.target,
        }


def _node_order(node: str) -> tuple[int, int, int]:
    """Sort key: by layer, attention heads before the MLP of the same layer, then head."""
    if node == "input":
        return (-1, 0, 0)
    if node.startswith("m"):
        return (int(node[1:]), 1, 0)
    layer, head = node[1:].split(".h")
    return (int(layer), 0, int(head))


def circuit_candidates(patching: PatchingResult) -> list[tuple[float, PatchSite]]:
    """Single MLP sites and single heads with their restored fraction, best first."""
    cands = [
        (float(v), PatchSite("mlp_hidden", la, g))
        for (s, g), curve in patching.restored.items() if s == "mlp_hidden"
        for la, v in zip(patching.layers, curve, strict=True) if np.isfinite(v)
    ]  # fmt: skip
    for g, grid in patching.heads.items():
        for i, la in enumerate(patching.layers):
            cands += [
                (float(v), PatchSite("attn_heads", la, g, h))
                for h, v in enumerate(grid[i])
                if np.isfinite(v)
            ]
    return sorted(cands, key=lambda c: -c[0])


def find_circuit(
    lm: LoadedModel,
    target: Persona,
    source: Persona,
    question: str,
    patching: PatchingResult,
    *,
    answer_prefix: str = "",
    placement: Placement = "early",
    goal: float = 0.8,
    max_sites: int = 6,
) -> Circuit | None:
    """Greedily join the best single sites (MLPs ``m{layer}`` and, where ``patching`` has
    per-head results, attention heads ``a{layer}.h{head}``) by their single-site restoration
    until the joint patch of them restores ``goal`` of the logit difference; ``None`` when
    ``max_sites`` do not suffice.
    """
    needed: list[Site] = ["mlp_hidden", "attn_heads"] if patching.heads else ["mlp_hidden"]
    runs = _clean_runs(lm, target, source, question, needed, answer_prefix, placement)
    runs.token_a, runs.token_b = patching.token_a, patching.token_b
    runs.ld_a, runs.ld_b = patching.ld_a, patching.ld_b
    chosen: list[PatchSite] = []
    row: list[_Patch] = []
    for _, site in circuit_candidates(patching)[:max_sites]:
        aligned = _group_positions(runs.a, runs.b, site.group)
        if isinstance(aligned, str):
            continue
        cols = slice(None) if site.head is None else lm.sites.head_slice(site.head)
        chosen.append(site)
        row.append((site.site, site.layer, *aligned, cols))
        joint = float(runs.restored(_patched_logits(lm, runs.a, [row], runs.cache))[0])
        if joint >= goal:
            nodes = sorted({s.node for s in chosen}, key=_node_order)
            return Circuit(nodes=["input", *nodes], sites=chosen, restored=joint, target=goal)
    return None


# --------------------------------------------------------------------------------------------
# Controlled contrasts


@dataclass(frozen=True)
class PairStats:
    """How alike two personas answer: share of preferences with the same answer, mean JS."""

    a: str
    b: str
    cosine: float
    agreement: float
    token_js: float


@dataclass(eq=False)
class Contrasts:
    """Seed 002's contrasts: persona distance, generic bias, placement of the persona."""

    strong: list[PairStats]  # the most different persona pairs (lowest cosine)
    mild: list[PairStats]  # the most similar pairs (highest cosine)
    high_bias: list[str]  # preferences with the strongest generic prior
    low_bias: list[str]
    share_high_bias: float  # mean modal share on high-bias preferences
    share_low_bias: float
    early: dict[str, float]  # n_collapsed, mean modal share, mean token JS (persona early)
    late: dict[str, float] | None  # the same with the persona after the question
    late_own_kept: float = float("nan")  # share of early own answers that survive placing late

    @staticmethod
    def mean(pairs: Sequence[PairStats], attr: str) -> float:
        values = [getattr(p, attr) for p in pairs if np.isfinite(getattr(p, attr))]
        return float(np.mean(values)) if values else float("nan")


def pair_stats(collapse: CollapseResult, a: str, b: str, cosine: float = float("nan")) -> PairStats:
    """Agreement and next-token JS of personas ``a`` and ``b`` over all preferences."""
    answered = [q for q in collapse.questions if q.answers[a] and q.answers[b]]
    same = [q.answers[a] == q.answers[b] for q in answered]
    by = {(x.persona, x.question): x for x in collapse.answers}
    phrasings = list(dict.fromkeys(x.question for x in collapse.answers))
    js = [js_divergence(by[(a, q)].top, by[(b, q)].top) for q in phrasings]
    agreement = float(np.mean(same)) if same else float("nan")
    return PairStats(a, b, cosine, agreement, float(np.mean(js)))


def collapse_summary(collapse: CollapseResult) -> dict[str, float]:
    qs = collapse.questions
    return {
        "n_collapsed": float(collapse.n_collapsed),
        "n_questions": float(len(qs)),
        "modal_share": float(np.mean([q.modal_share for q in qs])),
        "token_js": float(np.mean([q.token_js for q in qs])),
        "answered": float(np.mean([q.answered for q in qs])),
    }


def own_answers_kept(early: CollapseResult, late: CollapseResult) -> float:
    """Share of (persona, preference) own answers under ``early`` that ``late`` reproduces."""
    own = [(q.key, p, q.answers[p]) for q in early.questions for p in q.distinct_personas]
    if not own:
        return float("nan")
    return float(np.mean([late.question(k).answers.get(p) == a for k, p, a in own]))


def contrasts(
    collapse: CollapseResult,
    space: PersonaSpace | None = None,
    late: CollapseResult | None = None,
    *,
    n_pairs: int = 5,
) -> Contrasts:
    """Strong vs mild persona pairs (by persona-space cosine), high vs low generic-bias
    preferences (by the neutral persona's probability of the modal answer), early vs late
    persona placement (when ``late`` is given)."""
    names = [n for n in collapse.personas if space is None or n in space.personas]
    stats = []
    for a, b in itertools.combinations(names, 2):
        cos = (
            float(space.cosine[space.personas.index(a), space.personas.index(b)])
            if space
            else float("nan")
        )
        stats.append(pair_stats(collapse, a, b, cos))
    stats.sort(key=lambda p: p.cosine)
    k = min(n_pairs, len(stats) // 2)
    strong, mild = (stats[:k], stats[-k:]) if space is not None and k else ([], [])
    qs = [q for q in collapse.questions if np.isfinite(q.generic_prob)]
    qs.sort(key=lambda q: -q.generic_prob)
    half = len(qs) // 2
    high, low = qs[:half], qs[len(qs) - half :]

    def share(rows: Sequence[QuestionCollapse]) -> float:
        return float(np.mean([q.modal_share for q in rows])) if rows else float("nan")

    return Contrasts(
        strong=strong, mild=mild, high_bias=[q.key for q in high], low_bias=[q.key for q in low],
        share_high_bias=share(high), share_low_bias=share(low),
        early=collapse_summary(collapse), late=collapse_summary(late) if late else None,
        late_own_kept=own_answers_kept(collapse, late) if late else float("nan"),
    )  # fmt: skip
