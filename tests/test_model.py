"""Loading by local path, failing fast offline, and chat formatting."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from personachat.model import ModelLoadError, load_model, pick_dtype
from personachat.model.tiny import tiny_model
from personachat.prompts import fallback_chat, format_chat, message_text, persona_messages


def test_load_local_path_gives_same_logits(tmp_path: Path) -> None:
    lm = tiny_model("qwen2")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.info.model_id == str(tmp_path)
    assert loaded.info.architecture == "qwen2" and loaded.info.n_layers == 3
    assert loaded.device.type == "cpu" and next(loaded.model.parameters()).dtype == torch.float32
    ids = lm.tokenizer("hello there", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**ids).logits, lm.model(**ids).logits)
    assert not loaded.model.training


def test_offline_uncached_name_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="local path"):
        load_model("someone/not-a-cached-model")
    assert time.perf_counter() - start < 2.0


def test_dtype_choice() -> None:
    assert pick_dtype("auto") == torch.float32  # no GPU here
    assert pick_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        pick_dtype("float7")


def test_chat_template_is_used() -> None:
    tok = tiny_model("llama").tokenizer
    text = format_chat(tok, persona_messages("You are a pirate.", "Where is the gold?"))
    assert text == (
        "<|im_start|>system\nYou are a pirate.<|im_end|>\n"
        "<|im_start|>user\nWhere is the gold?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_plain_text_fallback_without_template() -> None:
    tok = tiny_model("llama").tokenizer
    tok.chat_template = None
    text = format_chat(tok, persona_messages(None, "Hi?"))
    assert text == "User: Hi?\n\nAssistant:"
    assert fallback_chat([{"role": "system", "content": "S"}], False) == "System: S"


def test_gradio_content_parts_become_text() -> None:
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
    }
    assert message_text(parts) == "ab"
    assert message_text({"role": "user", "content": "plain"}) == "plain"


def test_no_network_uncached_name_fails_fast(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        load_model("someone/not-a-cached-model")
    assert time.perf_counter() - start < 5.0
