"""Objectives: how a stage turns a batch into a loss. One trainer loop serves every stage.

An Objective gives three functions:
- collate(samples, pad_id) -> batch tensors;
- count(batch) -> the units the loss is a sum over (target tokens for causal_lm, pairs for dpo);
- loss(model, batch) -> (sum of unit losses, unit count, {metric: sum over units}).
Returning sums lets the trainer normalise by the units of the whole optimiser step, so gradient
accumulation gives the same gradient as one large batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ftune.registry import Registry


@dataclass(frozen=True)
class Objective:
    loss: Callable[[Any, dict], tuple[Any, int, dict[str, float]]]
    count: Callable[[dict], int]
    collate: Callable[[list[dict], int], dict]


OBJECTIVES: Registry[Callable[[Any], Objective]] = Registry("objective")


def get(stage: Any) -> Objective:
    """The objective for a stage config (its `objective` names the registry entry)."""
    from ftune.train.objectives import causal_lm, dpo  # noqa: F401  (registration)

    return OBJECTIVES.get(stage.objective, key="stage.objective")(stage)
