"""Mixed methods, our own modules (no library ships them for causal LMs): each is a composition of
parts that other methods use, plus gates.

- MAM adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning"):
  prefix tuning on attention (a few key/value prefixes per layer) and a scaled parallel adapter
  on the feed-forward block: mlp(x) + s * up(relu(down(x))).
- UniPELT (Mao et al. 2022): LoRA on the query and value projections, prefix tuning and a
  bottleneck adapter after the feed-forward block, each behind a learned gate G = sigmoid(W x)
  that decides per token how much the part contributes.

The gates are per token: the reference implementation (for encoders) averages a gate over the
sequence, which in a causal model would let every position see the whole sequence; a per-token
gate keeps the model causal (tests/test_mixes.py checks this).

The prefixes are trained directly (no reparameterisation MLP) from small values, as ptuning-v2
does here: peft's N(0, 1) start wrecks the frozen model at step 0. The prefix keys enter attention
after the rotary embedding (they have no position), as in prefix tuning through a KV cache. Rows
are not packed (the prefixes sit before every row), and neither method merges into the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ftune.config.methods_schema import MethodConfig
from ftune.config.rules import positive
from ftune.errors import FtuneError
from ftune.methods.adapters import BottleneckAdapter
from ftune.methods.base import MethodSpec, Setup, freeze_all, register, wrap_linears
from ftune.runtime import decoder_layers

ATTENTION_NAME = "ftune_prefix"
NO_MERGE = "its prefixes add key/value entries to attention and its {} is not a linear change of a weight"


# ----------------------------------------------------------------------------- parts
class TokenGate(nn.Module):
    """G = sigmoid(W x + b), one value per token, read from the input of the gated part."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(x.to(self.proj.weight.dtype)))  # (..., tokens, 1)


class Prefix(nn.Module):
    """Key and value prefixes of one attention module: (length, kv heads x head size) each."""

    def __init__(self, length: int, kv_heads: int, head_dim: int, std: float, gated: bool, hidden: int):
        super().__init__()
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.key = nn.Parameter(torch.randn(length, kv_heads * head_dim) * std)
        self.value = nn.Parameter(torch.randn(length, kv_heads * head_dim) * std)
        self.gate = TokenGate(hidden) if gated else None
        self.gate_values: torch.Tensor | None = None  # (batch, tokens) of the current forward

    def kv(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, kv heads, length, head size) keys and values."""
        def shaped(t: torch.Tensor) -> torch.Tensor:
            t = t.to(dtype).view(-1, self.kv_heads, self.head_dim).transpose(0, 1)
            return t.unsqueeze(0).expand(batch, -1, -1, -1)

        return shaped(self.key), shaped(self.value)


class ParallelAdapter(nn.Module):
    """mlp(x) + scale * up(relu(down(x))): the adapter reads the block's input, beside it (MAM)."""

    def __init__(self, mlp: nn.Module, hidden: int, size: int, scale: float):
        super().__init__()
        self.mlp, self.scale = mlp, scale
        device = next(mlp.parameters()).device
        self.adapter_down = nn.Linear(hidden, size, device=device)
        self.adapter_up = nn.Linear(size, hidden, device=device)
        nn.init.zeros_(self.adapter_up.weight)  # the adapted block equals the base one at step 0
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(x)
        delta = self.adapter_up(F.relu(self.adapter_down(x.to(self.adapter_down.weight.dtype))))
        return h + (self.scale * delta).to(h.dtype)


