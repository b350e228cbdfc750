"""The DPO family on preference pairs: DPO (sigmoid), conservative DPO (label smoothing), IPO,
SimPO and ORPO. Chosen and rejected answers go through the model in one concatenated forward.

Reference log-probs come from the same model with its adapter disabled (no second copy of the
base); SimPO and ORPO need no reference. Every loss is a function of per-sequence summed log-probs
and token counts, so the formulas below can be checked against the papers on plain numbers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ftune.data.collate import collate
from ftune.data.tokenize import IGNORE
from ftune.errors import FtuneError
from ftune.train.objectives import OBJECTIVES, Objective

REFERENCE_FREE = ("simpo", "orpo")


def collate_pairs(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows, padded together: one forward for both."""
    batch = collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)
    batch["n_pairs"] = torch.tensor(len(pairs))
    return batch


def sequence_logps(model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of the labelled tokens, their count) per row."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, -batch["labels"].shape[1]:][:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    mask = labels != IGNORE
    return -(nll * mask).sum(-1), mask.sum(-1)


def reference_logps(model: Any, batch: dict) -> torch.Tensor:
    if not hasattr(model, "disable_adapter"):
        raise FtuneError("stage=dpo needs reference log-probs: train an adapter method (lora, …), whose disabled "
                         "adapter is the reference, or use stage.loss=simpo|orpo (reference-free)")
    with torch.no_grad(), model.disable_adapter():
        return sequence_logps(model, batch)[0]


def pair_losses(stage: Any, pc: torch.Tensor, pr: torch.Tensor, lc: torch.Tensor, lr: torch.Tensor,
                rc: torch.Tensor | None, rr: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, reward of chosen, reward of rejected) from summed log-probs p*, token counts
    l*, and reference log-probs r* (None for reference-free losses)."""
    beta = stage.beta
    if stage.loss in ("sigmoid", "cdpo"):
        h = (pc - rc) - (pr - rr)
        eps = stage.label_smoothing
        loss = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        return loss, beta * (pc - rc), beta * (pr - rr)
    if stage.loss == "ipo":  # IPO on length-averaged log-ratios, as in the reference implementation
        h = (pc - rc) / lc - (pr - rr) / lr
        return (h - 1 / (2 * beta)) ** 2, beta * (pc - rc) / lc, beta * (pr - rr) / lr
    avg_c, avg_r = pc / lc, pr / lr
    if stage.loss == "simpo":
        gamma = stage.simpo_gamma_ratio * beta
        return -F.logsigmoid(beta * (avg_c - avg_r) - gamma), beta * avg_c, beta * avg_r
    if stage.loss == "orpo":
        log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
        return -avg_c - stage.orpo_lambda * F.logsigmoid(log_odds), beta * avg_c, beta * avg_r
    raise FtuneError(f"stage.loss: unknown DPO-family loss '{stage.loss}'")


def make_dpo(stage: Any) -> Objective:
    def loss(model: Any, batch: dict) -> tuple[torch.Tensor, int, dict[str, float]]:
        n = int(batch["n_pairs"])
        logps, counts = sequence_logps(model, batch)
        counts = counts.clamp(min=1).to(logps.dtype)
        ref = None if stage.loss in REFERENCE_FREE else reference_logps(model, batch)
        rc, rr = (None, None) if ref is None else (ref[:n], ref[n:])
        losses, rew_c, rew_r = pair_losses(stage, logps[:n], logps[n:], counts[:n], counts[n:], rc, rr)
        rew_c, rew_r, logps = rew_c.detach(), rew_r.detach(), logps.detach()
        metrics = {"rewards_chosen": float(rew_c.sum()), "rewards_rejected": float(rew_r.sum()),
                   "margin": float((rew_c - rew_r).sum()), "accuracy": float((rew_c > rew_r).float().sum()),
                   "logps_chosen": float(logps[:n].sum()), "logps_rejected": float(logps[n:].sum()),
                   # The policy's own preference, comparable with the starting model (whose DPO
                   # rewards are all zero): does it give the chosen answer more probability per token?
                   "logp_accuracy": float((logps[:n] / counts[:n] > logps[n:] / counts[n:]).float().sum())}
        return losses.sum(), n, metrics

    return Objective(loss=loss, count=lambda batch: int(batch["n_pairs"]), collate=collate_pairs)


OBJECTIVES.register("dpo")(make_dpo)
