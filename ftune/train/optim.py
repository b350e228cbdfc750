"""Optimiser and learning-rate schedule from train.* settings."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ftune.config.schema import TrainConfig
from ftune.errors import FtuneError

NO_DECAY = ("bias", "norm", "ln_")


def param_groups(model: Any, cfg: TrainConfig, lr_scale: Callable[[str], float]) -> list[dict]:
    """Weight decay on matrices only (biases and norm weights are not decayed); one group per
    (decay, lr scale) pair, so a method can give some parameters a larger learning rate (LoRA+)."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = p.ndim >= 2 and not any(k in name.lower() for k in NO_DECAY)
            groups.setdefault((decay, lr_scale(name)), []).append(p)
    return [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * scale}
            for (decay, scale), ps in sorted(groups.items())]


def build_optimizer(model: Any, cfg: TrainConfig, lr_scale: Callable[[str], float] = lambda _: 1.0
                    ) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg, lr_scale)
    if not groups:
        raise FtuneError("nothing to train: the method left no parameter with requires_grad")
    kwargs = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if cfg.optim == "adamw":
        return torch.optim.AdamW(groups, **kwargs, fused=fused_adamw_fits(groups) or None)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise FtuneError(f"train.optim={cfg.optim} needs bitsandbytes", hint="pip install 'ftune[quant]'") from None
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[cfg.optim]
    return cls(groups, **kwargs)


def fused_adamw_fits(groups: list[dict]) -> bool:
    """Whether torch's fused AdamW kernel can update every parameter: plain floating-point tensors
    on CPU or CUDA (sharded DTensors and other devices keep torch's default implementation).

    torch only picks the fused kernel by itself on no device, and on CPU its default is one
    Python-level update per tensor: for the default LoRA run (420 adapter tensors) 25 ms per step
    against 9 ms fused (2 CPU cores), the same update up to rounding."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.is_floating_point()
                                and p.device.type in ("cpu", "cuda") for p in params)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                         num_training_steps=total_steps)
