"""Soft prompts through peft: prompt tuning, p-tuning, prefix tuning and p-tuning v2. Each adds
trainable virtual tokens (at the input, or as key/value prefixes in every layer); the saved adapter
is standard peft. They change inputs, not weights, so they cannot be merged, and the virtual tokens
sit before every row, so rows cannot be packed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from ftune.config.methods_schema import MethodConfig
from ftune.config.rules import choice, positive
from ftune.methods.base import MethodSpec, Setup, register


@dataclass
class SoftPromptConfig(MethodConfig):
    """Knobs shared by the soft-prompt methods."""

    num_virtual_tokens: int = 20
    """How many virtual tokens are prepended (prefix length per layer for prefix and ptuning-v2)."""
    no_packing: ClassVar[str] = "virtual tokens are prepended to every row"
    adapter_reference: ClassVar[bool] = True

    def problems(self, cfg: Any) -> list[str]:
        problems: list[str] = []
        positive(problems, "method.num_virtual_tokens", self.num_virtual_tokens)
        if hasattr(self, "encoder_hidden_size"):
            positive(problems, "method.encoder_hidden_size", self.encoder_hidden_size)
        if hasattr(self, "encoder"):
            choice(problems, "method.encoder", self.encoder, ("mlp", "lstm"))
        return problems


@dataclass
class PromptConfig(SoftPromptConfig):
    """Prompt tuning (Lester et al. 2021): k trainable virtual-token embeddings before the input."""

    name: str = "prompt"
    init_text: Optional[str] = None
    """Initialise the virtual tokens from this text's token embeddings (unset: random)."""


@dataclass
class PTuningConfig(SoftPromptConfig):
    """P-tuning v1 (Liu et al. 2021): virtual tokens produced by a trainable prompt encoder."""

    name: str = "ptuning"
    encoder: str = "mlp"
    """mlp | lstm: the prompt encoder."""
    encoder_hidden_size: int = 256
    """Hidden size of the prompt encoder."""


@dataclass
class PrefixConfig(SoftPromptConfig):
    """Prefix tuning (Li & Liang 2021): trainable key/value prefixes in every layer, produced by a
    reparameterisation MLP during training."""

    name: str = "prefix"
    encoder_hidden_size: int = 256
    """Hidden size of the reparameterisation MLP."""


@dataclass
class PTuningV2Config(SoftPromptConfig):
    """P-tuning v2 (Liu et al. 2022): deep prompts (key/value prefixes) in every layer, trained
    directly, without reparameterisation."""

    name: str = "ptuning-v2"
    init_std: float = 0.02
    """Standard deviation of the initial prefixes: small, so training starts from the base model."""


def _wrap(model: Any, peft_cfg: Any) -> Any:
    from peft import get_peft_model

    return get_peft_model(model, peft_cfg)


def apply_prompt(model: Any, cfg: Any, setup: Setup) -> Any:
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    m = cfg.method
    init = dict(prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=m.init_text,
                tokenizer_name_or_path=setup.model_path) if m.init_text else {}
    return _wrap(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m.num_virtual_tokens, **init))


def apply_ptuning(model: Any, cfg: Any, setup: Setup) -> Any:
    from peft import PromptEncoderConfig, PromptEncoderReparameterizationType, TaskType

    m = cfg.method
    kind = {"mlp": PromptEncoderReparameterizationType.MLP, "lstm": PromptEncoderReparameterizationType.LSTM}[m.encoder]
    return _wrap(model, PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m.num_virtual_tokens,
                                            encoder_reparameterization_type=kind,
                                            encoder_hidden_size=m.encoder_hidden_size))


def apply_prefix(model: Any, cfg: Any, setup: Setup) -> Any:
    from peft import PrefixTuningConfig, TaskType

    m = cfg.method
    return _wrap(model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=m.num_virtual_tokens,
                                           prefix_projection=True, encoder_hidden_size=m.encoder_hidden_size))


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


INPUTS_ONLY = "{} adds virtual input tokens; there is no weight change to fold in"
PREFIXES = "{} adds key/value prefixes to every layer; there is no weight change to fold in"
register(MethodSpec(PromptConfig, apply_prompt, not_mergeable=INPUTS_ONLY.format("prompt tuning")))
register(MethodSpec(PTuningConfig, apply_ptuning, not_mergeable=INPUTS_ONLY.format("p-tuning")))
register(MethodSpec(PrefixConfig, apply_prefix, not_mergeable=PREFIXES.format("prefix tuning")))
register(MethodSpec(PTuningV2Config, apply_ptuning_v2, not_mergeable=PREFIXES.format("p-tuning v2")))
