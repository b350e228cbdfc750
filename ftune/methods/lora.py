"""LoRA and QLoRA through peft (DoRA, rsLoRA and PiSSA init are peft switches; LoRA+ is a
learning-rate scale on the B matrices, applied by the optimiser).

QLoRA differs only in the base: loaded in 4-bit NF4 by models/load.py, then prepared with peft's
prepare_model_for_kbit_training (norms in fp32, input grads enabled for checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ftune.config.methods_schema import MethodConfig
from ftune.config.rules import choice, positive, within
from ftune.methods.base import MethodSpec, StepHooks, register


@dataclass
class LoraConfig(MethodConfig):
    """Low-rank adapters (LoRA, Hu et al. 2021) through peft, with DoRA and rsLoRA switches."""

    name: str = "lora"
    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Scaling numerator: updates are scaled by alpha/r (alpha/sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter input (0.05-0.1 regularises long runs; on CPU it costs ~25% speed)."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt (q_proj, v_proj, …) or [all-linear] for every linear layer but the head."""
    use_dora: bool = False
    """DoRA: decompose into magnitude and direction (Liu et al. 2024)."""
    use_rslora: bool = False
    """rsLoRA: scale by alpha/sqrt(r), stable at high ranks (Kalajdzievski 2023)."""
    bias: str = "none"
    """none | all | lora_only: which biases are trained with the adapter."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved beside the adapter (e.g. [lm_head, embed_tokens])."""
    init: str = "default"
    """Adapter initialisation: default (A random, B zero) | gaussian | pissa (A, B from the top
    singular vectors of W; the residual stays in the base, Meng et al. 2024)."""
    loraplus_lr_ratio: float = 0.0
    """LoRA+ (Hayou et al. 2024): B matrices learn at lr x this ratio (16 in the paper); 0: off."""
    adapter_reference: ClassVar[bool] = True
    quantised_variant: ClassVar[str] = "qlora"

    def problems(self, cfg: Any) -> list[str]:
        problems: list[str] = []
        positive(problems, "method.r", self.r)
        positive(problems, "method.alpha", self.alpha)
        within(problems, "method.dropout", self.dropout, 0, 1)
        if not self.target_modules:
            problems.append("method.target_modules is empty; name modules (q_proj, v_proj) or use [all-linear]")
        choice(problems, "method.bias", self.bias, ("none", "all", "lora_only"))
        choice(problems, "method.init", self.init, tuple(INIT))
        positive(problems, "method.loraplus_lr_ratio", self.loraplus_lr_ratio, allow_zero=True)
        return problems


@dataclass
class QLoraConfig(LoraConfig):
    """LoRA on a 4-bit NF4 base (Dettmers et al. 2023). Sets model.quantization=4bit."""

    name: str = "qlora"
    base_quantization: ClassVar[str] = "4bit"
    counted_as: ClassVar[str] = "lora"  # the same adapter; the 4-bit base is counted with the weights
    quantised_variant: ClassVar[str] = ""

    def problems(self, cfg: Any) -> list[str]:
        problems = super().problems(cfg)
        if cfg.model.quantization != "4bit":
            problems.append(f"method=qlora needs model.quantization=4bit (got {cfg.model.quantization}); "
                            "use method=lora for an unquantised or 8-bit base")
        return problems

INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}


def targets(names: list[str]) -> str | list[str]:
    return "all-linear" if list(names) == ["all-linear"] else list(names)


def peft_config(method: Any) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=targets(method.target_modules),
        use_dora=method.use_dora,
        use_rslora=method.use_rslora,
        bias=method.bias,
        modules_to_save=list(method.modules_to_save) or None,
        init_lora_weights=INIT[method.init],
    )


def apply_lora(model: Any, cfg: Any, setup: Any = None) -> Any:
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg.method))


class LoraPlusHooks(StepHooks):
    """LoRA+: the B matrices (lora_B) learn `ratio` times faster than the A matrices."""

    def __init__(self, cfg: Any):
        self.ratio = cfg.method.loraplus_lr_ratio

    def lr_scale(self, name: str) -> float:
        return self.ratio if self.ratio and "lora_B" in name else 1.0




def keep_4bit_layers_differentiable(model: Any) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, a Linear4bit run in eval mode without grad (our held-out evaluation)
    permanently repacks its weight for a kernel that has no backward; later training steps then
    backpropagate through it silently wrong. Training needs the differentiable path throughout.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def apply_qlora(model: Any, cfg: Any, setup: Any = None) -> Any:
    from peft import prepare_model_for_kbit_training

    keep_4bit_layers_differentiable(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(setup and setup.checkpointed_layers))
    return apply_lora(model, cfg)


register(MethodSpec(LoraConfig, apply_lora, hooks=LoraPlusHooks))
register(MethodSpec(QLoraConfig, apply_qlora, hooks=LoraPlusHooks))
