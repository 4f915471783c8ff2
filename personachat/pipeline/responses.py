"""Generate the responses a dataset lacks, with the loaded model under each persona's prompt.

Generation is batched (left padding), seeded per batch, and cached on disk as JSON keyed by the
model's identity, the dataset's SHA-256 and the generation settings, so a re-run with the same
model and dataset reads the cache instead of generating again. Cells the dataset already has are
never regenerated. A cache row may keep the token ids the model generated (``ids``): a re-run then
reads exactly those ids, as the run that generated them did.

``generate`` then a teacher-forced capture is the plain way; extraction answers and captures in
one pass instead (``personachat.activations.generate_live``) and uses ``read_cache`` and
``write_cache`` here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from personachat.activations import Dist, GenerationConfig  # GenerationConfig: re-exported
from personachat.activations.live import eos_ids, reply_ids
from personachat.model import LoadedModel
from personachat.prompts import PersonaDataset, format_chat, persona_messages

log = logging.getLogger(__name__)

Cell = tuple[str, str]


def default_cache_dir() -> Path:
    root = os.environ.get("PERSONACHAT_CACHE") or Path.home() / ".cache" / "personachat"
    return Path(root) / "responses"


def model_fingerprint(lm: LoadedModel) -> str:
    """The model's id and revision plus a checksum of its first and last weights."""
    params = list(lm.model.parameters())
    probe = [float(params[0].detach().float().sum()), float(params[-1].detach().float().sum())]
    return f"{lm.info.model_id}@{lm.info.revision}:{sum(p.numel() for p in params)}:{probe}"


def prompt_text(lm: LoadedModel, dataset: PersonaDataset, cell: Cell) -> str:
    """The rendered prompt a cell's response is generated from."""
    persona, question = cell
    messages = persona_messages(dataset.persona(persona).system_prompt, question)
    return format_chat(lm.tokenizer, messages)


def cache_key(
    lm: LoadedModel, dataset: PersonaDataset, cells: list[Cell], cfg: GenerationConfig
) -> str:
    """Keyed by the model, the dataset, the settings and the rendered prompts themselves (a new
    chat template or a pinned date gives new responses)."""
    prompts = hashlib.sha256()
    for cell in sorted(cells):
        prompts.update(prompt_text(lm, dataset, cell).encode() + b"\0")
    blob = json.dumps(
        [model_fingerprint(lm), dataset.sha256, sorted(cells), asdict(cfg), prompts.hexdigest()],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def missing_cells(dataset: PersonaDataset, personas: list[str] | None = None) -> list[Cell]:
    names = dataset.persona_names if personas is None else personas
    return [(p, q) for p in names for q in dataset.questions if (p, q) not in dataset.responses]


def generate(
    lm: LoadedModel,
    dataset: PersonaDataset,
    cells: list[Cell],
    cfg: GenerationConfig,
    *,
    progress: bool = True,
) -> dict[Cell, str]:
    """Generate one response per (persona, question) cell, batched and seeded."""
    made = generate_ids(lm, dataset, cells, cfg, progress=progress)
    return {cell: text for cell, (text, _) in made.items()}


def generate_ids(
    lm: LoadedModel,
    dataset: PersonaDataset,
    cells: list[Cell],
    cfg: GenerationConfig,
    *,
    progress: bool = True,
) -> dict[Cell, tuple[str, list[int]]]:
    """``generate``, with the response ids of each reply (every generated token before the
    first EOS): what a capture of the reply reads."""
    tok = lm.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    eos = eos_ids(lm)
    out: dict[Cell, tuple[str, list[int]]] = {}
    bar = tqdm(total=len(cells), desc="responses", disable=not progress, unit="reply")
    try:
        for b, start in enumerate(range(0, len(cells), cfg.batch_size)):
            chunk = cells[start : start + cfg.batch_size]
            texts = [prompt_text(lm, dataset, cell) for cell in chunk]
            special = not bool(getattr(tok, "chat_template", None))
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=special)
            enc = {k: v.to(lm.device) for k, v in enc.items()}
            torch.manual_seed(cfg.seed + b)
            sample = cfg.temperature > 0
            with torch.inference_mode():
                ids = lm.model.generate(
                    **enc,
                    max_new_tokens=cfg.max_new_tokens,
                    do_sample=sample,
                    temperature=cfg.temperature if sample else None,
                    top_p=cfg.top_p if sample else None,
                    pad_token_id=tok.pad_token_id,
                )
            new = ids[:, enc["input_ids"].shape[1] :]
            for cell, row in zip(chunk, new, strict=True):
                text = str(tok.decode(row, skip_special_tokens=True)).strip()
                # an empty reply still needs one response token
                out[cell] = (text or "...", reply_ids(row.tolist(), eos))
            bar.update(len(chunk))
    finally:
        tok.padding_side = old_side
        bar.close()
    return out


@dataclass(frozen=True)
class Cached:
    """What the cache holds for a run: the dataset with its cached responses, the generated ids
    the cache kept, the cells still to generate and the cache file they go to."""

    dataset: PersonaDataset
    ids: dict[Cell, tuple[int, ...]]
    missing: list[Cell]
    path: Path | None


def read_cache(
    lm: LoadedModel,
    dataset: PersonaDataset,
    personas: list[str] | None,
    cfg: GenerationConfig,
    cache_dir: str | Path | None = None,
) -> Cached:
    """The cached responses of ``dataset``'s missing cells, or the cells left to generate."""
    cells = missing_cells(dataset, personas)
    if not cells:
        return Cached(dataset, {}, [], None)
    key = cache_key(lm, dataset, cells, cfg)
    path = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"{key[:32]}.json"
    if not path.is_file():
        return Cached(dataset, {}, cells, path)
    rows = json.loads(path.read_text(encoding="utf-8"))
    log.info("read %d cached responses from %s", len(rows), path)
    texts = {(r["persona"], r["question"]): r["response"] for r in rows}
    ids = {(r["persona"], r["question"]): tuple(r["ids"]) for r in rows if r.get("ids")}
    return Cached(dataset.with_responses(texts), ids, [], path)


def write_cache(
    path: Path, made: Mapping[Cell, str], ids: Mapping[Cell, Sequence[int]] | None = None
) -> None:
    """Write generated responses (and the ids generated, where given) atomically."""
    ids = ids or {}
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for (p, q), r in made.items():
        row: dict[str, object] = {"persona": p, "question": q, "response": r}
        if (p, q) in ids:
            row["ids"] = [int(i) for i in ids[(p, q)]]
        rows.append(row)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(path)


def ensure_responses(
    lm: LoadedModel,
    dataset: PersonaDataset,
    personas: list[str] | None = None,
    cfg: GenerationConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    dist: Dist | None = None,
) -> PersonaDataset:
    """``dataset`` with every (persona, question) cell of ``personas`` answered.

    Missing cells come from the cache when present; otherwise they are generated (split across
    processes under ``dist``) and the main process writes the cache.
    """
    cfg = cfg or GenerationConfig()
    dist = dist or Dist()
    cached = read_cache(lm, dataset, personas, cfg, cache_dir)
    if not cached.missing or cached.path is None:
        return cached.dataset
    log.info("generating %d responses with %s", len(cached.missing), lm.info.model_id)
    mine = generate(
        lm, dataset, dist.shard(cached.missing), cfg, progress=progress and dist.is_main
    )
    made: dict[Cell, str] = {}
    for part in dist.gather(mine):
        made.update(part)
    if dist.is_main:
        write_cache(cached.path, made)
    return dataset.with_responses(made)
