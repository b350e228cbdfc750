"""QA-LoRA (Xu et al. 2023), our own module: quantisation-aware LoRA whose update folds exactly
into a group-quantised base.

The base weight W (out x in) is quantised group-wise along the input: for each row o and group j
of `group_size` columns, INT codes q in 0..2^bits-1 with a scale s[o, j] and zero z[o, j], so
W ~ s (q - z). The adapter sees the input average-pooled over each group, so its update is
constant inside a group: delta[o, c] = scale (B A)[o, c // g] / g. That is exactly a shift of the
group's zero-point, z' = z - scale (B A)[o, j] / (g s[o, j]): after merging, the model is still
group-quantised (same codes and scales) with no precision lost. peft's `use_qalora` targets GPTQ
layers on GPU; this module works on any linear layer, on CPU too.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ftune.errors import FtuneError
from ftune.methods import METHODS, Setup, freeze_all, unwrap_modules, wrap_linears


class GroupQuantLinear(nn.Module):
    """A frozen linear layer stored as INT codes with a float scale and zero-point per group."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size = self.in_features // scale.shape[1]
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, bits: int) -> "GroupQuantLinear":
        w = linear.weight.detach().float()
        out, inp = w.shape
        if inp % group_size:
            raise FtuneError(f"method.group_size={group_size} does not divide the input width {inp} of a target layer",
                             hint="Pick a group size that divides every target layer's in_features (e.g. 32 or 64).")
        groups = w.view(out, inp // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        levels = 2 ** bits - 1
        scale = ((high - low) / levels).clamp(min=1e-8)
        zero = torch.round(-low / scale)
        codes = torch.clamp(torch.round(groups / scale[..., None] + zero[..., None]), 0, levels)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(codes.view(out, inp).to(torch.uint8), scale, zero, bias)

    def weight_dequantized(self) -> torch.Tensor:
        g = self.codes.view(self.out_features, -1, self.group_size).float()
        return ((g - self.zero[..., None]) * self.scale[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_dequantized().to(x.dtype), bias)


class QALoraLinear(nn.Module):
    """base(x) + (alpha / r) B A pool(x), pool = mean over each quantisation group of the input."""

    def __init__(self, base: GroupQuantLinear, r: int, alpha: float):
        super().__init__()
        self.base, self.scaling = base, alpha / r
        device = base.codes.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features // base.group_size, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.view(*x.shape[:-1], -1, self.base.group_size).mean(-1)
        update = (pooled.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
        out = self.base(x)
        return out + self.scaling * update.to(out.dtype)

    def merged(self) -> GroupQuantLinear:
        """The base with the update folded into its zero-points (codes and scales unchanged)."""
        base = self.base
        per_group = self.scaling * (self.lora_B @ self.lora_A).detach().float() / base.group_size
        zero = base.zero - per_group / base.scale
        bias = None if base.bias is None else base.bias.detach()
        return GroupQuantLinear(base.codes, base.scale, zero, bias)


@METHODS.register("qalora")
def apply_qalora(model: Any, cfg: Any, setup: Setup) -> Any:
    m = cfg.method
    freeze_all(model)
    wrap_linears(model, m.target_modules,
                 lambda linear: QALoraLinear(GroupQuantLinear.from_linear(linear, m.group_size, m.bits), m.r, m.alpha))
    return model


def merge_qalora(model: Any) -> Any:
    return unwrap_modules(model, QALoraLinear, lambda module: module.merged())
