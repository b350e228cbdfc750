"""PPO for RLHF (InstructGPT's stage 3; Ouyang et al. 2022, Ziegler et al. 2019, Schulman et al. 2017).

One rollout: sample answers from the policy, score them (reward model or rule), take per-token
log-probs of the policy, of the reference (the same model with its adapter disabled: no second
copy of the base) and the value head's estimates. The reward of each answer token is the KL
penalty -kl_coef x (log pi - log pi_ref), plus the score on the answer's last token. GAE turns
rewards and values into advantages (whitened over the rollout) and returns. The rollout is then
trained for `ppo_epochs` passes with the clipped policy objective and the clipped value loss.

The trainer's loop is unchanged: the rollout is a batch source (PpoSource) that hands the loop
micro-batches of experience, and the loss below is a sum over answer tokens like causal_lm's.
Answers are generated from left-padded prompts; every tensor keeps that layout, so an answer
starts at the same column `start` in every row of a micro-batch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from ftune.config.rules import choice, positive
from ftune.config.stage_schema import StageConfig
from ftune.data import templates
from ftune.data.order import DataOrder
from ftune.train import rewards
from ftune.train.heads import WithScalarHead
from ftune.train.objectives import Objective, StageSpec, register


# ----------------------------------------------------------------------------- the maths
def kl_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
               kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef x (logp - ref_logp) on every answer token, plus the score on
    the last one. mask: (batch, n) 1 on answer tokens (a prefix of each row)."""
    rewards = -kl_coef * (logp - ref_logp) * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    return rewards.scatter_add(1, last.unsqueeze(1), scores.unsqueeze(1).to(rewards.dtype))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation; zero past each answer's end."""
    rewards, values = rewards * mask, values * mask
    n = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(n)):
        next_value = values[:, t + 1] if t + 1 < n else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate max(-A r, -A clip(r, 1-c, 1+c)) and where the clip was active."""
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-token clipped value loss 0.5 max((v - R)^2, (v_clipped - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def adapt_kl_coef(coef: float, kl: float, target: float, n: int, horizon: int) -> float:
    """Ziegler et al.'s proportional controller: move towards the target KL, at most 20% per unit."""
    error = max(-0.2, min(0.2, kl / target - 1))
    return coef * (1 + error * n / horizon)


def token_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------- rollouts
def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


