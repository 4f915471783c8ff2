"""Orchestration of the offline half: dataset + model -> persona vectors, neuron sets, store.

``extract_vectors`` answers missing responses (cached), captures pooled activations as sums,
turns per-persona means into difference-of-means vectors and scores every layer (AUC,
separation); ``find_neurons`` scores MLP units for contrast pairs; ``register_results`` writes
both into a ``personachat.store.Store``. Under ``accelerate launch`` the samples are split across
processes and the sums gathered, so every process returns the same result; only the main
process should write (``Dist.is_main``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from personachat.activations import Capture, CaptureSpec, Dist, build_samples, capture
from personachat.hooks import Site
from personachat.interventions import InterventionError, parse_layer_list
from personachat.model import LoadedModel, SiteTemplates, load_model, templates_from_args
from personachat.neurons import (
    attribution_sums,
    exact_selection,
    neuron_sets,
    patching_scores,
    patching_sums,
    standardized_effect,
)
from personachat.pipeline.responses import GenerationConfig, ensure_responses
from personachat.prompts import ContrastPair, DatasetError, PersonaDataset
from personachat.records import (
    LAYER_CONVENTION,
    MEAN_BASELINE,
    NEURON_METHODS,
    NEURON_SITES,
    POSITIONS,
    NeuronSet,
    PersonaMeans,
    PersonaVector,
)
from personachat.vectors import baseline_samples, difference_of_means, layer_metrics, project

REPLY_METHODS = ("attribution", "patching", "exact")  # neuron methods that need the replies
DECISION_METHODS = ("patching", "exact")  # scored at the last prompt token, question by question

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SummaryRow:
    """One line of the summary table."""

    persona: str
    positions: str
    best_layer: int
    auc: float
    separation: float
    norm: float
    n_samples: int


@dataclass(eq=False)
class ExtractionResult:
    """Vectors (one per persona and position kind, baseline excluded), raw means, summary rows."""

    vectors: list[PersonaVector]
    means: list[PersonaMeans]
    summary: list[SummaryRow]
    layers: tuple[int, ...] = ()
    personas: list[str] = field(default_factory=list)


def _positions(positions: str | Sequence[str]) -> tuple[str, ...]:
    items = (positions,) if isinstance(positions, str) else tuple(positions)
    bad = [p for p in items if p not in POSITIONS]
    if not items or bad:
        raise ValueError(f"unknown positions {bad or items}; use one or more of {POSITIONS}")
    return tuple(dict.fromkeys(items))


def check_layers(lm: LoadedModel, layers: Sequence[int] | None) -> tuple[int, ...]:
    """The layers to use (all when ``None``), sorted; a ``SiteError`` names the valid range."""
    if layers is None:
        return tuple(range(lm.sites.n_layers))
    if not layers:
        raise ValueError("the layer list is empty")
    return tuple(sorted({lm.sites.check_layer(int(la)) for la in layers}))


def select_personas(
    dataset: PersonaDataset, personas: Sequence[str] | None, baseline: str
) -> PersonaDataset:
    """The personas to extract, with a named baseline added when missing; errors when unknown."""
    if not dataset.personas or not dataset.questions:
        raise DatasetError(f"dataset {dataset.name!r} has no personas or no questions")
    names = list(personas) if personas is not None else dataset.persona_names
    if baseline != MEAN_BASELINE:
        dataset.persona(baseline)  # raises for an unknown baseline, naming the known ones
        if baseline not in names:
            names = [baseline, *names]
    selected = dataset.select(names)
    if len(selected.personas) < 2:
        raise DatasetError(
            f"need at least two personas (a persona and a baseline); got {selected.persona_names}"
        )
    return selected


def _conversations(
    dataset: PersonaDataset, with_response: bool
) -> list[tuple[int, str, str, str | None]]:
    return [
        (i, p.system_prompt, q, dataset.response(p.name, q) if with_response else None)
        for i, p in enumerate(dataset.personas)
        for q in dataset.questions
    ]


def _projections(
    cap: Capture, vectors: torch.Tensor, pos: int, dist: Dist
) -> tuple[np.ndarray, np.ndarray]:
    """(persona index [N], projections [N, V, L]) of every sample over all processes."""
    persona_parts, proj_parts = [], []
    for personas, pooled in cap.iter_pooled():
        persona_parts.append(personas)
        proj_parts.append(project(pooled[:, pos], vectors).numpy())
    v, n_layers = vectors.shape[0], vectors.shape[1]
    mine = (
        np.concatenate(persona_parts) if persona_parts else np.zeros(0, dtype=np.int64),
        np.concatenate(proj_parts) if proj_parts else np.zeros((0, v, n_layers)),
    )
    parts = dist.gather(mine)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _expand(rows: torch.Tensor, layers: Sequence[int], n_layers: int) -> torch.Tensor:
    """Rows for ``layers`` placed in a zero tensor with ``n_layers`` rows."""
    full = torch.zeros((n_layers, *rows.shape[1:]), dtype=torch.float32)
    full[list(layers)] = rows.float()
    return full


def extract_vectors(
    lm: LoadedModel,
    dataset: PersonaDataset,
    personas: Sequence[str] | None = None,
    positions: str | Sequence[str] = "response_avg",
    baseline: str = "default",
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    *,
    generation: GenerationConfig | None = None,
    cache_dir: str | Path | None = None,
    padding_side: str | None = None,
    max_tokens: int | None = None,
    dist: Dist | None = None,
) -> ExtractionResult:
    """Persona vectors (persona mean - baseline mean per layer) with per-layer metrics.

    Every process of a multi-process run returns the same result. Layers not in ``layers`` get
    zero vectors and zero metrics.
    """
    dist = dist or Dist()
    kinds = _positions(positions)
    chosen = check_layers(lm, layers)
    data = select_personas(dataset, personas, baseline)
    names = data.persona_names
    need_response = "response_avg" in kinds
    if need_response:
        data = ensure_responses(
            lm, data, names, generation, cache_dir=cache_dir, progress=progress, dist=dist
        )
    convs = dist.shard(_conversations(data, need_response))
    samples = build_samples(lm.tokenizer, convs, kinds, max_tokens=max_tokens)
    log.info("process %d/%d: %d samples", dist.rank + 1, dist.world, len(samples))
    spec = CaptureSpec(layers=chosen, positions=kinds)
    n_layers = lm.sites.n_layers
    now = datetime.now(UTC)
    sha = dataset.sha256
    result = ExtractionResult([], [], [], layers=chosen, personas=names)
    with capture(
        lm,
        samples,
        spec,
        len(names),
        batch_size=batch_size,
        side=padding_side,
        progress=progress and dist.is_main,
        desc=f"{lm.info.model_id} activations",
    ) as cap:
        cap.reduce(dist)
        means = cap.means()
        counts = cap.counts
        resid = cap.norm_sums.sum(1) / counts.sum().clamp(min=1)  # [n_pos, L]
        for p, kind in enumerate(kinds):
            for i, name in enumerate(names):
                result.means.append(
                    PersonaMeans(
                        model_id=lm.info.model_id,
                        persona=name,
                        positions=kind,
                        mean=_expand(means[p, i], chosen, n_layers),
                        n_samples=int(counts[i]),
                        dataset=data.name,
                        dataset_sha256=sha,
                    )
                )
            vecs = difference_of_means(means[p], names, baseline)
            order = list(vecs)
            stacked = torch.stack([vecs[n] for n in order])
            sample_persona, proj = _projections(cap, stacked, p, dist)
            for v, name in enumerate(order):
                i = names.index(name)
                neg_personas = baseline_samples(i, baseline, names)
                pos_proj = proj[sample_persona == i, v]
                neg_proj = proj[np.isin(sample_persona, neg_personas), v]
                full = _expand(vecs[name], chosen, n_layers)
                metrics = layer_metrics(
                    full, pos_proj, neg_proj, _expand(resid[p], chosen, n_layers), chosen
                )
                vector = PersonaVector(
                    model_id=lm.info.model_id,
                    persona=name,
                    vector=full,
                    positions=kind,
                    baseline=baseline,
                    dataset=data.name,
                    dataset_sha256=sha,
                    n_samples=int(counts[i]),
                    metrics=metrics,
                    created_at=now,
                    baseline_mean=_expand(means[p][neg_personas].mean(0), chosen, n_layers),
                )
                result.vectors.append(vector)
                best = metrics.best_layer
                result.summary.append(
                    SummaryRow(
                        persona=name,
                        positions=kind,
                        best_layer=best,
                        auc=float(metrics.auc[best]),
                        separation=float(metrics.separation[best]),
                        norm=float(metrics.norm[best]),
                        n_samples=int(counts[i]),
                    )
                )
    return result


def _neuron_samples(
    lm: LoadedModel,
    data: PersonaDataset,
    kinds: tuple[str, ...],
    max_tokens: int | None,
    dist: Dist,
) -> list[Any]:
    convs = dist.shard(_conversations(data, "response_avg" in kinds))
    return build_samples(lm.tokenizer, convs, kinds, max_tokens=max_tokens)


def find_neurons(
    lm: LoadedModel,
    pairs: PersonaDataset | Sequence[ContrastPair],
    layers: Sequence[int] | None = None,
    site: str = "mlp_hidden",
    method: str = "effect",
    k: int = 32,
    *,
    dataset: PersonaDataset | None = None,
    positions: str = "response_avg",
    batch_size: int = 8,
    progress: bool = True,
    generation: GenerationConfig | None = None,
    cache_dir: str | Path | None = None,
    max_tokens: int | None = None,
    dist: Dist | None = None,
) -> list[NeuronSet]:
    """Top-``k`` MLP units per contrast pair (and per kind of pairs) by ``method`` at ``site``.

    ``pairs`` is a dataset (all its pairs) or pairs from ``dataset``. ``positions`` chooses the
    pooling of the ``effect`` method; ``attribution`` always uses the persona's own reply, and
    ``patching`` and ``exact`` the last prompt token and the first tokens of the replies
    (``exact`` also checks each unit against every other persona of the dataset).
    """
    dist = dist or Dist()
    if isinstance(pairs, PersonaDataset):
        dataset, pair_list = pairs, list(pairs.pairs)
    else:
        pair_list = list(pairs)
    if dataset is None:
        raise DatasetError("find_neurons needs the dataset the pairs come from (dataset=...)")
    if not pair_list:
        raise DatasetError(f"dataset {dataset.name!r} has no contrast pairs to score")
    if site not in NEURON_SITES:
        raise ValueError(f"unknown neuron site {site!r}; use one of {NEURON_SITES}")
    if method not in NEURON_METHODS or method == "imported":
        raise ValueError(
            f"unknown method {method!r}; use 'effect', 'attribution', 'patching' or 'exact'"
        )
    if site == "gate" and lm.sites.gates is None:
        raise ValueError(
            f"{lm.sites.architecture} has no separate gate projection; use --site mlp_hidden"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    chosen = check_layers(lm, layers)
    names = list(dict.fromkeys(n for p in pair_list for n in (p.high, p.low)))
    if method == "exact":  # every other persona of the dataset checks that a unit is specific
        names += [n for n in dataset.persona_names if n not in names]
    data = dataset.select(names)
    kinds = ("response_avg",) if method in REPLY_METHODS else _positions(positions)
    if "response_avg" in kinds:
        data = ensure_responses(
            lm, data, names, generation, cache_dir=cache_dir, progress=progress, dist=dist
        )
    # patching aligns every persona's reply to each question, so it splits questions itself
    whole = method in DECISION_METHODS
    samples = _neuron_samples(lm, data, kinds, max_tokens, Dist() if whole else dist)
    site_name: Site = "gate" if site == "gate" else "mlp_hidden"
    scores: dict[str, torch.Tensor] = {}
    means: dict[str, torch.Tensor] = {}
    orders: dict[str, list[tuple[int, int]]] = {}
    if method == "effect":
        spec = CaptureSpec(
            layers=chosen, positions=kinds, site=site_name, spill=False, squares=True
        )
        with capture(
            lm,
            samples,
            spec,
            len(names),
            batch_size=batch_size,
            progress=progress and dist.is_main,
            desc="neuron activations",
        ) as cap:
            cap.reduce(dist)
            mean = cap.means()[0]
            n = cap.counts.clamp(min=1).double()[:, None, None]
            assert cap.sq_sums is not None
            sq = cap.sq_sums[0] / n
            for pair in pair_list:
                h, lo = names.index(pair.high), names.index(pair.low)
                scores[pair.name] = standardized_effect(
                    mean[h], sq[h], int(cap.counts[h]), mean[lo], sq[lo], int(cap.counts[lo])
                ).float()
                means[pair.name] = ((mean[h] + mean[lo]) / 2).float()
    elif method == "patching":
        index = [(names.index(p.high), names.index(p.low)) for p in pair_list]
        products, diffs, act_sums, count = patching_sums(
            lm,
            samples,
            index,
            site_name,
            chosen,
            len(names),
            batch_size=batch_size,
            progress=progress and dist.is_main,
            dist=dist,
        )
        products, diffs = dist.all_reduce(products), dist.all_reduce(diffs)
        act_sums, count = dist.all_reduce(act_sums), dist.all_reduce(count)
        pair_scores = patching_scores(products, diffs, count)
        for j, pair in enumerate(pair_list):
            scores[pair.name] = pair_scores[j]
            means[pair.name] = (act_sums[index[j][1]] / count.clamp(min=1)).float()
    elif method == "exact":
        index = [(names.index(p.high), names.index(p.low)) for p in pair_list]
        exact_scores, exact_orders, exact_means = exact_selection(
            lm,
            samples,
            index,
            site_name,
            chosen,
            len(names),
            k=k,
            progress=progress and dist.is_main,
            dist=dist,
        )
        for j, pair in enumerate(pair_list):
            scores[pair.name], means[pair.name] = exact_scores[j], exact_means[j]
            orders[pair.name] = exact_orders[j]
    else:
        attr, acts, counts = attribution_sums(
            lm,
            samples,
            site_name,
            chosen,
            len(names),
            batch_size=batch_size,
            progress=progress and dist.is_main,
        )
        attr, acts, counts = dist.all_reduce(attr), dist.all_reduce(acts), dist.all_reduce(counts)
        n = counts.clamp(min=1).double()[:, None, None]
        attr_mean, act_mean = attr / n, acts / n
        for pair in pair_list:
            h, lo = names.index(pair.high), names.index(pair.low)
            scores[pair.name] = (attr_mean[h] - attr_mean[lo]).float()
            means[pair.name] = ((act_mean[h] + act_mean[lo]) / 2).float()
    where = "last prompt token" if whole else ",".join(kinds)
    source = f"dataset {dataset.name} sha256 {dataset.sha256[:12]}; positions {where}"
    sets = neuron_sets(
        model_id=lm.info.model_id,
        site=site,
        method=method,
        layers=chosen,
        pairs=pair_list,
        scores=scores,
        means=means,
        k=k,
        source=source,
        orders=orders,
    )
    now = datetime.now(UTC)
    for s in sets:
        s.created_at = now
    return sets


def register_results(
    store: Any,
    lm: LoadedModel,
    personas: Sequence[Any] = (),
    result: ExtractionResult | None = None,
    neurons: Sequence[NeuronSet] = (),
) -> None:
    """Write the model, personas, vectors (with raw means) and neuron sets into ``store``."""
    store.register_model(lm.info)
    if personas:
        store.register_personas(list(personas))
    if result is not None and result.vectors:
        store.register_vectors(result.vectors, means=result.means)
    if neurons:
        store.register_neurons(list(neurons))


def extract_pairs(
    lm: LoadedModel,
    dataset: PersonaDataset,
    pairs: Sequence[str] | None = None,
    positions: str | Sequence[str] = "response_avg",
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    *,
    generation: GenerationConfig | None = None,
    cache_dir: str | Path | None = None,
    dist: Dist | None = None,
) -> ExtractionResult:
    """Trait vectors from contrast pairs: mean(high) - mean(low), the low persona as baseline."""
    chosen = [dataset.pair(n) for n in pairs] if pairs is not None else list(dataset.pairs)
    if not chosen:
        raise DatasetError(f"dataset {dataset.name!r} has no contrast pairs")
    merged = ExtractionResult([], [], [], personas=[])
    for pair in chosen:
        part = extract_vectors(
            lm,
            dataset,
            [pair.high],
            positions,
            pair.low,
            layers,
            batch_size,
            progress,
            generation=generation,
            cache_dir=cache_dir,
            dist=dist,
        )
        merged.vectors += part.vectors
        merged.means += part.means
        merged.summary += part.summary
        merged.layers = part.layers
        merged.personas += part.personas
    return merged


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how (built from the scripts' command line)."""

    model: str
    device: str = "auto"
    dtype: str = "auto"
    templates: SiteTemplates | None = None


