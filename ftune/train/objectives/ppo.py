"""PPO for RLHF (InstructGPT's stage 3; Ouyang et al. 2022, Ziegler et al. 2019, Schulman et al. 2017).

One rollout: sample answers from the policy, score them (reward model or rule), take per-token
log-probs of the policy, of the reference (the same model with its adapter disabled: no second
copy of the base) and the value head's estimates. The reward of each answer token is the KL
penalty -kl_coef x (log pi - log pi_ref), plus the score on the answer's last token. GAE turns
rewards and values into advantages (whitened over the rollout) and returns. The rollout is then
trained for `ppo_epochs` passes with the clipped policy objective and the clipped value loss.

The trainer's loop is unchanged: the rollout is a batch source (PpoSource, in ppo_rollouts.py with
the maths) that hands the loop micro-batches of experience, and the loss below is a sum over answer
tokens like causal_lm's.
Answers are generated from left-padded prompts; every tensor keeps that layout, so an answer
starts at the same column `start` in every row of a micro-batch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from ftune.config.rules import choice, positive
from ftune.config.stage_schema import StageConfig
from ftune.train.heads import WithScalarHead
from ftune.train.objectives import Objective, StageSpec, register
from ftune.train.objectives.ppo_rollouts import (  # noqa: F401 (the maths, re-exported for tests)
    PpoSource,
    adapt_kl_coef,
    gae,
    kl_rewards,
    policy_loss,
    rollouts_for,
    value_loss,
)


# ----------------------------------------------------------------------------- objective
def make_ppo(stage: Any) -> Objective:
    def loss(model: Any, batch: dict) -> tuple[torch.Tensor, int, dict[str, float]]:
        start, n = int(batch["start"]), batch["response"].shape[1]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        logits, values = model(**inputs, head="with_logits")
        logits = logits[:, start - 1:start - 1 + n].float()
        values = values[:, start - 1:start - 1 + n]
        mask = batch["response_mask"]
        log_probs = torch.log_softmax(logits, -1)
        logp = log_probs.gather(-1, batch["response"].unsqueeze(-1)).squeeze(-1)
        pg, clipped = policy_loss(logp, batch["old_logp"], batch["advantages"], stage.cliprange)
        vf = value_loss(values, batch["old_values"], batch["returns"], stage.cliprange_value)
        total = ((batch["policy_weight"] * pg + stage.vf_coef * vf) * mask).sum()
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            approx_kl = 0.5 * (logp - batch["old_logp"]) ** 2
            metrics = {"policy_loss": float((pg * mask).sum()), "value_loss": float((vf * mask).sum()),
                       "clip_fraction": float((clipped * mask).sum()), "entropy": float((entropy * mask).sum()),
                       "approx_kl": float((approx_kl * mask).sum())}
        return total, int(mask.sum()), metrics

    def evaluate(parts: Any, samples: list[dict]) -> tuple[float, dict[str, float]]:
        """Greedy answers to the held-out prompts: mean score, summed log-ratio log pi - log pi_ref of
        those answers (how far the policy's own choices moved from the reference), length.
        The 'loss' is minus the mean score, so lower is better as for every stage."""
        if not samples:
            return float("nan"), {}
        rollouts, mbs = rollouts_for(parts), parts.cfg.train.micro_batch_size
        model = parts.model
        was_training = model.training
        model.eval()
        total, kl, length = 0.0, 0.0, 0.0
        for i in range(0, len(samples), mbs):
            chunk = samples[i:i + mbs]
            batch = rollouts.generate(chunk, greedy=True)
            scores = rollouts.score(chunk, batch)
            logp, ref_logp, _ = rollouts.logps_and_values(batch)
            total += float(scores.sum())
            kl += float(((logp - ref_logp) * batch["response_mask"]).sum())
            length += float(batch["response_mask"].sum())
        model.train(was_training)
        n = len(samples)
        return -total / n, {"reward": total / n, "logratio": kl / n, "response_length": length / n}

    return Objective(loss=loss, count=lambda batch: int(batch["response_mask"].sum()), collate=lambda s, pad: {},
                     wrap_model=lambda model: WithScalarHead(model, trunk_grad=stage.value_shares_trunk),
                     make_source=PpoSource, evaluate=evaluate)


@dataclass
class PpoStageConfig(StageConfig):
    """RLHF with PPO (InstructGPT stage 3): generate, score, KL-penalise against the reference,
    estimate advantages with a value head and GAE, then clipped policy and value updates."""

    name: str = "ppo"
    formats: ClassVar[tuple[str, ...]] = ("prompt", "alpaca", "qa", "messages", "sharegpt", "preference")
    whole_rows: ClassVar[str] = "generates and scores whole answers"
    prompts_only: ClassVar[bool] = True
    rewarded: ClassVar[bool] = True
    scalar_head: ClassVar[str] = "value"
    one_process: ClassVar[str] = ("runs in one process in this release (one process generates the rollouts); "
                                  "use hardware=single-gpu or hardware=cpu")
    reward: str = "model"
    """model (the reward model of a stage=rm run, see reward_model) | length (closeness to
    reward_target_length words) | regex (1 when reward_pattern matches the answer, else 0) |
    reference (1 when the dataset's reference answer appears in the answer) |
    python:<file.py or module>:<function> (your function(prompt, response, reference) -> float)."""
    reward_model: Optional[str] = None
    """Run directory of a stage=rm run (reward=model)."""
    reward_pattern: str = ""
    """reward=regex: a Python regular expression searched in the answer."""
    reward_target_length: int = 32
    """reward=length: the answer length (words) that scores 1; the reward falls linearly to 0 at
    twice or zero that length."""
    max_new_tokens: int = 48
    """Longest generated answer per rollout."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    top_k: int = 0
    """Sample from the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1: off)."""
    ppo_epochs: int = 2
    """Passes over each rollout batch; each pass is `mini_batches` optimiser steps."""
    mini_batches: int = 1
    """Optimiser steps per pass. A rollout has micro_batch_size x grad_accum x mini_batches answers."""
    kl_coef: float = 0.05
    """Weight of the per-token KL penalty log pi(y|x) - log pi_ref(y|x) in the reward."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards target_kl (Ziegler et al. 2019) instead of keeping it fixed."""
    target_kl: float = 6.0
    """adaptive_kl: the KL per answer (nats) the controller aims for."""
    kl_horizon: int = 10000
    """adaptive_kl: how fast the coefficient moves (answers per full correction)."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """Lambda of GAE (bias/variance of the advantage estimate)."""
    cliprange: float = 0.2
    """Clip of the policy probability ratio."""
    cliprange_value: float = 0.2
    """Clip of the value prediction around its rollout value."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    value_lr_ratio: float = 1.0
    """Learning rate of the value head as a multiple of train.lr. Keep it near 1 with AdamW:
    measured, 100 (2e-2) made the linear head's predictions swing by several reward units per
    step, and the advantages became noise."""
    critic_warmup: int = 0
    """Rollouts at the start that train only the value head (the policy waits until the critic
    gives per-prompt baselines; a reward model's scores differ a lot between kinds of prompts)."""
    value_shares_trunk: bool = False
    """false: the value head reads the policy's hidden states without sending gradients back, so the
    value loss never moves the policy (measured: with a shared trunk, the early value error's
    gradient dominates and lowers the reward). true: the value loss also trains the adapter."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over each rollout batch."""
    score_clip: float = 0.0
    """Clip scores to [-score_clip, score_clip] (0: no clipping)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of an answer that hits max_new_tokens without ending."""

    def problems(self, cfg: Any) -> list[str]:
        problems: list[str] = []
        if not self.reward.startswith("python:"):
            choice(problems, "stage.reward", self.reward, [*REWARDS, "python:<file.py or module>:<function>"])
        elif self.reward.count(":") < 2:
            problems.append(f"stage.reward={self.reward}: write python:<file.py or module>:<function>, "
                            "e.g. python:rewards.py:score")
        if self.reward == "model":
            if not self.reward_model:
                problems.append("stage.reward=model needs stage.reward_model: the run directory of a stage=rm run "
                                "(or pick a rule reward: stage.reward=length|regex|reference|python:…)")
            elif not (Path(self.reward_model) / "config.yaml").is_file():
                problems.append(f"stage.reward_model: {self.reward_model} is not a run directory (no config.yaml); "
                                "give the output folder of `ftune train recipe=smollm2-rm`")
        if self.reward == "regex":
            try:
                re.compile(self.reward_pattern or "(")
            except re.error as exc:
                problems.append(f"stage.reward_pattern is not a valid regular expression ({exc}); e.g. '\\d+'")
        if not cfg.method.adapter_reference:
            problems.append(f"stage=ppo needs a reference model for its KL penalty: with method={cfg.method.name} "
                            "there is no adapter to disable; use an adapter method (lora, qlora, …)")
        for key in ("max_new_tokens", "ppo_epochs", "mini_batches", "reward_target_length", "kl_horizon",
                    "temperature", "cliprange", "cliprange_value", "target_kl"):
            positive(problems, f"stage.{key}", getattr(self, key))
        for key in ("kl_coef", "vf_coef", "score_clip", "missing_eos_penalty", "top_k"):
            positive(problems, f"stage.{key}", getattr(self, key), allow_zero=True)
        if not 0 < self.top_p <= 1:
            problems.append(f"stage.top_p must be in (0, 1] (got {self.top_p})")
        if not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1:
            problems.append(f"stage.gamma and stage.lam must be in [0, 1] (got {self.gamma}, {self.lam})")
        return problems


REWARDS = ("model", "length", "regex", "reference")  # see ftune/train/rewards.py build()


def run_steps(cfg: Any, n_samples: int) -> int:
    """Each rollout of micro_batch_size x grad_accum x mini_batches prompts is trained for
    ppo_epochs x mini_batches steps (max_steps, when set, wins)."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    per_rollout = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.stage.mini_batches
    rollouts = max(1, math.ceil(cfg.train.epochs * math.ceil(n_samples / per_rollout)))
    return rollouts * cfg.stage.ppo_epochs * cfg.stage.mini_batches


def value_lr_scale(cfg: Any, method_scale: Any) -> Any:
    """The value head learns at value_lr_ratio x train.lr; the rest as the method says."""
    return lambda name: cfg.stage.value_lr_ratio if name.startswith("head.") else method_scale(name)


register(StageSpec(PpoStageConfig, make_ppo, steps=run_steps, lr_scale=value_lr_scale))
