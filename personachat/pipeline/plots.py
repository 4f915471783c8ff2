"""PNG plots of extraction results (matplotlib, Agg backend): metrics by layer, cosine map, PCA.

- ``plot_layer_metrics``: AUC and separation by layer, one line per persona (held out with its
  spread when computed, in-sample dotted).
- ``plot_cosine``: cosine similarity of mean-centered persona vectors at one layer.
- ``plot_pca``: persona vectors at one layer in their first two principal components, coloured by
  their projection onto the assistant axis (mean of the neutral personas minus the mean of the
  role personas, as in the assistant-axis study).
Each function writes one file and returns its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import MaxNLocator

from personachat.records import PersonaMeans, PersonaVector
from personachat.vectors import assistant_axis, cosine_matrix, unit


def _save(fig: Any, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_layer_metrics(vectors: Sequence[PersonaVector], path: str | Path, title: str = "") -> Path:
    """AUC and separation by layer, one line per persona: held out (the mean over folds, a band
    for the spread) with the in-sample figures dotted, or in-sample alone."""
    fig, (ax_auc, ax_sep) = plt.subplots(1, 2, figsize=(11, 4))
    held = False
    for v in vectors:
        m = v.metrics
        if m is None:
            continue
        held = held or m.auc_heldout is not None
        _curve(ax_auc, m.auc, m.auc_heldout, m.auc_heldout_std, v.persona)
        _curve(ax_sep, m.separation, m.separation_heldout, m.separation_heldout_std, v.persona)
    for ax in (ax_auc, ax_sep):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    how = " (held out ± spread; dotted: in-sample)" if held else " (in-sample)"
    ax_auc.set(xlabel="layer", ylabel="AUC", title="AUC by layer" + how, ylim=(0, 1.02))
    ax_sep.set(xlabel="layer", ylabel="separation (Cohen's d)", title="Separation by layer" + how)
    if len(vectors) <= 25:
        ax_sep.legend(fontsize=7, ncol=2, loc="best")
    fig.suptitle(title)
    return _save(fig, path)


def _curve(
    ax: Any,
    in_sample: torch.Tensor,
    held: torch.Tensor | None,
    spread: torch.Tensor | None,
    label: str,
) -> None:
    layers = list(range(len(in_sample)))
    if held is None:
        ax.plot(layers, in_sample.numpy(), marker=".", label=label)
        return
    (line,) = ax.plot(layers, held.numpy(), marker=".", label=label)
    if spread is not None:
        low, high = (held - spread).numpy(), (held + spread).numpy()
        ax.fill_between(layers, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.plot(layers, in_sample.numpy(), ls=":", lw=0.8, color=line.get_color())


def plot_cosine(
    names: Sequence[str], vectors: torch.Tensor, path: str | Path, title: str = ""
) -> Path:
    """Heatmap of the cosine similarity of mean-centered ``vectors`` [V, D]."""
    sims = cosine_matrix(vectors).numpy()
    size = max(4.0, 0.35 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(sims, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    fig.colorbar(im, ax=ax, label="cosine (mean-centered)")
    ax.set_title(title or "Cosine similarity of persona vectors")
    return _save(fig, path)


def plot_pca(
    names: Sequence[str],
    categories: Sequence[str],
    vectors: torch.Tensor,
    path: str | Path,
    title: str = "",
) -> Path:
    """PCA scatter of ``vectors`` [V, D] coloured by the assistant-axis projection when defined."""
    x = vectors.double() - vectors.double().mean(0, keepdim=True)
    _, s, vt = torch.linalg.svd(x, full_matrices=False)
    coords = (x @ vt[:2].T).numpy() if vt.shape[0] >= 2 else torch.zeros(len(names), 2).numpy()
    explained = (s.square() / s.square().sum().clamp(min=1e-30)).numpy()
    try:
        axis = unit(assistant_axis(vectors.double(), categories))
        colour = (vectors.double() @ axis).numpy()
        label = "projection on assistant axis"
    except ValueError:
        colour, label = None, ""
    fig, ax = plt.subplots(figsize=(7, 6))
    if colour is None:
        points = ax.scatter(coords[:, 0], coords[:, 1], s=40)
    else:
        points = ax.scatter(coords[:, 0], coords[:, 1], c=colour, cmap="coolwarm", s=40)
    for (px, py), name in zip(coords, names, strict=True):
        ax.annotate(name, (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if colour is not None:
        fig.colorbar(points, ax=ax, label=label)
    pc = [f"{100 * e:.0f}%" for e in [*explained[:2].tolist(), 0.0, 0.0]][:2]
    ax.set(
        xlabel=f"PC1 ({pc[0]})", ylabel=f"PC2 ({pc[1]})", title=title or "PCA of persona vectors"
    )
    return _save(fig, path)


def plot_all(
    vectors: Sequence[PersonaVector],
    means: Sequence[PersonaMeans],
    categories: dict[str, str],
    out_dir: str | Path,
    prefix: str = "",
    layer: int | None = None,
) -> list[Path]:
    """All three plots for one position kind, at ``layer`` (default: the most common best layer).

    The cosine map and the PCA use every persona's raw mean, mean-centered across personas,
    which equals the mean-centered persona vectors with the baseline persona included.
    """
    out = Path(out_dir)
    if layer is None:
        best = [v.metrics.best_layer for v in vectors if v.metrics is not None]
        layer = max(set(best), key=best.count) if best else 0
    paths = [plot_layer_metrics(vectors, out / f"{prefix}layer_metrics.png", prefix.strip("_"))]
    if len(means) >= 2:
        names = [m.persona for m in means]
        stack = torch.stack([m.mean[layer] for m in means])
        paths.append(plot_cosine(names, stack, out / f"{prefix}cosine.png", f"layer {layer}"))
        cats = [categories.get(n, "") for n in names]
        paths.append(plot_pca(names, cats, stack, out / f"{prefix}pca.png", f"layer {layer}"))
    return paths
