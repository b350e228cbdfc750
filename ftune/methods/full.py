"""Selection methods without adapters: `full` trains every weight, `freeze` only the last layers."""

from __future__ import annotations

from typing import Any

import torch

from ftune.errors import FtuneError
from ftune.methods import METHODS, freeze_all


@METHODS.register("full")
def apply_full(model: Any, cfg: Any, setup: Any = None) -> Any:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The stack of decoder blocks: the ModuleList as long as config.num_hidden_layers."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise FtuneError("method=freeze: could not find the decoder layers of this model",
                     hint="Name the modules to train with method.trainable_modules and method.trainable_layers=0.")


@METHODS.register("freeze")
def apply_freeze(model: Any, cfg: Any, setup: Any = None) -> Any:
    method = cfg.method
    freeze_all(model)
    if method.trainable_layers:
        layers = decoder_layers(model)
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
