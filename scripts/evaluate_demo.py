"""Measure the bundled demo model: conditioning, persona collapse, steering and ablation.

    python scripts/evaluate_demo.py                      # everything
    python scripts/evaluate_demo.py --only conditioning  # the conditioning table only

Prints one table per section and writes ``results.json`` and ``eval.png`` to ``--out`` (default
``store/models/demo/eval``); ``--only``, ``--methods``, ``--parts`` and ``--merge results.json``
redo part of an earlier run. What each section measures is in
``personachat/cli/evaluate_demo/__init__.py``; the options are in ``--help``.
"""

import sys

from personachat.cli.evaluate_demo import main

if __name__ == "__main__":
    sys.exit(main())
