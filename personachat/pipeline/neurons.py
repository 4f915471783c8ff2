"""Persona neurons from a dataset: score MLP units for its contrast pairs and keep the best.

``find_neurons`` checks the request, answers missing replies (cached), encodes the samples its
method reads and hands them to the method's scorer (``scorers.SCORERS``); ``neurons.neuron_sets``
turns the scores into sets, one per pair and one per kind of pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from personachat.activations import Dist
from personachat.hooks import Site
from personachat.model import LoadedModel
from personachat.neurons import neuron_sets
from personachat.pipeline.responses import GenerationConfig, ensure_responses
from personachat.pipeline.scorers import Scorer, Scores, Scoring, scorer
from personachat.pipeline.selection import check_layers, check_positions, shard_samples
from personachat.prompts import ContrastPair, DatasetError, PersonaDataset
from personachat.records import NEURON_SITES, NeuronSet


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
    batch_size: int | None = 8,
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
    dataset, pair_list = _pairs(pairs, dataset)
    score = _check(lm, site, method, k)
    chosen = check_layers(lm, layers)
    names = list(dict.fromkeys(n for p in pair_list for n in (p.high, p.low)))
    if score.everyone:
        names += [n for n in dataset.persona_names if n not in names]
    data = dataset.select(names)
    kinds = ("response_avg",) if score.replies else check_positions(positions)
    if "response_avg" in kinds:
        data = ensure_responses(
            lm, data, names, generation, cache_dir=cache_dir, progress=progress, dist=dist
        )
    site_name: Site = "gate" if site == "gate" else "mlp_hidden"
    run = Scoring(
        lm=lm,
        samples=shard_samples(lm, data, kinds, max_tokens, Dist() if score.decision else dist),
        names=names,
        pairs=pair_list,
        site=site_name,
        layers=chosen,
        positions=kinds,
        k=k,
        batch_size=batch_size or 8,
        progress=progress and dist.is_main,
        dist=dist,
    )
    where = "last prompt token" if score.decision else ",".join(kinds)
    source = f"dataset {dataset.name} sha256 {dataset.sha256[:12]}; positions {where}"
    return _sets(run, score.score(run), method, source)


def _sets(run: Scoring, found: Scores, method: str, source: str) -> list[NeuronSet]:
    """The neuron sets of ``found``, stamped with the time they were made."""
    sets = neuron_sets(
        model_id=run.lm.info.model_id,
        site=run.site,
        method=method,
        layers=run.layers,
        pairs=run.pairs,
        scores=found.scores,
        means=found.means,
        k=run.k,
        source=source,
        orders=found.orders,
    )
    now = datetime.now(UTC)
    for s in sets:
        s.created_at = now
    return sets


def _pairs(
    pairs: PersonaDataset | Sequence[ContrastPair], dataset: PersonaDataset | None
) -> tuple[PersonaDataset, list[ContrastPair]]:
    """The dataset and the pairs to score; errors when either is missing."""
    if isinstance(pairs, PersonaDataset):
        dataset, pair_list = pairs, list(pairs.pairs)
    else:
        pair_list = list(pairs)
    if dataset is None:
        raise DatasetError("find_neurons needs the dataset the pairs come from (dataset=...)")
    if not pair_list:
        raise DatasetError(f"dataset {dataset.name!r} has no contrast pairs to score")
    return dataset, pair_list


def _check(lm: LoadedModel, site: str, method: str, k: int) -> Scorer:
    """The method's scorer, once the site, method and ``k`` are known to be usable."""
    if site not in NEURON_SITES:
        raise ValueError(f"unknown neuron site {site!r}; use one of {NEURON_SITES}")
    found = scorer(method)
    if site == "gate" and lm.sites.gates is None:
        raise ValueError(
            f"{lm.sites.architecture} has no separate gate projection; use --site mlp_hidden"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return found
