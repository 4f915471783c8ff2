"""PersonaChat's front door: chat with a model while steering and watching its personas.

    python app.py                     # the bundled demo model and store/ at the repo root
    python app.py --model Qwen/Qwen2.5-0.5B-Instruct --store /data/store --port 7860
    PERSONACHAT_MODEL=... PERSONACHAT_STORE=... python app.py

Binds 127.0.0.1 unless ``--host`` says otherwise or ``SPACE_ID`` is set (a Hugging Face Space:
0.0.0.0). One server answers the page at ``/`` and the OpenAI-compatible API at ``/v1``
(``personachat.app.api``); replies take the path ``--engine`` picks (``personachat.app.serving``).
Analytics are off and nothing is fetched from the network. The model loads lazily on first use;
a missing model folder or store is reported and the app exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from personachat.app.public import ADMIN_ENV, MAX_UPLOAD_BYTES, Access

ROOT = Path(__file__).resolve().parents[2]  # the repository: default model and store live here
DEFAULT_MODEL = "store/models/demo"
DEFAULT_STORE = "store"

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@dataclass(frozen=True)
class AppConfig:
    """Where the app finds its model and store, and where it listens."""

    model: str
    store: Path
    host: str
    port: int
    concurrency: int = 8
    dtype: str = "auto"  # auto: bfloat16 on a GPU (float16 where it lacks bf16), float32 on CPU
    device: str = "auto"  # auto: the GPUs when there are any, else the CPU
    engine: str = "hf"  # hf: PersonaChat's runtime; vllm: interp-engine's vLLM backend
    num_gpus: int = 1  # tensor parallelism of --engine vllm
    public: bool = False  # what visitors may do: personachat.app.public
    allow_models: tuple[str, ...] = ()  # models loadable in public mode besides --model
    max_upload_bytes: int = 1_000_000  # the upload cap in public mode


def parse_args(argv: list[str] | None = None, env: dict[str, str] | None = None) -> AppConfig:
    env = dict(os.environ) if env is None else env
    parser = argparse.ArgumentParser(description="PersonaChat: steer and watch personas in a chat.")
    _add_model_args(parser, env)
    _add_serving_args(parser, env)
    _add_public_args(parser, env)
    args = parser.parse_args(argv)
    host = args.host or ("0.0.0.0" if env.get("SPACE_ID") else "127.0.0.1")
    return AppConfig(
        model=_resolve(args.model),
        store=Path(_resolve(args.store)),
        host=host,
        port=args.port,
        concurrency=max(1, args.concurrency),
        dtype=args.dtype,
        device=args.device,
        engine=args.engine,
        num_gpus=max(1, args.num_gpus),
        public=args.public,
        allow_models=tuple(m.strip() for m in ",".join(args.allow_models).split(",") if m.strip()),
        max_upload_bytes=max(0, args.max_upload_bytes),
    )


def _add_model_args(parser: argparse.ArgumentParser, env: dict[str, str]) -> None:
    """What to load, where from, in which dtype and on which device."""
    parser.add_argument(
        "--model",
        default=env.get("PERSONACHAT_MODEL", DEFAULT_MODEL),
        help="hub name or local path (env PERSONACHAT_MODEL; default: the bundled demo model)",
    )
    parser.add_argument(
        "--store",
        default=env.get("PERSONACHAT_STORE", DEFAULT_STORE),
        help="the persona store folder (env PERSONACHAT_STORE; default: store/)",
    )
    parser.add_argument(
        "--dtype",
        default=env.get("PERSONACHAT_DTYPE", "auto"),
        choices=DTYPES,
        help="weights' dtype (env PERSONACHAT_DTYPE; auto: bfloat16 on a GPU, float32 on CPU)",
    )
    parser.add_argument(
        "--device",
        default=env.get("PERSONACHAT_DEVICE", "auto"),
        type=_device,
        help="auto, cpu, cuda or cuda:N (env PERSONACHAT_DEVICE; auto: the GPUs if any)",
    )


def _add_serving_args(parser: argparse.ArgumentParser, env: dict[str, str]) -> None:
    """Where to listen, how many requests at once, and which engine generates."""
    parser.add_argument(
        "--host",
        default=env.get("PERSONACHAT_HOST"),
        help="address to bind (default 127.0.0.1; 0.0.0.0 on a Space, when SPACE_ID is set)",
    )
    parser.add_argument(
        "--port", type=int, default=int(env.get("PERSONACHAT_PORT", env.get("PORT", "7860")))
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=int(env.get("PERSONACHAT_CONCURRENCY", "8")),
        help="chat requests generating at once, page and API together; they share one batch "
        "(default 8; more wait for a slot)",
    )
    parser.add_argument(
        "--engine",
        default=env.get("PERSONACHAT_ENGINE", "hf"),
        choices=("hf", "vllm"),
        help="hf: PersonaChat's runtime (every setting); vllm: interp-engine's vLLM backend "
        "(additive steering, directions and caps; pip install 'interp-engine[vllm]')",
    )
    parser.add_argument(
        "--num-gpus",
        type=int,
        default=int(env.get("PERSONACHAT_NUM_GPUS", "1")),
        help="GPUs to shard the model over with --engine vllm (tensor parallelism; default 1)",
    )


def _add_public_args(parser: argparse.ArgumentParser, env: dict[str, str]) -> None:
    """Hosting in public: which models load, and the upload cap (personachat.app.public)."""
    default = env.get("PERSONACHAT_PUBLIC", "1" if env.get("SPACE_ID") else "0")
    parser.add_argument(
        "--public",
        action=argparse.BooleanOptionalAction,
        default=default.lower() in {"1", "true", "yes", "on"},
        help="public mode: only allowed models load, store writes need the admin token "
        f"({ADMIN_ENV}), errors show no server path, uploads are capped (env PERSONACHAT_PUBLIC; "
        "on by default on a Space, when SPACE_ID is set; --no-public turns it off)",
    )
    parser.add_argument(
        "--allow-models",
        action="append",
        default=[env.get("PERSONACHAT_ALLOW_MODELS", "")],
        help="more models a public server may load besides --model, comma-separated "
        "(env PERSONACHAT_ALLOW_MODELS)",
    )
    parser.add_argument(
        "--max-upload-bytes",
        type=int,
        default=int(env.get("PERSONACHAT_MAX_UPLOAD_BYTES", str(MAX_UPLOAD_BYTES))),
        help=f"the largest upload a public server takes, in bytes (default {MAX_UPLOAD_BYTES})",
    )


def access(config: AppConfig, env: dict[str, str] | None = None) -> Access:
    """What visitors may do under ``config`` (the admin token from ``PERSONACHAT_ADMIN_TOKEN``)."""
    from personachat.app.models import DEMO_ID, is_demo

    env = dict(os.environ) if env is None else env
    if not config.public:
        return Access()
    models = [config.model, *config.allow_models]
    if is_demo(config.model):
        models.append(DEMO_ID)
    token = env.get(ADMIN_ENV, "").strip() or None
    return Access(True, tuple(dict.fromkeys(models)), token, config.max_upload_bytes)


DTYPES = ("auto", "float32", "bfloat16", "float16")


def _device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; anything else is an argparse error."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"device {text!r}: use auto, cpu, cuda or cuda:N")


def _resolve(path: str) -> str:
    """A relative path missing here but present below the repo root (``python /x/app.py`` from
    elsewhere) becomes absolute; existing paths and hub names stay as given."""
    candidate = ROOT / path
    if not Path(path).is_absolute() and not Path(path).exists() and candidate.exists():
        return str(candidate)
    return path


def _looks_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.startswith("store/") or Path(model).exists()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _cached(model: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # not a valid repo id
        return False


def missing(config: AppConfig) -> list[str]:
    """What must exist before the app can serve, each with how to make it."""
    problems = []
    model = Path(config.model).expanduser()
    if _looks_local(config.model):
        if not (model / "config.json").is_file():
            problems.append(
                f"model folder {model} has no config.json. Train the bundled demo model with "
                "`python scripts/train_demo_model.py`, or pass --model NAME_OR_PATH."
            )
    elif _offline() and not _cached(config.model):
        problems.append(
            f"{config.model!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set, so it "
            "cannot be downloaded. Pass a local folder (--model /path/to/model) or download it "
            "first (hf download NAME)."
        )
    if not config.store.is_dir():
        problems.append(
            f"store folder {config.store} does not exist. Create it (mkdir -p {config.store}) "
            "or pass --store PATH / PERSONACHAT_STORE."
        )
    return problems


def unreadable_store(store: Path) -> list[str]:
    """The store's catalog cannot be opened (a damaged ``catalog.duckdb``): one line saying so
    and what to do; nothing when it opens."""
    from personachat.store import Store

    try:
        with Store(store, read_only=True) as opened:
            opened.models()
    except Exception as err:  # duckdb's corrupt-file errors, a StoreError, an OSError
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return [
            f"the store's catalog in {store} cannot be read ({reason}). Restore "
            f"{store / 'catalog.duckdb'} from a backup, or start from an empty store "
            "(--store NEW_FOLDER) and register the vectors again."
        ]
    return []


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("personachat").setLevel(os.environ.get("PERSONACHAT_LOG", "INFO").upper())
    config = parse_args(argv)
    problems = missing(config) or unreadable_store(config.store)
    if problems:
        for problem in problems:
            print(f"personachat: cannot start: {problem}", file=sys.stderr)
        return 2
    from personachat.app.api.server import build_app, serve
    from personachat.app.backend import Backend
    from personachat.app.hold import HOLD_ENV
    from personachat.app.models import DEMO_ID
    from personachat.app.page import CSS, build_ui, theme
    from personachat.app.serving import for_environment

    hold = os.environ.get(HOLD_ENV) or None  # a test aid (personachat.app.hold)
    try:
        serving = for_environment(config.engine, config.num_gpus, config.concurrency)
    except ValueError as err:
        print(f"personachat: cannot start: {err}", file=sys.stderr)
        return 2
    backend = Backend(
        config.model,
        config.store,
        dtype=config.dtype,
        device=config.device,
        hold_message=hold,
        serving=serving,
        access=access(config),
    )
    if backend.is_demo(config.model) and not backend.store().vectors(DEMO_ID):
        print(
            "personachat: first start with the demo model: registering its persona vectors and "
            f"neurons in {config.store} (once)",
            flush=True,
        )
        print(f"personachat: {backend.register_demo()}", flush=True)
    demo = build_ui(backend, concurrency=config.concurrency)
    demo.queue(default_concurrency_limit=config.concurrency)
    cap = {"max_file_size": config.max_upload_bytes} if config.public else {}
    app = build_app(demo, backend, css=CSS, theme=theme(), footer_links=["api"], **cap)
    try:
        server = serve(app, config.host, config.port)
    except OSError as err:
        print(f"personachat: cannot start: {err}", file=sys.stderr)
        return 2
    print(
        f"PersonaChat on http://{config.host}:{config.port} (model {config.model}, "
        f"store {config.store}; OpenAI API at /v1; replies through {serving.path}); "
        f"page ready in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    backend.warm_up()
    server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
