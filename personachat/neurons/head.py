"""The LM head on final hidden states, as the scorers read it: logits, soft-capped where the
model's config sets ``final_logit_softcapping``."""

from __future__ import annotations

import torch

from personachat.model import LoadedModel


def logits(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head (and its soft-capping, where the model has one) on final hidden states."""
    out = lm.model.get_output_embeddings()(hidden).float()
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    return torch.tanh(out / cap) * cap if cap else out
