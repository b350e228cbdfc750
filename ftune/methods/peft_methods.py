"""The other methods peft implements: soft prompts (prompt, ptuning, prefix, ptuning-v2), IA3,
LoHa, LoKr, AdaLoRA and VeRA. Each maps its typed config onto peft's and wraps the model; the
saved adapter is standard peft (PeftModel.from_pretrained loads it)."""

from __future__ import annotations

from typing import Any

import torch

from ftune.methods import HOOKS, METHODS, Setup, StepHooks


def _wrap(model: Any, peft_cfg: Any) -> Any:
    from peft import get_peft_model

    return get_peft_model(model, peft_cfg)


@METHODS.register("prompt")
def apply_prompt(model: Any, cfg: Any, setup: Setup) -> Any:
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    m = cfg.method
    init = dict(prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=m.init_text,
                tokenizer_name_or_path=setup.model_path) if m.init_text else {}
    return _wrap(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m.num_virtual_tokens, **init))


@METHODS.register("ptuning")
def apply_ptuning(model: Any, cfg: Any, setup: Setup) -> Any:
    from peft import PromptEncoderConfig, PromptEncoderReparameterizationType, TaskType

    m = cfg.method
    kind = {"mlp": PromptEncoderReparameterizationType.MLP, "lstm": PromptEncoderReparameterizationType.LSTM}[m.encoder]
    return _wrap(model, PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m.num_virtual_tokens,
                                            encoder_reparameterization_type=kind,
                                            encoder_hidden_size=m.encoder_hidden_size))


@METHODS.register("prefix")
def apply_prefix(model: Any, cfg: Any, setup: Setup) -> Any:
    from peft import PrefixTuningConfig, TaskType

    m = cfg.method
    return _wrap(model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m.num_virtual_tokens,
                                           prefix_projection=True, encoder_hidden_size=m.encoder_hidden_size))


@METHODS.register("ptuning-v2")
def apply_ptuning_v2(model: Any, cfg: Any, setup: Setup) -> Any:
    from peft import PrefixTuningConfig, TaskType

    # P-tuning v2 is prefix tuning without the reparameterisation MLP: the per-layer key/value
    # prompts are the trained parameters themselves. peft draws them from N(0, 1), which wrecks the
    # frozen model at step 0 (SmolLM2 held-out loss 6.8 instead of 1.03, measured); small values
    # start from the base model's behaviour (1.035 with std 0.02).
    model = _wrap(model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                            num_virtual_tokens=cfg.method.num_virtual_tokens, prefix_projection=False))
    with torch.no_grad():
        model.prompt_encoder[model.active_adapter].embedding.weight.normal_(0, cfg.method.init_std)
    return model


@METHODS.register("ia3")
def apply_ia3(model: Any, cfg: Any, setup: Setup) -> Any:
    from peft import IA3Config, TaskType

    m = cfg.method
    return _wrap(model, IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=list(m.target_modules),
                                  feedforward_modules=list(m.feedforward_modules)))


@METHODS.register("loha")
@METHODS.register("lokr")
def apply_lycoris(model: Any, cfg: Any, setup: Setup) -> Any:
    import peft

    m = cfg.method
    config_class = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}[m.name]
    return _wrap(model, config_class(r=m.r, alpha=m.alpha, target_modules=list(m.target_modules),
                                     module_dropout=m.module_dropout))


@METHODS.register("vera")
def apply_vera(model: Any, cfg: Any, setup: Setup) -> Any:
    from peft import TaskType, VeraConfig

    m = cfg.method
    return _wrap(model, VeraConfig(task_type=TaskType.CAUSAL_LM, r=m.r, target_modules=list(m.target_modules),
                                   d_initial=m.d_initial, projection_prng_key=m.projection_prng_key,
                                   save_projection=True))


@METHODS.register("adalora")
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


HOOKS.register("adalora")(AdaLoraHooks)


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
