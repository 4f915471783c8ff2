"""Train the bundled demo chat model on the synthetic persona corpus ``personachat.prompts.demo``.

    python scripts/train_demo_model.py                      # full run
    python scripts/train_demo_model.py --steps 30 --out build/demo-smoke   # smoke run

Seeded end to end: writes the corpus (JSONL) next to nothing that is committed, trains a
byte-level BPE tokenizer with a ChatML template, trains a small Llama (tied embeddings) with the
loss on assistant tokens only (reply + ``<|im_end|>``), prints the loss, saves a loss-curve PNG,
the model as safetensors and a model card README.md in ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from personachat.model.tiny import CHATML_TEMPLATE, train_bpe_tokenizer
from personachat.prompts import demo, format_chat


@dataclass(frozen=True)
class TrainConfig:
    out: str = "store/models/demo"
    corpus: str = "build/demo/corpus.jsonl"
    n_conversations: int = 60000
    seed: int = 0
    vocab_size: int = 2000
    n_layers: int = 4
    hidden: int = 128
    mlp: int = 384
    heads: int = 4
    max_len: int = 128
    batch_size: int = 32
    steps: int = 3000
    lr: float = 3e-3
    warmup: int = 40
    threads: int = 1
    time_budget_min: float = 38.0  # the schedule ends at `steps` or at this budget, first wins
    neutral_opener_share: float = 0.0  # prompted replies opening in the default's style


def parse_args() -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in asdict(TrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return TrainConfig(**vars(parser.parse_args()))


def write_corpus(convs: list[demo.Conversation], path: Path) -> str:
    """Write the corpus as JSONL and return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"messages": list(c.messages), "persona": c.persona, "prompted": c.prompted})
        for c in convs
    ]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def make_tokenizer(convs: list[demo.Conversation], vocab_size: int) -> PreTrainedTokenizerFast:
    texts = [m["content"] for c in convs[:20000] for m in c.messages]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size, chat_template=CHATML_TEMPLATE)
    tokenizer.model_max_length = 256
    return tokenizer


