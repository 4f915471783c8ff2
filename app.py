"""PersonaChat's front door: chat with a model while steering and watching its personas.

    python app.py                     # the bundled demo model and store/ at the repo root
    python app.py --model Qwen/Qwen2.5-0.5B-Instruct --store /data/store --port 7860
    PERSONACHAT_MODEL=... PERSONACHAT_STORE=... python app.py

The same command is installed as ``personachat-app``; its options and defaults are in
``personachat/app/main.py`` and ``--help``.
"""

import sys

from personachat.app.main import main

if __name__ == "__main__":
    sys.exit(main())
