"""What the readers of runs (eval, export, serve) use from the train layer, and nothing else: the
layer contract in pyproject.toml refuses any other import of ftune.train from them."""

from __future__ import annotations

from ftune.train.heads import WithScalarHead, load_head
from ftune.train.objectives import get as objective_for
from ftune.train.rewards import RewardModelScores, reference_reward
from ftune.train.rewards import build as reward_function
from ftune.train.run import make_accelerator
from ftune.train.trainer import evaluate_all

__all__ = ["RewardModelScores", "WithScalarHead", "evaluate_all", "load_head", "make_accelerator", "objective_for",
           "reference_reward", "reward_function"]
