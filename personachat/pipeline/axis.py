"""The assistant axis of a model as an ordinary persona vector: from the role personas toward the
default assistant, with its metrics and its reference distribution.

Two ways to read it from a dataset's personas (one capture of every persona's prompts):

- ``axis_means``: the mean of the neutral personas' means minus the mean of the role personas'
  means, per layer (neutral: category ``neutral``, else those named ``default*``/``assistant``);
- ``axis_pc1``: the first principal component of the mean-centred persona means, per layer,
  oriented so the neutral personas project above the role personas.

It is stored like a persona vector: persona ``assistant_axis``, baseline ``roles``, method the way
it was read. Its reference distribution (``ProjectionQuantiles``) holds the neutral personas'
samples as ``persona`` and the role personas' as ``baseline``, so capping the assistant axis at
a percentile of the assistant's own projections is ``CapSpec("assistant_axis", side="above",
percentile=..., reference="persona")``.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import torch

from personachat.activations import Capture, CaptureSpec, build_samples, capture
from personachat.model import LoadedModel
from personachat.pipeline.selection import check_layers
from personachat.prompts import DatasetError, PersonaDataset, conditions
from personachat.records import Persona, PersonaMeans, PersonaVector
from personachat.vectors import layer_metrics, neutral_personas, project, projection_quantiles

AXIS_PERSONA = "assistant_axis"
AXIS_BASELINE = "roles"
AXIS_METHODS = ("axis_means", "axis_pc1")


def axis_personas(source: str) -> list[Persona]:
    """The store's rows for the axis and its baseline (they have no system prompt of their own)."""
    return [
        Persona(
            AXIS_PERSONA, "", "from the role personas toward the default assistant", "axis", source
        ),
        Persona(
            AXIS_BASELINE, "", "the role personas the assistant axis starts from", "axis", source
        ),
    ]


def split_personas(dataset: PersonaDataset) -> tuple[list[int], list[int]]:
    """(neutral, role) persona indices of ``dataset``; an error when either side is empty."""
    names = dataset.persona_names
    neutral = set(neutral_personas(names, [p.category for p in dataset.personas]))
    inside = [i for i, n in enumerate(names) if n in neutral]
    roles = [i for i, n in enumerate(names) if n not in neutral]
    if not inside or not roles:
        raise DatasetError(
            f"the assistant axis runs from role personas to neutral ones; {dataset.name!r} has "
            f"neutral {sorted(neutral)} and roles {[names[i] for i in roles]}: give a dataset "
            "with both (a 'neutral' category, or personas named default*/assistant)"
        )
    return inside, roles


def axis_direction(
    means: torch.Tensor, neutral: list[int], roles: list[int], method: str
) -> torch.Tensor:
    """[L, D] the axis from per-persona means [P, L, D] (see the module for the methods)."""
    toward = means[neutral].mean(0) - means[roles].mean(0)
    if method == "axis_means":
        return toward
    if method != "axis_pc1":
        raise ValueError(f"unknown assistant-axis method {method!r}; use one of {AXIS_METHODS}")
    centred = means - means.mean(0, keepdim=True)  # [P, L, D]
    out = torch.zeros_like(toward)
    for layer in range(means.shape[1]):
        _, _, v = torch.linalg.svd(centred[:, layer], full_matrices=False)
        pc1 = v[0]
        sign = 1.0 if float(pc1 @ toward[layer]) >= 0 else -1.0
        out[layer] = sign * pc1 * toward[layer].norm()  # the PC1 direction, the means' length
    return out


def extract_axis(
    lm: LoadedModel,
    dataset: PersonaDataset,
    *,
    positions: str = "question_span",
    method: str = "axis_means",
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[PersonaVector, PersonaMeans]:
    """The assistant axis of ``lm`` read from ``dataset``'s prompts at ``positions`` (a prompt
    position: ``question_span``, ``prompt_last`` or ``prompt_avg``), and the role personas'
    mean activation there (the axis' baseline, for mean directional ablation)."""
    if positions == "response_avg":
        raise ValueError("read the assistant axis from prompt positions (question_span, ...)")
    if method not in AXIS_METHODS:
        raise ValueError(f"unknown assistant-axis method {method!r}; use one of {AXIS_METHODS}")
    neutral, roles = split_personas(dataset)
    with _capture(lm, dataset, positions, batch_size, progress) as cap:
        means = cap.means()[0].float()  # [P, L, D]
        axis = axis_direction(means, neutral, roles, method)
        personas, proj = _projections(cap, axis)
        resid = (cap.norm_sums.sum(1) / cap.counts.sum().clamp(min=1))[0]
    pos, neg = proj[np.isin(personas, neutral)], proj[np.isin(personas, roles)]
    render = conditions(lm.tokenizer).to_json()
    vector = PersonaVector(
        model_id=lm.info.model_id,
        persona=AXIS_PERSONA,
        vector=axis,
        method=method,
        positions=positions,
        baseline=AXIS_BASELINE,
        dataset=dataset.name,
        dataset_sha256=dataset.sha256,
        n_samples=len(pos),
        metrics=layer_metrics(axis, pos, neg, resid.float()),
        created_at=datetime.now(UTC),
        render=render,
        quantiles=projection_quantiles(pos, neg, axis.shape[0]),
    )
    role_mean = PersonaMeans(
        lm.info.model_id,
        AXIS_BASELINE,
        positions,
        means[roles].mean(0),
        len(neg),
        dataset.name,
        dataset.sha256,
        render=render,
    )
    vector.baseline_mean = role_mean.mean
    return vector, role_mean


def _capture(
    lm: LoadedModel, dataset: PersonaDataset, positions: str, batch_size: int, progress: bool
) -> Capture:
    """Every persona's prompt for every question, captured at ``positions`` at every layer."""
    conversations = [
        (i, p.system_prompt, q, None)
        for i, p in enumerate(dataset.personas)
        for q in dataset.questions
    ]
    samples = build_samples(lm.tokenizer, conversations, (positions,))
    spec = CaptureSpec(layers=tuple(check_layers(lm, None)), positions=(positions,))
    return capture(
        lm,
        samples,
        spec,
        len(dataset.personas),
        batch_size=batch_size,
        progress=progress,
        desc=f"{lm.info.model_id} assistant axis",
    )


def _projections(cap: Capture, axis: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(persona index [N], projection on the unit axis [N, L]) of every captured sample."""
    personas, parts = [], []
    for who, pooled in cap.iter_pooled():
        personas.append(who)
        parts.append(project(pooled[:, 0], axis[None]).numpy()[:, 0])
    return np.concatenate(personas), np.concatenate(parts)
