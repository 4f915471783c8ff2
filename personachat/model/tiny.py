"""Tiny random models and an offline byte-level BPE tokenizer, for tests and benchmarks.

Nothing here downloads anything: tokenizers are trained in milliseconds with ``tokenizers`` and
models are built from transformers configs with random weights (seeded).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from personachat.model.load import LoadedModel, wrap_model

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_SAMPLE_TEXT = (
    "You are a pirate. You are a helpful assistant. What is the capital of France? "
    "Tell me about the ocean, the stars, mathematics, history and cooking. Arr, matey! "
    "The answer is Paris. I think, therefore I am. Numbers 0 1 2 3 4 5 6 7 8 9."
)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 400, chat_template: str = CHATML_TEMPLATE
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, with ChatML special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = chat_template
    return fast


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer([_SAMPLE_TEXT] * 4, vocab_size=400)


TINY_ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma2", "gpt2", "phi3", "olmo2")


def tiny_config(arch: str, vocab_size: int, *, n_layers: int = 3, hidden: int = 32) -> Any:
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if arch == "gpt2":
        extra = {"n_embd": hidden, "n_layer": n_layers, "n_head": 4, "n_positions": 512}
        return AutoConfig.for_model("gpt2", **common, **extra)
    extra = {
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    }
    if arch == "gemma2":
        extra["head_dim"] = hidden // 4
    return AutoConfig.for_model(arch, **common, **extra)


def tiny_model(
    arch: str = "llama", *, n_layers: int = 3, hidden: int = 32, seed: int = 0
) -> LoadedModel:
    """A seeded random causal LM of ``arch`` with a trained tiny tokenizer."""
    tokenizer = tiny_tokenizer()
    config = tiny_config(arch, len(tokenizer), n_layers=n_layers, hidden=hidden)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-zero weights in some architectures; widen them so hidden states
    # differ clearly across tokens and steering has visible effects.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name and "wte" not in name:
                param.normal_(0.0, 0.2)
    return wrap_model(model, tokenizer, f"tiny-{arch}")
