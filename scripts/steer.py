"""Steering sweeps from the shell: strengths x prompts x personas, one JSONL line per reply.

    python scripts/steer.py --model store/models/demo --personas pirate,philosopher \\
        --prompt "What is the capital of France?" --prompts-file prompts.txt \\
        --strengths=-2,-1,0,1,2 --layers best --out sweep.jsonl

The same command is installed as ``personachat-steer``; what it does and its options are in
``personachat/cli/steer.py`` and ``--help``.
"""

import sys

from personachat.cli.steer import main

if __name__ == "__main__":
    sys.exit(main())
