"""Selection methods without adapters: `full` trains every weight, `freeze` only the last layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ftune.config.methods_schema import MethodConfig
from ftune.config.rules import positive
from ftune.errors import FtuneError
from ftune.methods.base import MethodSpec, freeze_all, register
from ftune.runtime import decoder_layers


@dataclass
class FullConfig(MethodConfig):
    """Every parameter is trained."""

    name: str = "full"
    trains_base: ClassVar[bool] = True
    saves_full_model: ClassVar[bool] = True
    trains_every_weight: ClassVar[bool] = True


@dataclass
class FreezeConfig(MethodConfig):
    """Only the last decoder layers and/or named modules are trained; the rest is frozen."""

    name: str = "freeze"
    trainable_layers: int = 2
    """How many of the last decoder layers to train (0: none)."""
    trainable_modules: list[str] = field(default_factory=list)
    """Extra parameter-name fragments to train, e.g. [lm_head, model.norm]."""
    trains_base: ClassVar[bool] = True
    saves_full_model: ClassVar[bool] = True

    def problems(self, cfg: Any) -> list[str]:
        problems: list[str] = []
        positive(problems, "method.trainable_layers", self.trainable_layers, allow_zero=True)
        if self.trainable_layers == 0 and not self.trainable_modules:
            problems.append("method=freeze trains nothing: set method.trainable_layers > 0 or method.trainable_modules")
        return problems


def apply_full(model: Any, cfg: Any, setup: Any = None) -> Any:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def apply_freeze(model: Any, cfg: Any, setup: Any = None) -> Any:
    method = cfg.method
    freeze_all(model)
    if method.trainable_layers:
        layers = decoder_layers(model)
        if not layers:
            raise FtuneError("method=freeze: could not find the decoder layers of this model",
                             hint="Name the modules to train with method.trainable_modules and method.trainable_layers=0.")
        for layer in layers[-min(method.trainable_layers, len(layers)):]:
            for p in layer.parameters():
                p.requires_grad_(True)
    matched = set()
    for name, p in model.named_parameters():
        for fragment in method.trainable_modules:
            if fragment in name:
                p.requires_grad_(True)
                matched.add(fragment)
    missing = [f for f in method.trainable_modules if f not in matched]
    if missing:
        raise FtuneError(f"method.trainable_modules: no parameter name contains {', '.join(missing)}",
                         hint="Parameter names look like model.layers.0.mlp.down_proj.weight, lm_head.weight.")
    return model


register(MethodSpec(FullConfig, apply_full))
register(MethodSpec(FreezeConfig, apply_freeze))
