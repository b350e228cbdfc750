"""PPO's experience: the maths of KL-penalised rewards, GAE and the clipped losses, and the
rollouts (generate, score, reference log-probs, values) the trainer reads as its batch source.
The stage itself (schema, objective, spec) is ppo.py."""

from __future__ import annotations

import json
from typing import Any

import torch

from ftune.data import templates
from ftune.data.order import DataOrder
from ftune.train import rewards
from ftune.train.heads import WithScalarHead


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
