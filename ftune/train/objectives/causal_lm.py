"""Next-token cross-entropy on the labelled tokens (stages pt and sft).

The output projection (lm_head, 49k-150k rows) is applied only at positions whose next token
carries a loss, in chunks, with the gradients computed while each chunk's logits are at hand
(fused linear-cross-entropy in plain torch): in SFT most positions are prompt tokens, and the full
[tokens x vocab] logits would be the largest tensor of the step. Measured on the default CPU
workload: 1.2x tokens/s for the target-only chunks; computing the gradients in the forward pass
saves one more head matmul and the recompute per chunk (within the run-to-run noise there).
The fp32 logits (100 MB per 512 tokens) are never built.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ftune import runtime
from ftune.config.stage_schema import StageConfig
from ftune.data.collate import collate
from ftune.data.tokenize import IGNORE
from ftune.train import distributed
from ftune.train.objectives import Objective, StageSpec, register

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
CHUNK = runtime.HEAD_CHUNK  # the memory estimate (plan) counts the same chunk


def count_targets(batch: dict) -> int:
    """Tokens that carry a loss: labels past the first position that are not IGNORE."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def causal_lm_module(model: Any) -> Any | None:
    """The *ForCausalLM inside `model` (DDP and peft wrappers unwrapped) when its logits are
    plainly lm_head(hidden): not for a LoRA-adapted or fully trained head (modules_to_save),
    logit soft-capping or scaling, or sharded (FSDP) parameters."""
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


class _HeadCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(hidden @ W^T + b, targets), with the gradients computed in
    the forward pass, CHUNK rows at a time.

    The loss is a sum, so its gradient is (softmax - onehot) times one upstream scalar: computing
    it while each chunk's logits are at hand keeps only [rows x d] (and the head's own gradient
    when it trains) until the backward pass, which just scales them. Compared with autograd over
    chunks (forward, then logits recomputed and back-propagated) this saves one head matmul and
    four vocabulary-wide passes per chunk; the log-softmax stays in fp32."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int, grad_on: bool) -> torch.Tensor:
        want_h, want_w = grad_on and ctx.needs_input_grad[0], grad_on and ctx.needs_input_grad[1]
        want_b = grad_on and bias is not None and ctx.needs_input_grad[2]
        d_hidden = torch.empty_like(hidden) if want_h else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        d_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, len(hidden), chunk):
            h, t = hidden[i:i + chunk], targets[i:i + chunk]
            logits = F.linear(h, weight, bias).float()
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            peak = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(peak).exp_()  # in place: no second [rows x vocab] tensor
            norm = probs.sum(dim=1, keepdim=True)
            total += (norm.log() + peak).squeeze(1).sub(target_logit).sum()
            if not (want_h or want_w or want_b):
                continue
            grad = probs.div_(norm)
            grad[torch.arange(len(t), device=t.device), t] -= 1.0
            if want_b:
                d_bias += grad.sum(dim=0)
            grad = grad.to(h.dtype)
            if want_h:
                d_hidden[i:i + chunk] = grad @ weight
            if want_w:
                d_weight += (grad.t() @ h).float()
        ctx.save_for_backward(*(g for g in (d_hidden, d_weight, d_bias) if g is not None))
        ctx.wanted = (want_h, want_w, want_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        saved = list(ctx.saved_tensors)
        grads = []
        for want, dtype in zip(ctx.wanted, ctx.dtypes):
            grads.append(saved.pop(0).mul(grad_out).to(dtype) if want else None)
        return (*grads, None, None, None)


def head_cross_entropy(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, chunk: int | None = None
                       ) -> torch.Tensor:
    """Sum of token cross-entropies of head(hidden) against targets, in chunks of CHUNK rows, so
    that one chunk's logits are alive at a time and never all [tokens x vocab] of them."""
    weight, bias = head.weight, head.bias
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):  # the matmul in autocast's dtype, as head(hidden) would run
        dtype = torch.get_autocast_dtype(kind)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    return _HeadCrossEntropy.apply(hidden, weight, bias, targets, chunk or CHUNK, torch.is_grad_enabled())


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
    return head_cross_entropy(head, hidden[mask], labels[mask]), int(mask.sum())  # = count_targets(batch)


def _full_logits_loss(model: Any, inputs: dict, batch: dict) -> torch.Tensor:
    """The plain path: logits at every position (heads that are trained or transformed)."""
    logits = model(**inputs, use_cache=False).logits
    logits = logits[:, -batch["labels"].shape[1]:][:, :-1, :].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


CAUSAL_LM = Objective(loss=lambda model, batch: (*causal_lm(model, batch), {}), count=count_targets, collate=collate)


@dataclass
class PtStageConfig(StageConfig):
    """Continued pretraining: every token of raw text (or of rendered conversations) is a target."""

    name: str = "pt"
    formats: ClassVar[tuple[str, ...]] = ("text", "alpaca", "qa", "messages", "sharegpt")
    train_on: ClassVar[str] = "all"
    token_loss: ClassVar[bool] = True


@dataclass
class SftStageConfig(StageConfig):
    """Supervised fine-tuning: the answers of prompt/answer conversations are the targets
    (dataset.train_on)."""

    name: str = "sft"
    formats: ClassVar[tuple[str, ...]] = ("alpaca", "qa", "messages", "sharegpt")
    token_loss: ClassVar[bool] = True


register(StageSpec(PtStageConfig, lambda stage: CAUSAL_LM))
register(StageSpec(SftStageConfig, lambda stage: CAUSAL_LM))