class GatedBottleneck(BottleneckAdapter):
    """The bottleneck adapter of method=adapter, its residual scaled by a per-token gate (UniPELT)."""

    def __init__(self, inner: nn.Module, size: int, activation: str):
        super().__init__(inner, size, activation)
        self.adapter_gate = TokenGate(inner.out_features).to(inner.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        delta = self.adapter_up(self.adapter_act(self.adapter_down(h)))
        return h + (self.adapter_gate(h) * delta).to(h.dtype)


class GatedLoRALinear(nn.Module):
    """base(x) + G(x) * (alpha / r) * B A x, B starting at zero (UniPELT's gated LoRA)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base, self.scaling = base, alpha / r
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_gate = TokenGate(base.in_features).to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        xa = x.to(self.lora_A.dtype)
        delta = (xa @ self.lora_A.T) @ self.lora_B.T * self.scaling
        return h + (self.lora_gate(xa) * delta).to(h.dtype)


# ----------------------------------------------------------------------------- attention with prefixes
def _causal_allowed(mask: torch.Tensor | None, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """The boolean (batch or 1, 1, q, k) mask of the real keys: transformers' mask (sdpa_mask:
    True = attend; an additive float mask is read as masked / not masked), or plain causal aligned
    at the end (decoding with a cache: the queries are the last q_len positions)."""
    if mask is None:
        rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        return (torch.arange(k_len, device=device)[None, :] <= rows)[None, None]
    mask = mask[..., -q_len:, -k_len:]
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def prefix_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: the module's prefixes before its keys and values, every
    query allowed to see them. A gated prefix (UniPELT) scales, per query token, the prefix's
    attention logits and values by the gate."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    kwargs.pop("is_causal", None)
    prefix: Prefix | None = getattr(module, "ftune_prefix", None)
    if prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, _, q_len, d = query.shape
    allowed = _causal_allowed(attention_mask, q_len, key.shape[2], query.device)
    pk, pv = prefix.kv(b, key.dtype)
    open_prefix = torch.ones(*allowed.shape[:-1], pk.shape[2], dtype=torch.bool, device=query.device)
    mask = torch.cat([open_prefix, allowed], dim=-1)
    if prefix.gate is None:
        return sdpa_attention_forward(module, query, torch.cat([pk, key], 2), torch.cat([pv, value], 2), mask,
                                      dropout=dropout, scaling=scaling, is_causal=False, **kwargs)
    groups = query.shape[1] // key.shape[1]
    keys, values = repeat_kv(torch.cat([pk, key], 2), groups), repeat_kv(torch.cat([pv, value], 2), groups)
    scale = scaling if scaling is not None else d ** -0.5
    gate = prefix.gate_values[:, None, -q_len:, None].to(query.dtype)  # (batch, 1, q, 1)
    logits = (query @ keys.transpose(-1, -2)) * scale
    n = pk.shape[2]
    logits = torch.cat([logits[..., :n] * gate, logits[..., n:]], dim=-1)
    logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits.float(), dim=-1).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = (probs[..., :n] * gate) @ values[:, :, :n] + probs[..., n:] @ values[:, :, n:]
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, prefix_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _gate_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Before the attention module runs: its prefix gate's values for this forward's tokens."""
    prefix = getattr(module, "ftune_prefix", None)
    if prefix is not None and prefix.gate is not None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        prefix.gate_values = prefix.gate(hidden).squeeze(-1)


