"""LongLoRA (Chen et al. 2024), our own module around peft's LoRA.

Three parts:
- Shifted sparse attention (S²-Attn) in training: the sequence is cut into groups and attention
  stays inside a group; half of the heads work on the sequence shifted by half a group, so
  information flows between neighbouring groups. It is registered as a transformers attention
  function; in eval mode (and at inference) the same function runs full SDPA attention.
- Trainable embeddings and normalisation layers beside the LoRA matrices (the paper's "LoRA+").
- Linear RoPE position interpolation by `context_factor`, to train and run at that many times
  the model's native context.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ftune.methods import METHODS, Setup

ATTENTION_NAME = "ftune_s2attn"


def _repeat_kv(x: torch.Tensor, times: int) -> torch.Tensor:
    return x if times == 1 else x.repeat_interleave(times, dim=1)


def shifted_group_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int,
                            scaling: float | None) -> torch.Tensor:
    """Causal attention inside groups of `group` tokens, half the heads shifted by group // 2.

    q, k, v: (batch, heads, length, dim) with length a multiple of `group`. With a single group
    there is no neighbour to shift towards, and the result is plain causal attention.
    """
    b, h, n, d = q.shape
    shift = group // 2 if n > group else 0

    def prepare(x: torch.Tensor) -> torch.Tensor:
        if shift:
            x = torch.cat([x[:, : h // 2], x[:, h // 2:].roll(-shift, dims=2)], dim=1)
        return x.reshape(b, h, n // group, group, d)

    out = F.scaled_dot_product_attention(prepare(q), prepare(k), prepare(v), is_causal=True, scale=scaling)
    out = out.reshape(b, h, n, d)
    if shift:
        out = torch.cat([out[:, : h // 2], out[:, h // 2:].roll(shift, dims=2)], dim=1)
    return out


def s2_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: S²-Attn while training, full SDPA otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n = query.shape[2]
    group = max(1, int(n * module.config.s2_group_fraction))
    if not module.training or n % group:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    times = query.shape[1] // key.shape[1]
    out = shifted_group_attention(query, _repeat_kv(key, times), _repeat_kv(value, times), group, scaling)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, s2_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def scale_rope(model: Any, factor: float) -> None:
    """Linear position interpolation: positions are divided by `factor` inside RoPE."""
    if factor == 1:
        return
    config = model.config
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.update({"rope_type": "linear", "factor": float(factor)})
    config.rope_parameters = params
    config.max_position_embeddings = int(config.max_position_embeddings * factor)
    for parent in model.modules():
        for child, module in list(parent.named_children()):
            if type(module).__name__.endswith("RotaryEmbedding"):
                setattr(parent, child, type(module)(config=config).to(module.inv_freq.device))


@METHODS.register("longlora")
def apply_longlora(model: Any, cfg: Any, setup: Setup) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model

    m = cfg.method
    register_attention()
    scale_rope(model, m.context_factor)
    model.config.s2_group_fraction = m.group_fraction
    model.set_attn_implementation(ATTENTION_NAME)
    # peft matches modules_to_save by name suffix: "norm" covers input_layernorm,
    # post_attention_layernorm and the final norm. They are trained in full and saved with the adapter.
    extra = (["embed_tokens"] if m.train_embeddings else []) + (["norm"] if m.train_norms else [])
    return get_peft_model(model, LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=m.r, lora_alpha=m.alpha, lora_dropout=m.dropout,
        target_modules=list(m.target_modules), modules_to_save=extra or None,
        # A tied output head must follow the trained embeddings, or the two silently diverge.
        ensure_weight_tying=bool(getattr(model.config, "tie_word_embeddings", False))))
