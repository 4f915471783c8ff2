"""Write the persona-analysis report (collapse, probes, patching, persona space) of one model.

    python scripts/analyze.py --model store/models/demo --out store/reports/demo
    python scripts/analyze.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset personas \\
        --personas default,assistant,pirate,cynic,poet --compare-model Qwen/Qwen2.5-0.5B

The same command is installed as ``personachat-analyze``; what it does and its options are in
``personachat/cli/analyze.py`` and ``--help``.
"""

import sys

from personachat.cli.analyze import main

if __name__ == "__main__":
    sys.exit(main())
