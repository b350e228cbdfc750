"""Next-token cross-entropy on the labelled tokens (stages pt and sft)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ftune.data.collate import collate
from ftune.data.tokenize import IGNORE
from ftune.train.objectives import OBJECTIVES, Objective

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def count_targets(batch: dict) -> int:
    """Tokens that carry a loss: labels past the first position that are not IGNORE."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def causal_lm(model: Any, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of token losses, target token count) for one micro-batch."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    logits = model(**inputs, use_cache=False).logits
    # Soft-prompt methods prepend virtual tokens to the output; keep the positions of the input.
    logits = logits[:, -batch["labels"].shape[1]:]
    # Shift: the logits at position t predict the token at t+1. fp32 for a stable log-softmax.
    logits = logits[:, :-1, :].float()
    labels = batch["labels"][:, 1:]
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
    return loss_sum, count_targets(batch)


CAUSAL_LM = Objective(loss=lambda model, batch: (*causal_lm(model, batch), {}), count=count_targets, collate=collate)
OBJECTIVES.register("causal_lm")(lambda stage: CAUSAL_LM)
