"""DyLoRA (Valipour et al. 2023), our own module: no library implements it.

Each target linear layer gets A (r x in) and B (out x r). Every training step samples one rank
b in 1..r for the whole model and uses only the first b rows of A and columns of B, scaled by
alpha / b. Because every prefix of the ranks is trained to work on its own, after one run the
adapter can be evaluated at, cut to, or merged at any rank <= r without retraining.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ftune.config.methods_schema import MethodConfig
from ftune.config.rules import positive
from ftune.errors import FtuneError
from ftune.methods.base import MethodSpec, Setup, StepHooks, freeze_all, register, unwrap_modules, wrap_linears


@dataclass
class DyLoraConfig(MethodConfig):
    """DyLoRA (Valipour et al. 2023): each step trains a random rank b <= r (A, B truncated to b),
    so after one run the adapter works at every rank and can be cut to any of them."""

    name: str = "dylora"
    r: int = 16
    """Largest rank."""
    alpha: float = 16.0
    """Scaling numerator; a rank-b slice is scaled by alpha / b."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"])
    """Modules to adapt."""
    eval_ranks: list[int] = field(default_factory=list)
    """Ranks evaluated on the held-out set after training (empty: 1, 2, 4, … up to r, and r)."""
    save_rank: int = 0
    """Rank of the saved adapter (0: the full r)."""
    one_process: ClassVar[str] = ("samples a rank per step from each process's random state, which several "
                                  "processes would not share; train it in one process")

    def problems(self, cfg: Any) -> list[str]:
        problems: list[str] = []
        if not self.target_modules:
            problems.append("method.target_modules is empty; name the modules dylora adapts")
        positive(problems, "method.r", self.r)
        bad = [k for k in self.eval_ranks if not 1 <= k <= self.r]
        if bad:
            problems.append(f"method.eval_ranks must lie in 1..method.r={self.r} (got {bad})")
        if not 0 <= self.save_rank <= self.r:
            problems.append(f"method.save_rank must be 0 (full r) or in 1..{self.r} (got {self.save_rank})")
        return problems


class DyLoraLinear(nn.Module):
    """base(x) + (alpha / b) * B[:, :b] A[:b] x, with the active rank b set from outside."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base, self.r, self.alpha, self.rank = base, r, alpha, r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self, rank: int) -> torch.Tensor:
        return (self.alpha / rank) * self.lora_B[:, :rank] @ self.lora_A[:rank]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.rank
        out = self.base(x)
        update = (x.to(self.lora_A.dtype) @ self.lora_A[:b].T) @ self.lora_B[:, :b].T
        return out + (self.alpha / b) * update.to(out.dtype)


def default_eval_ranks(r: int) -> list[int]:
    return sorted({2 ** i for i in range(r.bit_length()) if 2 ** i <= r} | {r})


def dylora_layers(model: Any) -> list[DyLoraLinear]:
    return [m for m in model.modules() if isinstance(m, DyLoraLinear)]


def set_rank(model: Any, rank: int) -> None:
    for layer in dylora_layers(model):
        if not 1 <= rank <= layer.r:
            raise FtuneError(f"dylora: rank {rank} is outside 1..{layer.r}")
        layer.rank = rank


def apply_dylora(model: Any, cfg: Any, setup: Setup) -> Any:
    m = cfg.method
    freeze_all(model)
    wrap_linears(model, m.target_modules, lambda linear: DyLoraLinear(linear, m.r, m.alpha))
    return model


class DyLoraHooks(StepHooks):
    """Sample the step's rank before the forward; back to the full rank for evaluation."""

    def __init__(self, cfg: Any):
        self.r = cfg.method.r
        self.eval_ranks = list(cfg.method.eval_ranks) or default_eval_ranks(self.r)

    def before_step(self, model: Any, step: int) -> None:
        # torch's global RNG: restored on resume, so the rank sequence is reproducible.
        set_rank(model, int(torch.randint(1, self.r + 1, (1,))))

    def after_optimizer_step(self, model: Any, step: int) -> None:
        set_rank(model, self.r)

    def after_training(self, model: Any, evaluate: Callable[[], float]) -> dict:
        losses = evaluate_ranks(model, self.eval_ranks, evaluate)
        return {"eval_loss_by_rank": {str(k): v for k, v in losses.items()}}



def evaluate_ranks(model: Any, ranks: list[int], evaluate: Callable[[], float]) -> dict[int, float]:
    """Held-out loss at each rank (the point of DyLoRA: one run, every rank usable)."""
    full = dylora_layers(model)[0].r
    out = {}
    for rank in ranks:
        if rank <= full:
            set_rank(model, rank)
            out[rank] = evaluate()
    set_rank(model, full)
    return out


def truncated_state(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The adapter tensors (whole ones, gathered from shards if need be) cut to `rank`: a rank-`rank`
    DyLoRA adapter, equal to the trained one evaluated at that rank (same alpha, scaled by alpha /
    rank either way)."""
    cut = {}
    for name, tensor in state.items():
        if name.endswith(".lora_A"):
            tensor = tensor[:rank]
        elif name.endswith(".lora_B"):
            tensor = tensor[:, :rank]
        cut[name] = tensor.contiguous()
    return cut


def saved_state(state: dict[str, torch.Tensor], method: DyLoraConfig) -> tuple[dict[str, torch.Tensor], DyLoraConfig]:
    """What a run saves: the adapter cut to method.save_rank (0 or r: whole)."""
    if method.save_rank and method.save_rank != method.r:
        return truncated_state(state, method.save_rank), dataclasses.replace(method, r=method.save_rank)
    return state, method


def merge_dylora(model: Any) -> Any:
    """Fold the update at the active rank into each base weight."""
    def fold(module: DyLoraLinear) -> torch.nn.Linear:
        with torch.no_grad():
            module.base.weight += module.delta_weight(module.rank).to(module.base.weight.dtype)
        return module.base

    return unwrap_modules(model, DyLoraLinear, fold)


register(MethodSpec(DyLoraConfig, apply_dylora, hooks=DyLoraHooks, merge=merge_dylora, saved_state=saved_state))
