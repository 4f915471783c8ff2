"""Register a model's assistant axis (from role personas toward the default assistant) as a vector.

    python scripts/register_axis.py --model store/models/demo --dataset demo
    python scripts/register_axis.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset personas \\
        --positions question_span --method axis_pc1

The axis is read from the dataset's prompts (no replies needed; see
``personachat.pipeline.axis``): ``axis_means`` (neutral personas' mean minus the role
personas' mean, per layer) or ``axis_pc1`` (the first principal component of the persona
means, oriented toward the assistant). It is stored as persona ``assistant_axis`` with
baseline ``roles``, its per-layer metrics and its reference distribution (the neutral and the
role personas' projections), so the page and the API can read it out, steer with it and hold it
(capping at a percentile of the assistant's own projections).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from personachat.pipeline import (
    AXIS_METHODS,
    add_model_args,
    extract_axis,
    load,
    model_configs,
    register_results,
)
from personachat.pipeline.axis import axis_personas
from personachat.pipeline.vectors import ExtractionResult
from personachat.prompts import load_dataset
from personachat.records import POSITIONS

PROMPT_POSITIONS = tuple(p for p in POSITIONS if p != "response_avg")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python scripts/register_axis.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--dataset", default="personas", help="built-in name or .json/.jsonl file")
    p.add_argument("--positions", default="question_span", choices=PROMPT_POSITIONS)
    p.add_argument("--method", default="axis_means", choices=AXIS_METHODS)
    p.add_argument("--store", help="store folder (default: $PERSONACHAT_STORE or store/)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    from personachat.store import Store, default_store_root

    try:
        dataset = load_dataset(args.dataset)
        lm = load(model_configs(args)[0])
        vector, role_mean = extract_axis(
            lm,
            dataset,
            positions=args.positions,
            method=args.method,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
        result = ExtractionResult([vector], [role_mean], [], personas=[vector.persona])
        with Store(args.store or default_store_root()) as store:
            register_results(store, lm, axis_personas(dataset.name), result)
    except (ValueError, LookupError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    assert vector.metrics is not None
    best = vector.metrics.best_layer
    print(
        f"registered {vector.persona} ({vector.method}, {vector.positions}) for "
        f"{lm.info.model_id}: best layer {best}, AUC {float(vector.metrics.auc[best]):.3f}, "
        f"{vector.n_samples} neutral samples"
    )
    return 0
