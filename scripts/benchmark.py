"""Speed claims, measured side by side in one run, printed as ratios against their goals.

    python scripts/benchmark.py                   # every section
    python scripts/benchmark.py --only runtime    # one section: store, extract, runtime, serving

Each section lives in its own module beside this script (``bench_<section>.py``) and returns
rows of (measurement, value, note). Ratios are paired: both sides run interleaved in this
process, so machine noise hits them alike. Nothing here is a test; the goals are printed, not
asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

SECTIONS = ("store", "extract", "runtime", "serving")


def load_section(section: str) -> Any:
    """``bench_<section>.py`` beside this script, imported as a module."""
    path = Path(__file__).with_name(f"bench_{section}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{section}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    for section in args.only.split(","):
        if section not in SECTIONS:
            parser.error(f"unknown section {section!r}; choose from {', '.join(SECTIONS)}")
        module = load_section(section)
        start = time.perf_counter()
        print(f"== {section}", flush=True)
        for name, value, note in module.run():
            print(f"  {name:<60} {value:>10.3f}  {note}", flush=True)
            rows.append({"section": section, "name": name, "value": value, "note": note})
        print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
