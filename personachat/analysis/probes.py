"""Persona signal by layer: linear probes that decode the persona from the residual stream.

Cross-validated logistic-regression accuracy of decoding which persona wrote the prompt, at each
layer, from the residual stream mean-pooled over each token group (``persona``, ``question``,
``answer``; see ``personachat.analysis.groups``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from personachat.activations import Recorder, pad, run_forward
from personachat.analysis.groups import GROUPS, Placement, Prompt, encode_prompt
from personachat.hooks import intervene
from personachat.model import LoadedModel
from personachat.records import Persona


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
        model_id=lm.info.model_id,
        layers=chosen,
        groups=GROUPS,
        accuracy=acc,
        std=std,
        chance=float(np.bincount(labels).max() / len(labels)),
        n_samples=len(labels),
        personas=[p.name for p in personas],
        folds=min(folds, len(questions)),
        placement=placement,
        means=_persona_means(feats, labels, len(personas)),
    )


def _persona_means(feats: np.ndarray, labels: Sequence[int], n: int) -> np.ndarray:
    y = np.asarray(labels)
    return np.stack([feats[y == i].mean(0) for i in range(n)], axis=1)  # [G, P, L, D]
