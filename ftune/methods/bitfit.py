"""BitFit (Ben Zaken et al. 2022): only bias terms are trained.

No library implements it because it is only a selection of parameters. Llama-family models have
no bias terms at all, so BitFit alone would train nothing there; by default (norms=auto) ftune
then trains the normalisation weights instead (the closest per-channel offsets those models have)
and says so in the run's notes, rather than silently training nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ftune.config.methods_schema import MethodConfig
from ftune.config.rules import choice
from ftune.errors import FtuneError
from ftune.methods.base import MethodSpec, Setup, freeze_all, register


@dataclass
class BitFitConfig(MethodConfig):
    """BitFit (Ben Zaken et al. 2022): train only bias terms."""

    name: str = "bitfit"
    norms: str = "auto"
    """Also train normalisation weights: auto (only when the model has no biases, as in
    Llama-family models, with a notice) | always | never (refuse a bias-free model)."""
    trains_base: ClassVar[bool] = True

    def problems(self, cfg: Any) -> list[str]:
        problems: list[str] = []
        choice(problems, "method.norms", self.norms, ("auto", "always", "never"))
        return problems


def norm_parameters(model: Any) -> list:
    return [p for module in model.modules() if "norm" in type(module).__name__.lower()
            for p in module.parameters(recurse=False)]


def apply_bitfit(model: Any, cfg: Any, setup: Setup) -> Any:
    freeze_all(model)
    biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
    mode = cfg.method.norms
    if not biases and mode == "never":
        raise FtuneError("method=bitfit: this model has no bias terms, so BitFit would train nothing",
                         hint="Set method.norms=auto to train the normalisation weights instead, or pick another method.")
    for p in biases:
        p.requires_grad_(True)
    if mode == "always" or (mode == "auto" and not biases):
        for p in norm_parameters(model):
            p.requires_grad_(True)
        if not biases:
            setup.notes.append("bitfit: this model has no bias terms; training the normalisation weights instead "
                               "(method.norms=never refuses such models)")
    return model


register(MethodSpec(BitFitConfig, apply_bitfit))
