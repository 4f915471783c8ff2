"""Register a whole batch in one run: several datasets of personas or traits, one or more models.

    python scripts/register_batch.py \\
        --model Qwen/Qwen2.5-0.5B-Instruct,HuggingFaceTB/SmolLM2-360M-Instruct \\
        --datasets personas,big_five,roles --positions response_avg,question_span --out runs/batch

The same command is installed as ``personachat-batch``; what it does and its options are in
``personachat/cli/register_batch.py`` and ``--help``.
"""

import sys

from personachat.cli.register_batch import main

if __name__ == "__main__":
    sys.exit(main())