def add_model_args(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    """The model options shared by the extraction scripts."""
    help_model = "hub name or local path" + (" (comma-separated for several)" if several else "")
    parser.add_argument("--model", required=True, help=help_model)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--layers-path", help="override: dotted path of the decoder block list")
    parser.add_argument("--mlp-down-path", help="override: MLP output projection, per block")
    parser.add_argument("--gate-path", help="override: MLP gate projection, per block")


def model_configs(args: argparse.Namespace) -> list[ModelConfig]:
    templates = templates_from_args(args.layers_path, args.mlp_down_path, args.gate_path)
    names = [m.strip() for m in str(args.model).split(",") if m.strip()]
    return [ModelConfig(n, args.device, args.dtype, templates) for n in names]


def load(cfg: ModelConfig, dist: Dist | None = None) -> LoadedModel:
    """Load the model; under several processes with GPUs each process takes its own GPU."""
    device = cfg.device
    if dist is not None and dist.world > 1 and device == "auto" and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', dist.rank))}"
    return load_model(cfg.model, dtype=cfg.dtype, device=device, templates=cfg.templates)


@dataclass(frozen=True)
class RunOptions:
    """Where the scripts' results go and how the work runs (their shared options)."""

    store: Path | None
    out: Path | None
    batch_size: int
    generation: GenerationConfig
    cache_dir: Path | None
    progress: bool


def add_run_args(parser: argparse.ArgumentParser, *, out_help: str) -> None:
    """The output and run options shared by the extraction scripts."""
    parser.add_argument(
        "--store", type=Path, help="store folder (default: $PERSONACHAT_STORE or store/)"
    )
    parser.add_argument("--no-store", action="store_true", help="do not register in the store")
    parser.add_argument("--out", type=Path, help=out_help)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="for generated responses")
    parser.add_argument("--seed", type=int, default=0, help="for generated responses")
    parser.add_argument(
        "--cache-dir", type=Path, help="response cache (default ~/.cache/personachat)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_options(args: argparse.Namespace) -> RunOptions:
    from personachat.store import default_store_root

    return RunOptions(
        store=None if args.no_store else (args.store or default_store_root()),
        out=args.out,
        batch_size=args.batch_size,
        generation=GenerationConfig(max_new_tokens=args.max_new_tokens, seed=args.seed),
        cache_dir=args.cache_dir,
        progress=not args.quiet,
    )


def parse_list(text: str | None) -> list[str] | None:
    """``"a,b"`` -> ``["a", "b"]``; ``None``/``""``/``"all"`` -> ``None``."""
    if not text or text.strip() == "all":
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_layers(text: str | None) -> list[int] | None:
    """``"all"`` -> ``None``; ``"0-3,8"`` -> ``[0, 1, 2, 3, 8]`` (checked against the model
    once it is loaded: ``check_layers``)."""
    items = parse_list(text)
    if items is None:
        return None
    try:
        return parse_layer_list(",".join(items), None)
    except InterventionError as err:
        raise ValueError(f"bad --layers {text!r}: {err}; use 'all', '5', '0-3' or '0-3,8'") from err


def format_summary(rows: Sequence[SummaryRow]) -> str:
    """The summary table: persona, positions, best layer, AUC, separation, norm, samples."""
    head = (
        f"{'persona':<24} {'positions':<14} {'best':>4} {'AUC':>6} {'sep':>7} {'norm':>8} {'n':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.persona:<24} {r.positions:<14} {r.best_layer:>4} {r.auc:>6.3f} "
            f"{r.separation:>7.2f} {r.norm:>8.2f} {r.n_samples:>5}"
        )
    return "\n".join(lines)


def save_results(
    result: ExtractionResult, dataset: PersonaDataset, out_dir: str | Path, title: str = ""
) -> list[Path]:
    """summary.json, summary.txt, vectors_<positions>.safetensors and plots in ``out_dir``."""
    from safetensors.torch import save_file

    from personachat.pipeline.plots import plot_all

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in result.summary]
    (out / "summary.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    (out / "summary.txt").write_text(f"{title}\n{format_summary(result.summary)}\n", "utf-8")
    paths = [out / "summary.json", out / "summary.txt"]
    categories = {p.name: p.category for p in dataset.personas}
    for kind in dict.fromkeys(v.positions for v in result.vectors):
        vecs = [v for v in result.vectors if v.positions == kind]
        meta = {
            "model_id": vecs[0].model_id,
            "positions": kind,
            "dataset": dataset.name,
            "dataset_sha256": vecs[0].dataset_sha256,
            "layer_convention": LAYER_CONVENTION,
        }
        tensors = {f"{v.persona}.{v.baseline}": v.vector.contiguous() for v in vecs}
        save_file(tensors, str(out / f"vectors_{kind}.safetensors"), metadata=meta)
        paths.append(out / f"vectors_{kind}.safetensors")
        mns = [m for m in result.means if m.positions == kind]
        paths += plot_all(vecs, mns, categories, out, prefix=f"{kind}_")
    return paths
