"""Bottleneck adapters (Houlsby et al. 2019), our own module: peft has no Houlsby adapter.

After the output projection of a sublayer (attention and/or feed-forward), before the residual
add: h + up(act(down(h))). `up` starts at zero, so the adapted model equals the base model at
step 0. The non-linearity means the adapter cannot be merged into the base weights.

As in the paper, the normalisation layers' weights are trained too (method.train_norms; they are
saved with the bottlenecks and loaded back with them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ftune.config.methods_schema import MethodConfig
from ftune.config.rules import choice, positive
from ftune.errors import FtuneError
from ftune.methods.base import MethodSpec, Setup, freeze_all, register
from ftune.methods.bitfit import norm_parameters


@dataclass
class AdapterConfig(MethodConfig):
    """Bottleneck adapters (Houlsby et al. 2019): down-projection, non-linearity, up-projection and
    a residual, after each chosen sublayer; the up-projection starts at zero (model unchanged)."""

    name: str = "adapter"
    bottleneck: int = 64
    """Width of the bottleneck."""
    placement: str = "both"
    """attn (after self-attention) | mlp (after the feed-forward block) | both (Houlsby)."""
    activation: str = "gelu"
    """gelu | relu | silu."""
    train_norms: bool = True
    """Also train the normalisation layers' weights (every decoder layer's and the final one), as
    Houlsby et al. do; they are saved with the adapters. false: only the bottlenecks are trained."""

    def problems(self, cfg: Any) -> list[str]:
        problems: list[str] = []
        positive(problems, "method.bottleneck", self.bottleneck)
        choice(problems, "method.placement", self.placement, ("attn", "mlp", "both"))
        choice(problems, "method.activation", self.activation, ("gelu", "relu", "silu"))
        return problems

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
# Output projections of a decoder layer's sublayers, by common naming.
PLACES = {"attn": ("o_proj", "out_proj"), "mlp": ("down_proj", "fc2")}


class BottleneckAdapter(nn.Module):
    """Wraps a sublayer's output projection and adds a zero-initialised bottleneck residual."""

    def __init__(self, inner: nn.Module, size: int, activation: str):
        super().__init__()
        self.inner = inner
        dim = inner.out_features
        self.adapter_down = nn.Linear(dim, size)
        self.adapter_act = ACTIVATIONS[activation]()
        self.adapter_up = nn.Linear(size, dim)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.to(device=inner.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        return h + self.adapter_up(self.adapter_act(self.adapter_down(h))).to(h.dtype)


def _targets(model: Any, placement: str) -> list[tuple[nn.Module, str]]:
    wanted = PLACES["attn"] + PLACES["mlp"] if placement == "both" else PLACES[placement]
    return [(parent, child) for parent in model.modules() for child, mod in parent.named_children()
            if child in wanted and isinstance(mod, nn.Linear)]


def apply_adapter(model: Any, cfg: Any, setup: Setup) -> Any:
    m = cfg.method
    freeze_all(model)
    targets = _targets(model, m.placement)
    if not targets:
        raise FtuneError(f"method=adapter: no {m.placement} output projection found in this model",
                         [f"looked for modules named {', '.join(PLACES['attn'] + PLACES['mlp'])}"])
    for parent, child in targets:
        setattr(parent, child, BottleneckAdapter(getattr(parent, child), m.bottleneck, m.activation))
    if m.train_norms:  # Houlsby et al. train the layer norms with the adapters
        for p in norm_parameters(model):
            p.requires_grad_(True)
    return model


register(MethodSpec(AdapterConfig, apply_adapter,
                    not_mergeable="bottleneck adapters apply a non-linearity between their projections, so they "
                                  "are not a linear change of any base weight"))
