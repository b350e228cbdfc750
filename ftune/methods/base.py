"""What a method is: one `MethodSpec`, registered once by the method's own module.

The spec holds the method's behaviour (apply, step hooks, save/reload, merge or why not); its
schema (a MethodConfig subclass in the same module) holds the keys the user sets and the facts the
lower layers read (can it pack, does it train base weights, …). Nothing outside the method's module
names a method: the trainer, saving, merging and validation read the spec and the schema.
(peft's register_peft_method is the model.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ftune.config.registry import Plugins
from ftune.errors import FtuneError


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

    def __init__(self, cfg: Any = None):
        self.cfg = cfg

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


@dataclass(frozen=True)
class MethodSpec:
    """Everything the rest of ftune needs from one method."""

    schema: type
    """The method's config dataclass (a MethodConfig subclass); its `name` default names the method."""
    apply: Callable[[Any, Any, Setup], Any]
    """(base model, run config, setup) -> the model ready to train."""
    hooks: Callable[[Any], StepHooks] = StepHooks
    """Built from the run config: per-step hooks and learning-rate scales."""
    merge: Callable[[Any], Any] | None = None
    """Folds the trained method into the base weights. None: peft's merge_and_unload for peft
    models; nothing to do when the method trained base tensors (full, freeze, bitfit)."""
    not_mergeable: str = ""
    """Why the method cannot be folded into the weights ("": it can)."""
    saved_state: Callable[[dict, Any], tuple[dict, Any]] | None = None
    """ftune-native saves: (trained tensors, method config) -> what is written and the config that
    rebuilds it (DyLoRA cuts to save_rank)."""
    save_extra: Callable[[Any, Path, Any], None] | None = None
    """(model, folder, method config): files the method adds beside its saved output."""
    rebuild: Callable[[Any, Any, Path], Any] | None = None
    """ftune-native reload: (base model, method config, folder) -> the trained structure before the
    saved tensors are copied in (None: apply the method again)."""
    prepare_base: Callable[[Any, Path], None] | None = None
    """(base model, folder): adjusts the base before a saved peft adapter loads onto it."""
    merged_groups: Callable[[Any, Any], tuple[dict, int]] | None = None
    """(merged model, method config) -> (tensors, group size) of quantised groups the merged model
    keeps exactly, which the GGUF export writes as they are (QA-LoRA's 4-bit groups as q4_1)."""

    @property
    def name(self) -> str:
        return self.schema.name


SPECS: Plugins[MethodSpec] = Plugins("method")
register = SPECS.add  # a method module calls this once: its schema and its spec
spec_of = SPECS.of


def apply(model: Any, cfg: Any, setup: Setup) -> Any:
    """Apply cfg.method to the loaded base model."""
    return spec_of(cfg.method).apply(model, cfg, setup)


def hooks_for(cfg: Any) -> StepHooks:
    return spec_of(cfg.method).hooks(cfg)


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