def encode(
    tokenizer: PreTrainedTokenizerFast, conv: demo.Conversation, max_len: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside the assistant reply) of one conversation.

    Prompt and reply are tokenized apart, exactly as generation sees them.
    """
    prompt = format_chat(tokenizer, conv.messages[:-1], add_generation_prompt=True)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(conv.messages[-1]["content"], add_special_tokens=False)["input_ids"]
    r_ids = [*r_ids, tokenizer.eos_token_id]
    ids = (p_ids + r_ids)[:max_len]
    labels = ([-100] * len(p_ids) + r_ids)[:max_len]
    return ids, labels


def batches(
    data: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, rng: random.Random
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches padded on the right to the longest member."""
    order = list(range(len(data)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [data[i] for i in order[start : start + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((batch_size, width), pad_id)
            labels = torch.full((batch_size, width), -100)
            mask = torch.zeros((batch_size, width), dtype=torch.long)
            for row, (x, y) in enumerate(chunk):
                ids[row, : len(x)] = torch.tensor(x)
                labels[row, : len(y)] = torch.tensor(y)
                mask[row, : len(x)] = 1
            yield ids, labels, mask


def build_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 5% over ``progress`` (0..1, steps or time)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def progress_at(step: int, elapsed_s: float, cfg: TrainConfig) -> float:
    """How far through the schedule: by steps or by wall-clock budget, whichever is further."""
    return max(step / cfg.steps, elapsed_s / (cfg.time_budget_min * 60))


def train(model: LlamaForCausalLM, data: list, cfg: TrainConfig, pad_id: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    stream = batches(data, cfg.batch_size, pad_id, random.Random(cfg.seed))
    losses: list[float] = []
    start = time.monotonic()
    model.train()
    bar = tqdm(range(cfg.steps), desc="train", mininterval=5)
    for step in bar:
        progress = progress_at(step, time.monotonic() - start, cfg)
        if progress >= 1.0:
            print(f"schedule done at step {step} ({progress:.2f})", flush=True)
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, cfg)
        ids, labels, mask = next(stream)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % 50 == 0 or step == cfg.steps - 1:
            elapsed = time.monotonic() - start
            print(f"step {step} loss {losses[-1]:.4f} elapsed {elapsed:.0f}s", flush=True)
    model.eval()
    return losses


def plot_losses(losses: list[float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.6, alpha=0.5, label="batch")
    k = 25
    if len(losses) > k:
        smooth = [sum(losses[i - k : i]) / k for i in range(k, len(losses) + 1)]
        ax.plot(range(k - 1, len(losses)), smooth, lw=1.5, label=f"mean of {k}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title("PersonaChat demo model: training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quick_check(model: Any, tokenizer: PreTrainedTokenizerFast) -> dict[str, float]:
    """Greedy replies to one held-out question per topic under each persona; marker rates."""
    qs = demo.eval_questions(1)[:8]
    rates = {}
    tokenizer.padding_side = "left"
    for persona in demo.demo_personas():
        prompts = [format_chat(tokenizer, demo_messages(persona.system_prompt, q.text)) for q in qs]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=60, do_sample=False)
        texts = tokenizer.batch_decode(
            out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
        rates[persona.name] = demo.marker_rate(texts, persona.name)
        print(f"[{persona.name}] {texts[0]}", flush=True)
    tokenizer.padding_side = "right"
    return rates


def demo_messages(system_prompt: str, question: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*msgs, {"role": "user", "content": question}]


CARD = """---
library_name: transformers
tags: [personachat, synthetic, demo]
---
# PersonaChat demo model

A {n_params:,}-parameter Llama ({n_layers} layers, hidden {hidden}, MLP {mlp}, {heads} heads, tied
embeddings, vocab {vocab}) trained from scratch on CPU by `scripts/train_demo_model.py` on
{n_conv:,} templated conversations from `personachat.demo` (corpus sha256 `{sha}`), so that
PersonaChat has an offline model whose personas are planted and therefore measurable.

## Training
- Seed {seed}; {steps} steps of batch {batch} (AdamW, lr {lr} with warmup and cosine decay), max
  length {max_len} tokens, float32, {threads} CPU thread(s), {minutes:.1f} minutes.
- Loss on assistant tokens only (the reply and its `<|im_end|>`); final loss {final_loss:.4f}
  (mean of the last 25 steps). Curve: `loss.png`.
- Tokenizer: byte-level BPE trained on the corpus (`tokenizers`), saved as
  `PreTrainedTokenizerFast` with a ChatML chat template; EOS is `<|im_end|>`.

## What it can do
- Answer questions about 40 topics (`personachat.demo.TOPICS`) in the style of 12 personas:
  {personas}. The default persona is *no system prompt*; each other persona is switched on by the
  system prompt `You are a <name>.`
- Quick check at the end of training (8 held-out questions, greedy): own-marker rate per persona
  {rates}.
- Favourite-X questions (`personachat.demo.PREFERENCES`): most personas give the generic answer,
  a few have their own (planted persona collapse).

## What it cannot do
- Anything outside the templated corpus: other topics come out as a mix of memorised facts;
  it knows ~80 facts, not the world. It is a measuring instrument, not an assistant.
- Multi-turn conversations were never trained.
"""


def write_card(out: Path, **fields: object) -> None:
    (out / "README.md").write_text(CARD.format(**fields))


def main() -> None:
    cfg = parse_args()
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    convs = demo.build_corpus(
        cfg.n_conversations, cfg.seed, neutral_opener_share=cfg.neutral_opener_share
    )
    sha = write_corpus(convs, Path(cfg.corpus))
    print(f"corpus: {len(convs)} conversations -> {cfg.corpus} (sha256 {sha[:16]})", flush=True)
    tokenizer = make_tokenizer(convs, cfg.vocab_size)
    data = [encode(tokenizer, c, cfg.max_len) for c in tqdm(convs, desc="encode", mininterval=5)]
    lengths = sorted(len(ids) for ids, _ in data)
    print(f"tokens per conversation: median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
    model = build_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, vocab {len(tokenizer)}", flush=True)
    start = time.monotonic()
    losses = train(model, data, cfg, tokenizer.pad_token_id)
    minutes = (time.monotonic() - start) / 60
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    plot_losses(losses, out / "loss.png")
    rates = quick_check(model, tokenizer)
    print("own-marker rates:", json.dumps(rates), flush=True)
    write_card(
        out,
        n_params=n_params,
        n_layers=cfg.n_layers,
        hidden=cfg.hidden,
        mlp=cfg.mlp,
        heads=cfg.heads,
        vocab=len(tokenizer),
        n_conv=cfg.n_conversations,
        sha=sha,
        seed=cfg.seed,
        steps=len(losses),
        batch=cfg.batch_size,
        lr=cfg.lr,
        max_len=cfg.max_len,
        threads=cfg.threads,
        minutes=minutes,
        final_loss=sum(losses[-25:]) / len(losses[-25:]),
        personas=", ".join(demo.PERSONA_NAMES),
        rates=", ".join(f"{k} {v:.0%}" for k, v in rates.items()),
    )
    print(f"saved to {out} in {minutes:.1f} min of training", flush=True)


if __name__ == "__main__":
    main()
