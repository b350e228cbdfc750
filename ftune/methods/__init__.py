"""Methods decide what is trained: `apply(model, cfg, setup)` returns the model ready to train.

Each method registers under its schema name (configs/method/<file>.yaml names the schema). A method
may also give the trainer step hooks (AdaLoRA's budget update, DyLoRA's rank sampling) and a
learning-rate scale per parameter (LoRA+).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ftune.registry import Registry

MethodFn = Callable[[Any, Any, "Setup"], Any]
METHODS: Registry[MethodFn] = Registry("method")


@dataclass
class Setup:
    """Facts a method may need beyond its config."""

    total_steps: int
    model_path: str
    checkpointed_layers: int = 0
    """Decoder layers recomputed in the backward pass (train.gradient_checkpointing; 0: none)."""
    notes: list[str] = field(default_factory=list)
    """Messages for the user about what the method chose (printed at the start of the run)."""


class StepHooks:
    """What a method adds to each optimiser step; the default adds nothing."""

    def before_step(self, model: Any, step: int) -> None:
        """Called before the step's first forward (step counts from 0)."""

    def regularizer(self, model: Any) -> torch.Tensor | None:
        """An extra loss term added once per step (not per micro-batch)."""
        return None

    def after_optimizer_step(self, model: Any, step: int) -> None:
        """Called after optimizer.step(), before the gradients are cleared."""

    def lr_scale(self, name: str) -> float:
        """Learning-rate multiplier for the parameter `name`."""
        return 1.0

    def after_training(self, model: Any, evaluate: Callable[[], float]) -> dict:
        """Extra results for the run summary, computed once after the last step."""
        return {}


HOOKS: Registry[Callable[[Any], StepHooks]] = Registry("method hooks")


def _register_all() -> None:
    from ftune.methods import adapters, bitfit, dylora, full, longlora, lora, peft_methods, qalora  # noqa: F401


def apply(model: Any, cfg: Any, setup: Setup) -> Any:
    """Apply cfg.method to the loaded base model."""
    _register_all()
    return METHODS.get(cfg.method.name, key="method")(model, cfg, setup)


def hooks_for(cfg: Any) -> StepHooks:
    _register_all()
    return HOOKS.get(cfg.method.name)(cfg) if cfg.method.name in HOOKS else StepHooks()


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def freeze_all(model: Any) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def wrap_linears(model: Any, names: list[str] | tuple[str, ...], wrap: Callable[[torch.nn.Linear], Any]) -> int:
    """Replace every nn.Linear child whose attribute name is in `names` by wrap(linear)."""
    from ftune.errors import FtuneError

    wanted = set(names)
    targets = [(parent, child) for parent in model.modules() for child, mod in parent.named_children()
               if child in wanted and isinstance(mod, torch.nn.Linear)]
    if not targets:
        raise FtuneError(f"method.target_modules: no linear layer named {', '.join(sorted(wanted))} in this model",
                         hint="Linear layers of Llama-family models: q_proj, k_proj, v_proj, o_proj, gate_proj, "
                              "up_proj, down_proj.")
    for parent, child in targets:
        setattr(parent, child, wrap(getattr(parent, child)))
    return len(targets)


def unwrap_modules(model: Any, kind: type, unwrap: Callable[[Any], Any]) -> Any:
    """Replace every module of type `kind` by unwrap(module) (used by merges)."""
    for parent in list(model.modules()):
        for child, module in list(parent.named_children()):
            if isinstance(module, kind):
                setattr(parent, child, unwrap(module))
    return model
