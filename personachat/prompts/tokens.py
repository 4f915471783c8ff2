"""Tokens and the characters they came from: map a character offset of a text to its token.

Fast tokenizers report each token's character span; slow ones are asked again for the prefix
before the character, which gives the same index for text the tokenizer splits at that point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, eq=False)
class Tokenized:
    """A text's token ids, and the way back from a character offset to a token index."""

    text: str
    ids: list[int]
    ends: list[int] | None  # each token's end offset (fast tokenizers), else None
    tokenizer: Any
    special: bool

    def token_at(self, char: int) -> int:
        """The index of the first token that ends past character ``char`` (``len(ids)`` when
        none does): the token holding that character."""
        if self.ends is not None:
            return next((i for i, end in enumerate(self.ends) if end > char), len(self.ids))
        prefix = self.tokenizer(self.text[:char], add_special_tokens=self.special)["input_ids"]
        return len(prefix)


def tokenize(tokenizer: Any, text: str, *, add_special_tokens: bool) -> Tokenized:
    """``text`` tokenized once, keeping what ``Tokenized.token_at`` needs."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ends = [int(end) for _, end in enc["offset_mapping"]]
        return Tokenized(text, list(enc["input_ids"]), ends, tokenizer, add_special_tokens)
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    return Tokenized(text, ids, None, tokenizer, add_special_tokens)
