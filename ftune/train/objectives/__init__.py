"""Objectives turn a batch into (sum of per-token losses, number of target tokens, metrics).

Returning a *sum* lets the trainer normalise by the tokens of the whole optimiser step, so
gradient accumulation gives the same gradient as one large batch.
"""

from __future__ import annotations

from typing import Any, Callable

from ftune.registry import Registry

ObjectiveFn = Callable[[Any, dict], tuple[Any, Any]]
OBJECTIVES: Registry[ObjectiveFn] = Registry("objective")


def get(name: str) -> ObjectiveFn:
    from ftune.train.objectives import causal_lm  # noqa: F401  (registration)

    return OBJECTIVES.get(name, key="stage.objective")
