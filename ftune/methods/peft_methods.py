"""The other weight methods peft implements: IA3, LoHa, LoKr, AdaLoRA and VeRA. Each maps its
typed config onto peft's and wraps the model; the saved adapter is standard peft
(PeftModel.from_pretrained loads it) and merges through peft's merge_and_unload."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ftune.config.methods_schema import MethodConfig
from ftune.config.rules import positive
from ftune.methods.base import MethodSpec, Setup, StepHooks, register

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class PeftWeightConfig(MethodConfig):
    """Knobs shared by the peft weight methods below."""

    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Modules to adapt."""
    adapter_reference: ClassVar[bool] = True

    def problems(self, cfg: Any) -> list[str]:
        problems: list[str] = []
        if not self.target_modules:
            problems.append(f"method.target_modules is empty; name the modules {self.name} adapts")
        if hasattr(self, "r"):
            positive(problems, "method.r", self.r)
        return problems


@dataclass
class IA3Config(PeftWeightConfig):
    """IA3 (Liu et al. 2022): learned vectors that rescale keys, values and FFN activations."""

    name: str = "ia3"
    target_modules: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    """Modules whose activations are rescaled."""
    feedforward_modules: list[str] = field(default_factory=lambda: ["down_proj"])
    """Of those, the feed-forward ones (their input is rescaled, not their output)."""


@dataclass
class LycorisConfig(PeftWeightConfig):
    """Knobs shared by the LyCORIS-family methods peft implements (LoHa, LoKr)."""

    r: int = 8
    """Rank of the low-rank factors."""
    alpha: float = 16.0
    """Scaling numerator (alpha / r)."""
    module_dropout: float = 0.0
    """Probability of skipping a module's update during training."""


@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa (Hyeon-Woo et al. 2022): the update is a Hadamard product of two low-rank products."""

    name: str = "loha"


@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr (Yeh et al. 2023): the update is a Kronecker product with a low-rank factor."""

    name: str = "lokr"


@dataclass
class AdaLoraConfig(PeftWeightConfig):
    """AdaLoRA (Zhang et al. 2023): SVD-form LoRA whose rank budget is reallocated during training
    by importance; the trainer calls the budget update every step."""

    name: str = "adalora"
    init_r: int = 12
    """Starting rank of every matrix."""
    target_r: int = 8
    """Average rank after pruning (the budget)."""
    alpha: float = 32.0
    """Scaling numerator."""
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    """Modules to adapt."""
    tinit: float = 0.1
    """Fraction of steps trained before pruning starts."""
    tfinal: float = 0.2
    """Fraction of steps at the end trained with the final ranks."""
    delta_t: int = 1
    """Steps between budget reallocations."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality regulariser on P and Q."""

    def problems(self, cfg: Any) -> list[str]:
        problems = super().problems(cfg)
        positive(problems, "method.init_r", self.init_r)
        positive(problems, "method.target_r", self.target_r)
        if self.target_r > self.init_r:
            problems.append(f"method.target_r ({self.target_r}) must be <= method.init_r ({self.init_r})")
        if self.tinit + self.tfinal >= 1:
            problems.append(f"method.tinit + method.tfinal must be < 1 (got {self.tinit} + {self.tfinal}): "
                            "AdaLoRA needs steps between them to reallocate ranks")
        return problems


@dataclass
class VeraConfig(PeftWeightConfig):
    """VeRA (Kopiczko et al. 2024): one pair of frozen random matrices shared by all layers, with
    trainable scaling vectors per layer."""

    name: str = "vera"
    r: int = 256
    """Rank of the shared random matrices (VeRA uses large ranks; they are frozen)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Modules to adapt."""
    d_initial: float = 0.1
    """Initial value of the d scaling vector."""
    projection_prng_key: int = 0
    """Seed of the shared random matrices."""


def _wrap(model: Any, peft_cfg: Any) -> Any:
    from peft import get_peft_model

    return get_peft_model(model, peft_cfg)


def apply_ia3(model: Any, cfg: Any, setup: Setup) -> Any:
    from peft import IA3Config, TaskType

    m = cfg.method
    return _wrap(model, IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=list(m.target_modules),
                                  feedforward_modules=list(m.feedforward_modules)))


def apply_lycoris(model: Any, cfg: Any, setup: Setup) -> Any:
    import peft

    m = cfg.method
    config_class = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}[m.name]
    return _wrap(model, config_class(r=m.r, alpha=m.alpha, target_modules=list(m.target_modules),
                                     module_dropout=m.module_dropout))


def apply_vera(model: Any, cfg: Any, setup: Setup) -> Any:
    from peft import TaskType, VeraConfig

    m = cfg.method
    return _wrap(model, VeraConfig(task_type=TaskType.CAUSAL_LM, r=m.r, target_modules=list(m.target_modules),
                                   d_initial=m.d_initial, projection_prng_key=m.projection_prng_key,
                                   save_projection=True))


def apply_adalora(model: Any, cfg: Any, setup: Setup) -> Any:
    from peft import AdaLoraConfig, TaskType

    m = cfg.method
    steps = setup.total_steps
    return _wrap(model, AdaLoraConfig(task_type=TaskType.CAUSAL_LM, init_r=m.init_r, target_r=m.target_r,
                                      lora_alpha=m.alpha, target_modules=list(m.target_modules),
                                      tinit=int(m.tinit * steps), tfinal=int(m.tfinal * steps), deltaT=m.delta_t,
                                      orth_reg_weight=m.orth_reg_weight, total_step=steps))


class AdaLoraHooks(StepHooks):
    """AdaLoRA's two training-time parts: the orthogonality regulariser on P and Q, and the budget
    update (importance scores from the gradients, then rank pruning) after every optimiser step."""

    def __init__(self, cfg: Any):
        self.weight = cfg.method.orth_reg_weight

    def regularizer(self, model: Any) -> torch.Tensor | None:
        terms = []
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_A" in name or "lora_B" in name) and p.numel():
                cov = p @ p.T if "lora_A" in name else p.T @ p
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=p.device, dtype=p.dtype)))
        return self.weight * torch.stack(terms).mean() if terms else None

    def after_optimizer_step(self, model: Any, step: int) -> None:
        model.base_model.update_and_allocate(step)


register(MethodSpec(IA3Config, apply_ia3))
register(MethodSpec(LoHaConfig, apply_lycoris))
register(MethodSpec(LoKrConfig, apply_lycoris))
register(MethodSpec(VeraConfig, apply_vera))
register(MethodSpec(AdaLoraConfig, apply_adalora, hooks=AdaLoraHooks))


def keep_activation_dtype(model: Any) -> int:
    """Under autocast, stop peft from casting every adapter input to the adapter's fp32 dtype.

    peft casts the bf16 activation to fp32 before each adapter, and autocast casts it straight
    back to bf16 for the matmul: two full-size copies per adapted layer per pass, for the same
    numbers. Measured on the default CPU workload: 1.14x tokens/s, identical loss. Only for runs
    under autocast (without it the fp32 adapter would meet a bf16 input). Returns the layers set."""
    n = 0
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
            n += 1
    return n
