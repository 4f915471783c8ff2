"""Write the persona-analysis report (collapse, probes, patching, persona space) of one model.

    python scripts/analyze.py --model store/models/demo --out store/reports/demo
    python scripts/analyze.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset personas \\
        --personas default,assistant,pirate,cynic,poet --compare-model Qwen/Qwen2.5-0.5B

``--dataset demo`` (the default for ``store/models/demo``) uses the demo model's planted personas
and preference questions; any other dataset (built-in name or .json/.jsonl file) supplies the
personas, and the questions are ``personachat.analysis.preferences.default_preferences()``.
Persona vectors come from the store (``--store``) when it has some for the model, otherwise from
the model's own mean activations over the question tokens. The report goes to
``--out/report.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from personachat.analysis import inputs as an_inputs
from personachat.analysis.findings import findings
from personachat.analysis.report import write_report
from personachat.analysis.run import analyze_model
from personachat.model import LoadedModel, load_model
from personachat.records import PersonaVector

log = logging.getLogger("analyze")


@dataclass(frozen=True)
class Config:
    model: str
    out: str
    store: str | None
    personas: tuple[str, ...] | None
    compare_model: str | None
    dataset: str
    n_patch: int
    threshold: float
    max_new_tokens: int
    forced: bool


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="hub name or local path of a causal LM")
    p.add_argument("--out", default=None, help="report folder (default store/reports/<model>)")
    p.add_argument("--store", default=None, help="store root with persona vectors (optional)")
    p.add_argument("--personas", default=None, help="comma-separated persona names (default all)")
    p.add_argument("--compare-model", default=None, help="second model for the comparison")
    p.add_argument("--dataset", default="auto", help="demo, a built-in dataset or a file")
    p.add_argument("--n-patch", type=int, default=2, help="persona pairs to patch")
    p.add_argument("--threshold", type=float, default=0.5, help="modal share that is collapse")
    p.add_argument("--max-new-tokens", type=int, default=24, help="greedy answer length")
    p.add_argument(
        "--forced",
        action="store_true",
        help="demo only: measure collapse with the forced reply prefix too (default: free replies)",
    )
    a = p.parse_args(argv)
    dataset = a.dataset
    if dataset == "auto":
        dataset = an_inputs.default_dataset(a.model)
    out = a.out or str(Path("store/reports") / Path(a.model).name)
    personas = tuple(x.strip() for x in a.personas.split(",") if x.strip()) if a.personas else None
    return Config(
        a.model,
        out,
        a.store,
        personas,
        a.compare_model,
        dataset,
        a.n_patch,
        a.threshold,
        a.max_new_tokens,
        a.forced,
    )


def load_personas(cfg: Config) -> an_inputs.AnalysisInputs:
    try:
        return an_inputs.analysis_inputs(cfg.dataset, cfg.personas, forced=cfg.forced)
    except ValueError as err:
        raise SystemExit(str(err)) from err


def stored_vectors(
    store_root: str | None, lm: LoadedModel, names: list[str]
) -> list[PersonaVector]:
    """The model's stored persona vectors (one per persona, newest), or [] when there are none."""
    if store_root is None or not (Path(store_root) / "catalog.duckdb").is_file():
        return []
    from personachat.store import Store

    with Store(store_root, read_only=True) as store:
        ids = [lm.info.model_id, Path(lm.info.model_id).name]
        return an_inputs.stored_vectors(store, ids, names)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    inputs = load_personas(cfg)
    personas = inputs.personas
    lm = load_model(cfg.model)
    names = [p.name for p in personas]
    compare = None
    if cfg.compare_model:
        other = load_model(cfg.compare_model)
        compare = (other, stored_vectors(cfg.store, other, names))
    result = analyze_model(
        lm,
        personas,
        inputs.items,
        vectors=stored_vectors(cfg.store, lm, names),
        compare=compare,
        patch_items=inputs.patch_items,
        n_patch=cfg.n_patch,
        threshold=cfg.threshold,
        max_new_tokens=cfg.max_new_tokens,
        dataset=cfg.dataset,
    )
    path = write_report(result, cfg.out)
    for line in findings(result):
        print(f"- {line}")
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