class Rollouts:
    """Generates and scores answers; owns the reward function and the KL coefficient."""

    def __init__(self, parts: Any):
        self.parts, self.stage = parts, parts.cfg.stage
        self.tokenizer = parts.tokenizer
        self.stops = templates.stop_token_ids(self.tokenizer, parts.cfg.dataset.template)
        self.scores = rewards.build(self.stage, parts.accelerator.device, parts.cfg.hardware.precision)

    def generate(self, samples: list[dict], greedy: bool) -> dict[str, torch.Tensor]:
        """Prompts + answers (left-padded prompts, answers cut after their stop token)."""
        st, acc, pad = self.stage, self.parts.accelerator, self.tokenizer.pad_token_id
        model: WithScalarHead = acc.unwrap_model(self.parts.model)
        ids, mask = (t.to(acc.device) for t in left_pad([s["prompt_ids"] for s in samples], pad))
        sampling = {} if greedy else dict(do_sample=True, temperature=st.temperature, top_p=st.top_p,
                                          top_k=st.top_k)
        with torch.no_grad(), acc.autocast():
            out = model.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=st.max_new_tokens,
                                    eos_token_id=self.stops, pad_token_id=pad, use_cache=True,
                                    **({"do_sample": False} if greedy else sampling))
        start = ids.shape[1]
        response = out[:, start:]
        is_stop = torch.isin(response, torch.tensor(self.stops, device=response.device))
        ended = is_stop.any(-1)
        length = torch.where(ended, is_stop.int().argmax(-1) + 1, torch.full_like(ended, response.shape[1], dtype=torch.long))
        response_mask = (torch.arange(response.shape[1], device=response.device)[None] < length[:, None]).long()
        response = torch.where(response_mask.bool(), response, torch.full_like(response, pad))
        full_mask = torch.cat([mask, response_mask], 1)
        return {"input_ids": torch.cat([ids, response], 1), "attention_mask": full_mask,
                "position_ids": (full_mask.cumsum(-1) - 1).clamp(min=0), "response": response,
                "response_mask": response_mask.float(), "ended": ended, "start": torch.tensor(start)}

    def score(self, samples: list[dict], batch: dict) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(batch["response"] * batch["response_mask"].long()
                                            + self.tokenizer.pad_token_id * (1 - batch["response_mask"].long()),
                                            skip_special_tokens=True)
        self.texts = [t.strip() for t in texts]
        values = self.scores([s["messages"] for s in samples], self.texts, [s.get("reference") for s in samples])
        scores = torch.tensor(values, dtype=torch.float32, device=batch["response"].device)
        st = self.stage
        if st.missing_eos_penalty:
            scores = scores - st.missing_eos_penalty * (~batch["ended"]).float()
        if st.score_clip:
            scores = scores.clamp(-st.score_clip, st.score_clip)
        return scores

    def logps_and_values(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(policy log-probs, reference log-probs, values) of the answer tokens, without gradients."""
        acc = self.parts.accelerator
        model: WithScalarHead = acc.unwrap_model(self.parts.model)
        start, n = int(batch["start"]), batch["response"].shape[1]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        with torch.no_grad(), acc.autocast():
            logits, values = model(**inputs, head="with_logits")
            logp = token_logps(logits[:, start - 1:start - 1 + n], batch["response"])
            with model.disable_adapter():
                ref_logits = model.lm(**inputs, use_cache=False).logits[:, -batch["input_ids"].shape[1]:]
            ref_logp = token_logps(ref_logits[:, start - 1:start - 1 + n], batch["response"])
        return logp, ref_logp, values[:, start - 1:start - 1 + n].float()

    def experience(self, samples: list[dict], kl_coef: float, init_values: bool = False
                   ) -> tuple[dict, dict[str, float]]:
        """One micro-batch of experience and its rollout metrics (sums over answers).
        init_values: start the critic at this batch's mean score (its bias), not at 0."""
        batch = self.generate(samples, greedy=False)
        mask = batch["response_mask"]
        scores = self.score(samples, batch)
        if init_values:
            with torch.no_grad():
                self.parts.accelerator.unwrap_model(self.parts.model).head.bias.fill_(float(scores.mean()))
        logp, ref_logp, values = self.logps_and_values(batch)
        per_token = kl_rewards(scores, logp, ref_logp, mask, kl_coef)
        advantages, returns = gae(per_token, values, mask, self.stage.gamma, self.stage.lam)
        kl = ((logp - ref_logp) * mask).sum(-1)
        self.last_texts = [{"prompt": s["messages"][-1]["content"], "answer": t, "score": float(x), "kl": float(k)}
                           for s, t, x, k in zip(samples, self.texts, scores, kl)]
        batch.update(old_logp=logp, old_values=values, advantages=advantages, returns=returns,
                     num_tokens=batch["attention_mask"].sum())
        metrics = {"reward": float(scores.sum()), "kl": float(kl.sum()), "response_length": float(mask.sum()),
                   "ended": float(batch["ended"].float().sum()), "answers": len(samples)}
        del batch["ended"]
        return batch, metrics


class PpoSource:
    """Micro-batches of experience for the trainer: a fresh rollout every ppo_epochs x mini_batches
    steps, shuffled (by micro-batch, seeded) on every pass over it."""

    def __init__(self, parts: Any, state: Any):
        self.parts, self.state = parts, state
        self.stage, self.train = parts.cfg.stage, parts.cfg.train
        self.micro_per_rollout = self.train.grad_accum * self.stage.mini_batches
        self.steps_per_rollout = self.stage.ppo_epochs * self.stage.mini_batches
        self.order = DataOrder(len(parts.train), self.train.micro_batch_size, self.train.seed)
        self.rollouts = rollouts_for(parts)
        self.index, self.buffer, self.metrics = -1, [], {}
        state.objective_state.setdefault("kl_coef", self.stage.kl_coef)

    def batches(self, step: int) -> tuple[list[dict], dict[str, float]]:
        r, k = divmod(step, self.steps_per_rollout)
        if r != self.index:
            self._rollout(r)
        epoch, mini = divmod(k, self.stage.mini_batches)
        g = torch.Generator().manual_seed(self.train.seed * 7919 + r * 131 + epoch)
        perm = torch.randperm(self.micro_per_rollout, generator=g).tolist()
        chosen = perm[mini * self.train.grad_accum:(mini + 1) * self.train.grad_accum]
        return [self.buffer[i] for i in chosen], self.metrics

    def _rollout(self, r: int) -> None:
        model = self.parts.model
        was_training = model.training
        model.eval()
        coef = self.state.objective_state["kl_coef"]
        first = r * self.micro_per_rollout
        buffer, sums, answers = [], {}, []
        for m in range(first, first + self.micro_per_rollout):
            init = not self.state.objective_state.get("values_initialised")
            batch, metrics = self.rollouts.experience([self.parts.train[i] for i in self.order.micro(m)], coef, init)
            self.state.objective_state["values_initialised"] = True
            buffer.append(batch)
            answers += self.rollouts.last_texts
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        model.train(was_training)
        # Every answer with its score, so a user can see what the reward rewards.
        with open(self.parts.run_dir / "rollouts.jsonl", "a") as f:
            f.writelines(json.dumps({"rollout": r, **a}, ensure_ascii=False) + "\n" for a in answers)
        if self.stage.whiten_advantages:  # over the whole rollout, not per micro-batch
            flat_adv = torch.cat([b["advantages"][b["response_mask"].bool()] for b in buffer])
            mean, std = flat_adv.mean(), flat_adv.std() if flat_adv.numel() > 1 else torch.tensor(1.0)
            for b in buffer:
                b["advantages"] = (b["advantages"] - mean) / (std + 1e-8) * b["response_mask"]
        n = sums.pop("answers")
        self.metrics = {f"rollout_{k}": v / n for k, v in sums.items()}
        self.metrics["kl_coef"] = coef
        warm = float(r >= self.stage.critic_warmup)  # 0: a critic warm-up rollout, the policy is not trained
        for b in buffer:
            b["policy_weight"] = torch.tensor(warm)
        if self.stage.adaptive_kl:
            self.state.objective_state["kl_coef"] = adapt_kl_coef(coef, self.metrics["rollout_kl"], self.stage.target_kl,
                                                                  int(n), self.stage.kl_horizon)
        self.index, self.buffer = r, buffer


def rollouts_for(parts: Any) -> Rollouts:
    """One Rollouts per run (the reward model is loaded once)."""
    if "rollouts" not in parts.cache:
        parts.cache["rollouts"] = Rollouts(parts)
    return parts.cache["rollouts"]


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


register(StageSpec(PpoStageConfig, make_ppo, head="value", steps=run_steps, lr_scale=value_lr_scale))
