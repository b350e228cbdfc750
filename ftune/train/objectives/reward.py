"""Reward model (stage rm): a scalar head scores a whole answer at its last token; the pairwise
loss -log sigmoid(r_chosen - r_rejected - margin) teaches it to rank the chosen answer higher
(InstructGPT's reward model, Ouyang et al. 2022; the margin as in Llama 2's reward model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ftune.config.stage_schema import StageConfig
from ftune.train.heads import WithScalarHead, last_token_scores
from ftune.train.objectives import Objective, StageSpec, register
from ftune.train.objectives.dpo import collate_pairs


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0,
                  center_coef: float = 0.0) -> torch.Tensor:
    """Loss per pair; center_coef adds coef x (r_c + r_r)^2 to keep rewards near zero."""
    loss = -F.logsigmoid(chosen - rejected - margin)
    if center_coef:
        loss = loss + center_coef * (chosen + rejected) ** 2
    return loss


def pair_scores(model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores of chosen, scores of rejected) for a batch from collate_pairs."""
    n = int(batch["n_pairs"])
    per_token = model(batch["input_ids"], batch["attention_mask"], head="only")
    scores = last_token_scores(per_token, batch["attention_mask"])
    return scores[:n], scores[n:]


def make_reward(stage: Any) -> Objective:
    def loss(model: Any, batch: dict) -> tuple[torch.Tensor, int, dict[str, float]]:
        chosen, rejected = pair_scores(model, batch)
        losses = pairwise_loss(chosen, rejected, stage.margin, stage.center_rewards_coef)
        c, r = chosen.detach(), rejected.detach()
        # A tie counts half: an untrained (zero) head is at chance, 0.5, not 0.
        metrics = {"accuracy": float((c > r).float().sum() + 0.5 * (c == r).float().sum()), "margin": float((c - r).sum()),
                   "rewards_chosen": float(c.sum()), "rewards_rejected": float(r.sum())}
        return losses.sum(), len(c), metrics

    return Objective(loss=loss, count=lambda batch: int(batch["n_pairs"]), collate=collate_pairs,
                     wrap_model=lambda model: WithScalarHead(model))


@dataclass
class RewardStageConfig(StageConfig):
    """Reward model on prompt/chosen/rejected pairs: a scalar head read at the last token."""

    name: str = "rm"
    formats: ClassVar[tuple[str, ...]] = ("preference",)
    whole_rows: ClassVar[str] = "compares whole answers pair by pair"
    answers: ClassVar[bool] = False  # a reward model scores answers, it does not write them
    base_comparable: ClassVar[bool] = False  # its head starts untrained: accuracy 0.5 by construction
    scalar_head: ClassVar[str] = "reward"
    margin: float = 0.0
    """Required score gap: loss -log sigmoid(r_chosen - r_rejected - margin) (Llama 2's margin)."""
    center_rewards_coef: float = 0.0
    """Adds coef x (r_chosen + r_rejected)^2 so scores stay centred near 0 (0: off)."""

    def problems(self, cfg: Any) -> list[str]:
        return [f"stage.margin must be >= 0 (got {self.margin})"] if self.margin < 0 else []


register(StageSpec(RewardStageConfig, make_reward))
