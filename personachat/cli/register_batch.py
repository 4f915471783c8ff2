"""Register a whole batch in one run: several datasets of personas or traits, one or more models.

    python scripts/register_batch.py \\
        --model Qwen/Qwen2.5-0.5B-Instruct,HuggingFaceTB/SmolLM2-360M-Instruct \\
        --datasets personas,big_five,roles --positions response_avg,question_span --out runs/batch

    accelerate launch --multi_gpu --num_processes 2 scripts/register_batch.py ...(same flags)

(``--multi_gpu`` also works on CPU-only machines: torchrun + gloo; ``--cpu`` needs mpirun.)

For each model and dataset: a dataset with a ``default`` persona gets persona vectors against it
(``--baseline`` overrides; ``mean`` = the mean of all personas); a dataset of contrast pairs
(``big_five``, ``roles``) gets one trait vector per pair, high minus low. ``--neurons METHOD``
also scores MLP units for every pair. Plots and the summary table go to
``OUT/<model>/<dataset>/``; everything is registered in the store by the main process.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass

from personachat.activations import Dist
from personachat.model import LoadedModel
from personachat.pipeline import (
    ExtractionResult,
    RunOptions,
    add_model_args,
    add_run_args,
    check_layers,
    extract_pairs,
    extract_vectors,
    find_neurons,
    format_run,
    format_summary,
    load,
    model_configs,
    parse_layers,
    parse_list,
    register_results,
    run_options,
    save_results,
)
from personachat.prompts import PersonaDataset, load_dataset
from personachat.records import MEAN_BASELINE, NeuronSet


@dataclass(frozen=True)
class Config:
    datasets: list[str]
    positions: list[str]
    baseline: str
    layers: list[int] | None
    neurons: str | None
    neuron_site: str
    k: int
    run: RunOptions


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p, several=True)
    p.add_argument("--datasets", "--dataset", default="personas,big_five", help="comma list")
    p.add_argument("--positions", default="response_avg", help="comma list of position kinds")
    p.add_argument("--baseline", default="auto", help=f"auto, a persona name or {MEAN_BASELINE!r}")
    p.add_argument("--layers", default="all", help="'all', '12', '0-5' or '0-5,9'")
    p.add_argument(
        "--neurons",
        choices=("effect", "attribution", "patching", "exact"),
        help="also find neurons",
    )
    p.add_argument("--neuron-site", default="mlp_hidden", choices=("mlp_hidden", "gate"))
    p.add_argument("--k", type=int, default=32, help="neurons kept per pair")
    add_run_args(p, out_help="folder for summaries and plots")
    return p


def config(args: argparse.Namespace) -> Config:
    return Config(
        datasets=parse_list(args.datasets) or [],
        positions=parse_list(args.positions) or ["response_avg"],
        baseline=args.baseline,
        layers=parse_layers(args.layers),
        neurons=args.neurons,
        neuron_site=args.neuron_site,
        k=args.k,
        run=run_options(args),
    )


def baseline_for(dataset: PersonaDataset, baseline: str) -> str | None:
    """The baseline persona, or ``None`` for pair mode (high minus low per pair)."""
    if baseline != "auto":
        return baseline
    if "default" in dataset.persona_names:
        return "default"
    return None if dataset.pairs else MEAN_BASELINE


def run_one(
    lm: LoadedModel, dataset: PersonaDataset, cfg: Config, dist: Dist
) -> tuple[ExtractionResult, list[NeuronSet]]:
    gen, cache = cfg.run.generation, cfg.run.cache_dir
    base = baseline_for(dataset, cfg.baseline)
    if base is None:
        result = extract_pairs(
            lm,
            dataset,
            None,
            cfg.positions,
            cfg.layers,
            cfg.run.batch_size,
            cfg.run.progress,
            generation=gen,
            cache_dir=cache,
            dist=dist,
        )
    else:
        result = extract_vectors(
            lm,
            dataset,
            None,
            cfg.positions,
            base,
            cfg.layers,
            cfg.run.batch_size,
            cfg.run.progress,
            generation=gen,
            cache_dir=cache,
            dist=dist,
        )
    neurons: list[NeuronSet] = []
    if cfg.neurons and dataset.pairs:
        neurons = find_neurons(
            lm,
            dataset,
            cfg.layers,
            cfg.neuron_site,
            cfg.neurons,
            cfg.k,
            batch_size=cfg.run.batch_size,
            progress=cfg.run.progress,
            generation=gen,
            cache_dir=cache,
            dist=dist,
        )
    return result, neurons


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        cfg, models = config(args), model_configs(args)
        if not cfg.datasets or not models:
            raise ValueError("give at least one --model and one --datasets entry")
        datasets = [load_dataset(name) for name in cfg.datasets]
        dist = Dist.from_env()
        results = []
        for model_cfg in models:
            lm = load(model_cfg, dist)
            check_layers(lm, cfg.layers)
            for dataset in datasets:
                results.append((lm, dataset, *run_one(lm, dataset, cfg, dist)))
    except (ValueError, LookupError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not dist.is_main:
        return 0
    for lm, dataset, result, _ in results:
        title = f"{lm.info.model_id} / {dataset.name}"
        print(f"\n== {title}\n{format_summary(result.summary)}\n{format_run(result)}")
        if cfg.run.out is not None:
            folder = cfg.run.out / re.sub(r"[^A-Za-z0-9_.-]+", "_", lm.info.model_id) / dataset.name
            save_results(result, dataset, folder, title)
            print(f"wrote {folder}")
    if cfg.run.store is not None:
        from personachat.store import Store

        with Store(cfg.run.store) as store:
            for lm, dataset, result, neurons in results:
                personas = dataset.select(result.personas).personas if result.personas else ()
                register_results(store, lm, personas, result, neurons)
        n_vec = sum(len(r[2].vectors) for r in results)
        n_neu = sum(len(r[3]) for r in results)
        print(f"registered {n_vec} vectors and {n_neu} neuron sets in {cfg.run.store}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
