"""Next-token cross-entropy on the labelled tokens (stages pt and sft).

The output projection (lm_head, 49k-150k rows) is applied only at positions whose next token
carries a loss, in chunks: in SFT most positions are prompt tokens, and the full [tokens x vocab]
logits would be the largest tensor of the step. Measured on the default CPU workload: 1.2x
tokens/s, and the fp32 logits (100 MB per 512 tokens) are never built.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ftune.data.collate import collate
from ftune.data.tokenize import IGNORE
from ftune.train.objectives import OBJECTIVES, Objective

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
CHUNK = 4096  # target positions per logits chunk: 4096 x 150k-vocab fp32 logits = 2.4 GB at most


def count_targets(batch: dict) -> int:
    """Tokens that carry a loss: labels past the first position that are not IGNORE."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def causal_lm_module(model: Any) -> Any | None:
    """The *ForCausalLM inside `model` (DDP and peft wrappers unwrapped) when its logits are
    plainly lm_head(hidden): not for a LoRA-adapted or fully trained head (modules_to_save),
    logit soft-capping or scaling, or sharded (FSDP) parameters."""
    from ftune.train import distributed

    if distributed.is_sharded(model):
        return None
    inner = getattr(model, "module", model)  # DDP
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    config = getattr(inner, "config", None)
    if type(getattr(inner, "lm_head", None)) is not nn.Linear or config is None:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    return inner


@contextmanager
def head_removed(lm: Any) -> Iterator[nn.Linear]:
    """Swap lm_head for identity during a forward, so the model returns its final hidden states
    (through every wrapper's own forward, DDP's gradient hooks included)."""
    head = lm.lm_head
    lm.lm_head = nn.Identity()
    try:
        yield head
    finally:
        lm.lm_head = head


def _chunk_loss(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")  # fp32 log-softmax: stable


def head_cross_entropy(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, chunk: int | None = None
                       ) -> torch.Tensor:
    """Sum of token cross-entropies of lm_head(hidden) against targets, CHUNK rows at a time.
    With several chunks each is recomputed in the backward pass, so one chunk's logits are alive
    at a time (what fused linear-cross-entropy kernels do, in plain torch)."""
    chunk = chunk or CHUNK
    if len(hidden) <= chunk:
        return _chunk_loss(head, hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, len(hidden), chunk):
        part = (head, hidden[i:i + chunk], targets[i:i + chunk])
        total = total + (checkpoint(_chunk_loss, *part, use_reentrant=False) if torch.is_grad_enabled()
                         else _chunk_loss(*part))
    return total


def causal_lm(model: Any, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of token losses, target token count) for one micro-batch."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    labels = batch["labels"][:, 1:]  # the token at t+1 is predicted at position t
    lm = causal_lm_module(model)
    if lm is None:
        return _full_logits_loss(model, inputs, batch), count_targets(batch)
    with head_removed(lm) as head:
        hidden = model(**inputs, use_cache=False).logits
    # Soft-prompt methods prepend virtual tokens to the output; keep the positions of the input.
    hidden = hidden[:, -batch["labels"].shape[1]:][:, :-1]
    mask = labels != IGNORE
    if not bool(mask.any()):  # nothing to learn in this micro-batch; keep the graph connected
        return hidden.sum() * 0.0, 0
    return head_cross_entropy(head, hidden[mask], labels[mask]), count_targets(batch)


def _full_logits_loss(model: Any, inputs: dict, batch: dict) -> torch.Tensor:
    """The plain path: logits at every position (heads that are trained or transformed)."""
    logits = model(**inputs, use_cache=False).logits
    logits = logits[:, -batch["labels"].shape[1]:][:, :-1, :].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


CAUSAL_LM = Objective(loss=lambda model, batch: (*causal_lm(model, batch), {}), count=count_targets, collate=collate)
OBJECTIVES.register("causal_lm")(lambda stage: CAUSAL_LM)
