"""LoRA and QLoRA through peft (DoRA, rsLoRA and PiSSA init are peft switches; LoRA+ is a
learning-rate scale on the B matrices, applied by the optimiser).

QLoRA differs only in the base: loaded in 4-bit NF4 by models/load.py, then prepared with peft's
prepare_model_for_kbit_training (norms in fp32, input grads enabled for checkpointing).
"""

from __future__ import annotations

from typing import Any

from ftune.methods import HOOKS, METHODS, StepHooks

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


@METHODS.register("lora")
def apply_lora(model: Any, cfg: Any, setup: Any = None) -> Any:
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg.method))


class LoraPlusHooks(StepHooks):
    """LoRA+: the B matrices (lora_B) learn `ratio` times faster than the A matrices."""

    def __init__(self, cfg: Any):
        self.ratio = cfg.method.loraplus_lr_ratio

    def lr_scale(self, name: str) -> float:
        return self.ratio if self.ratio and "lora_B" in name else 1.0


HOOKS.register("lora")(LoraPlusHooks)
HOOKS.register("qlora")(LoraPlusHooks)


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


@METHODS.register("qlora")
def apply_qlora(model: Any, cfg: Any, setup: Any = None) -> Any:
    from peft import prepare_model_for_kbit_training

    keep_4bit_layers_differentiable(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(setup and setup.checkpointed_layers))
    return apply_lora(model, cfg)