def add_prefixes(model: Any, length: int, std: float, gated: bool) -> list[nn.Module]:
    """A Prefix on every decoder layer's self-attention, and the attention function that reads them."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    layers = decoder_layers(model)
    attentions = [getattr(layer, "self_attn", None) for layer in layers]
    if not layers or any(a is None for a in attentions):
        raise FtuneError("method.prefix_length: prefixes need decoder layers with a `self_attn` module, which this "
                         "model does not have", hint="Use a Llama-family model, or a method without prefixes.")
    device = next(model.parameters()).device
    for attention in attentions:
        attention.ftune_prefix = Prefix(length, kv_heads, head_dim, std, gated, config.hidden_size).to(device)
        if gated:
            attention.register_forward_pre_hook(_gate_hook, with_kwargs=True)
    register_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    return attentions


def _mlps(model: Any) -> list[tuple[nn.Module, str]]:
    found = [(layer, "mlp") for layer in decoder_layers(model) if isinstance(getattr(layer, "mlp", None), nn.Module)]
    if not found:
        raise FtuneError("this model's decoder layers have no `mlp` block for the adapter", hint="Use a Llama-family model.")
    return found


# ----------------------------------------------------------------------------- the methods
@dataclass
class MamConfig(MethodConfig):
    """MAM adapter (He et al. 2022): prefix tuning on attention + a scaled parallel adapter on the
    feed-forward block."""

    name: str = "mam"
    prefix_length: int = 30
    """Key/value prefixes per layer (the paper's l = 30)."""
    prefix_init_std: float = 0.02
    """Standard deviation of the initial prefixes: small, so training starts near the base model."""
    ffn_bottleneck: int = 512
    """Width of the parallel adapter (the paper's r = 512)."""
    ffn_scale: float = 4.0
    """The parallel adapter's output scale s (the paper's 4)."""
    no_packing: ClassVar[str] = "its prefixes sit before every row"

    def problems(self, cfg: Any) -> list[str]:
        problems: list[str] = []
        for key in ("prefix_length", "ffn_bottleneck", "ffn_scale", "prefix_init_std"):
            positive(problems, f"method.{key}", getattr(self, key))
        return problems


def apply_mam(model: Any, cfg: Any, setup: Setup) -> Any:
    m = cfg.method
    freeze_all(model)
    add_prefixes(model, m.prefix_length, m.prefix_init_std, gated=False)
    for layer, child in _mlps(model):
        setattr(layer, child, ParallelAdapter(getattr(layer, child), model.config.hidden_size, m.ffn_bottleneck,
                                              m.ffn_scale))
    return model


@dataclass
class UniPeltConfig(MethodConfig):
    """UniPELT (Mao et al. 2022): gated LoRA on the query and value projections, gated prefix
    tuning and a gated bottleneck adapter after the feed-forward block."""

    name: str = "unipelt"
    r: int = 8
    """LoRA rank (the paper's 8)."""
    alpha: float = 16.0
    """LoRA scaling numerator (alpha / r)."""
    lora_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Projections with gated LoRA (the paper: query and value)."""
    prefix_length: int = 10
    """Key/value prefixes per layer (the paper's 10)."""
    prefix_init_std: float = 0.02
    """Standard deviation of the initial prefixes."""
    bottleneck: int = 0
    """Width of the adapter after the feed-forward block (0: hidden size / 16, the paper's
    reduction factor)."""
    activation: str = "relu"
    """gelu | relu | silu: the adapter's non-linearity."""
    no_packing: ClassVar[str] = "its prefixes sit before every row"

    def problems(self, cfg: Any) -> list[str]:
        problems: list[str] = []
        for key in ("r", "alpha", "prefix_length", "prefix_init_std"):
            positive(problems, f"method.{key}", getattr(self, key))
        positive(problems, "method.bottleneck", self.bottleneck, allow_zero=True)
        if not self.lora_modules:
            problems.append("method.lora_modules is empty; name the projections with gated LoRA (q_proj, v_proj)")
        if self.activation not in ("gelu", "relu", "silu"):
            problems.append(f"method.activation must be one of gelu, relu, silu (got {self.activation!r})")
        return problems


def apply_unipelt(model: Any, cfg: Any, setup: Setup) -> Any:
    m = cfg.method
    freeze_all(model)
    size = m.bottleneck or max(1, model.config.hidden_size // 16)
    wrap_linears(model, m.lora_modules, lambda linear: GatedLoRALinear(linear, m.r, m.alpha))
    add_prefixes(model, m.prefix_length, m.prefix_init_std, gated=True)
    for layer, _ in _mlps(model):  # after the feed-forward block: on its output projection
        mlp = layer.mlp
        name = next((n for n in ("down_proj", "fc2") if isinstance(getattr(mlp, n, None), nn.Linear)), None)
        if name is None:
            raise FtuneError("method=unipelt: no feed-forward output projection (down_proj) in this model")
        setattr(mlp, name, GatedBottleneck(getattr(mlp, name), size, m.activation))
    return model


register(MethodSpec(MamConfig, apply_mam, not_mergeable=NO_MERGE.format("parallel adapter has a non-linearity, so it")))
register(MethodSpec(UniPeltConfig, apply_unipelt,
                    not_mergeable=NO_MERGE.format("gated LoRA depends on the input (the gate), so it")))
