"""Methods decide what is trained: `apply(model, cfg)` returns the model ready for training.

Each method registers under its config name (configs/method/<name>.yaml).
"""

from __future__ import annotations

from typing import Any, Callable

from ftune.registry import Registry

MethodFn = Callable[[Any, Any], Any]
METHODS: Registry[MethodFn] = Registry("method")


def apply(model: Any, cfg: Any) -> Any:
    """Apply cfg.method to the loaded base model (imports the method modules on first use)."""
    from ftune.methods import full, lora  # noqa: F401  (registration side effects)

    return METHODS.get(cfg.method.name, key="method")(model, cfg)


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
