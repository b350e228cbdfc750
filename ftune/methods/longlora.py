"""LongLoRA (Chen et al. 2024), our own module around peft's LoRA.

Three parts:
- Shifted sparse attention (S²-Attn) in training: the sequence is cut into groups and attention
  stays inside a group; half of the heads use groups starting half a group later, so information
  flows between neighbouring groups. The shifted partition does not wrap (the reference's first
  version rolled the sequence, letting its first tokens see its last ones): the first half-group
  and the last one are groups of their own. The attention mask (padding, packed samples) holds
  inside every group. It is registered as a transformers attention function; in eval mode (and
  at inference) the same function runs full SDPA attention.
- Trainable embeddings and normalisation layers beside the LoRA matrices (the paper's "LoRA+").
- Linear RoPE position interpolation by `context_factor`, to train and run at that many times
  the model's native context. A peft folder does not carry it, so the saved adapter has a note
  (ftune_longlora.json, and README.md) that ftune's reload and `ftune merge` apply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ftune.config.methods_schema import MethodConfig
from ftune.config.rules import positive
from ftune.errors import FtuneError
from ftune.methods.base import MethodSpec, Setup, register


@dataclass
class LongLoraConfig(MethodConfig):
    """LongLoRA (Chen et al. 2024): LoRA + trainable embeddings and norms, shifted sparse attention
    while training, and linear RoPE interpolation to a longer context."""

    name: str = "longlora"
    r: int = 8
    """Adapter rank."""
    alpha: float = 16.0
    """Scaling numerator (alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Modules with LoRA adapters (the paper adapts the attention projections)."""
    context_factor: float = 2.0
    """Train at this many times the model's native context (RoPE positions divided by it)."""
    group_fraction: float = 0.25
    """S²-Attn group size as a fraction of the sequence length (the paper uses 1/4)."""
    train_embeddings: bool = True
    """Train the input embeddings in full (needed to adapt to a longer context, per the paper)."""
    train_norms: bool = True
    """Train the normalisation layers in full."""
    no_packing: ClassVar[str] = "S²-Attn cuts its attention groups over the whole row, not per packed sample"
    adapter_reference: ClassVar[bool] = True

    def problems(self, cfg: Any) -> list[str]:
        problems: list[str] = []
        positive(problems, "method.r", self.r)
        if self.context_factor < 1:
            problems.append(f"method.context_factor must be >= 1 (got {self.context_factor})")
        if not 0 < self.group_fraction <= 1:
            problems.append(f"method.group_fraction must be in (0, 1] (got {self.group_fraction})")
        return problems


ATTENTION_NAME = "ftune_s2attn"


def _repeat_kv(x: torch.Tensor, times: int) -> torch.Tensor:
    return x if times == 1 else x.repeat_interleave(times, dim=1)


def group_layout(n: int, group: int, shift: int) -> torch.Tensor:
    """The token at each slot when a row of `n` tokens is cut into groups; -1 marks filler.

    shift=0: groups [0, g), [g, 2g), ... shift>0: the first `shift` tokens form a group of their
    own, then groups start at shift, shift+g, ... and the last `g - shift` tokens form the final,
    short group. Filler always trails the tokens of its group, so plain causal attention inside a
    group never looks at it, and no group ever wraps from the end of the row back to its start.
    """
    if not shift:
        return torch.arange(n)
    filler = torch.full((group - shift,), -1)
    return torch.cat([torch.arange(shift), filler, torch.arange(shift, n), torch.full((shift,), -1)])


def _block_mask(allowed: torch.Tensor, slots: torch.Tensor, group: int) -> torch.Tensor:
    """The (batch x groups, heads, g, g) part of `allowed` (batch, heads, n, n) inside each group."""
    b, hm = allowed.shape[:2]
    s = slots.view(-1, group)
    token = s.clamp(min=0)
    m = allowed[:, :, token[:, :, None], token[:, None, :]]  # (b, hm, groups, g, g)
    causal = torch.ones(group, group, dtype=torch.bool, device=allowed.device).tril()
    m = m & (s >= 0)[:, None, :] & causal
    # A query with nothing to attend to (a padding token, filler) attends to itself instead: some
    # SDPA kernels give a fully masked row NaN, and its NaN gradients would reach every key.
    m = m | torch.eye(group, dtype=torch.bool, device=allowed.device)
    return m.transpose(1, 2).reshape(-1, hm, group, group)


def _grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, group: int,
                       allowed: torch.Tensor | None, scaling: float | None, dropout: float) -> torch.Tensor:
    """Causal attention inside the groups of `slots` (see group_layout), in the row's order."""
    b, h, n, d = q.shape
    slots = slots.to(q.device)
    token = slots.clamp(min=0)
    groups = slots.numel() // group
    in_order = groups * group == n  # no filler: the slots are the row itself, nothing to gather

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (b, h, n, d) -> (b * groups, h, g, d)
        x = x if in_order else x[:, :, token]
        return x.reshape(b, h, groups, group, d).transpose(1, 2).reshape(b * groups, h, group, d)

    mask = None if allowed is None else _block_mask(allowed, slots, group)
    out = F.scaled_dot_product_attention(blocks(q), blocks(k), blocks(v), attn_mask=mask, is_causal=mask is None,
                                         dropout_p=dropout, scale=scaling)
    out = out.view(b, groups, h, group, d).transpose(1, 2).reshape(b, h, groups * group, d)
    if in_order:
        return out
    position = torch.empty(n, dtype=torch.long, device=q.device)
    position[token[slots >= 0]] = torch.nonzero(slots >= 0).squeeze(1)
    return out[:, :, position]


def shifted_group_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int,
                            scaling: float | None, allowed: torch.Tensor | None = None,
                            dropout: float = 0.0) -> torch.Tensor:
    """Causal attention inside groups of `group` tokens; the second half of the heads use groups
    shifted by group // 2 (group_layout), so information flows between neighbouring groups.

    q, k, v: (batch, heads, length, dim) with length a multiple of `group`. `allowed`: None or a
    boolean (batch, 1 or heads, length, length) mask, True where a query may attend to a key
    (padding, packed-sample boundaries); it is applied on top of the groups. With a single group
    there is no neighbour to shift towards, and the result is plain causal attention.
    """
    b, h, n = q.shape[:3]
    shift = group // 2 if n > group else 0
    allowed = None if allowed is None else allowed.expand(b, -1, n, n)
    halves = [(slice(0, h // 2), 0), (slice(h // 2, h), shift)]
    outs = []
    for heads, head_shift in halves:
        if heads.start == heads.stop:  # a single head: nothing left unshifted
            continue
        part = allowed if allowed is None or allowed.shape[1] == 1 else allowed[:, heads]
        outs.append(_grouped_attention(q[:, heads], k[:, heads], v[:, heads], group_layout(n, group, head_shift),
                                       group, part, scaling, dropout))
    return torch.cat(outs, dim=1)


def _allowed(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The mask transformers built (sdpa_mask: boolean, True = attend; None = plain causal) as a
    boolean (batch, heads, n, n) mask. An additive float mask keeps only which entries are
    masked (-inf or the dtype's minimum), which is all a padding or packing mask holds."""
    if mask is None:
        return None
    mask = mask[:, :, -n:, :n]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask


def s2_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: S²-Attn while training, full SDPA otherwise.

    The attention mask holds padding and, for rows packed with restarting position ids, the
    sample boundaries; S²-Attn applies it inside every group."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n = query.shape[2]
    group = max(1, int(n * module.config.s2_group_fraction))
    if not module.training or n % group or key.shape[2] != n:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    times = query.shape[1] // key.shape[1]
    out = shifted_group_attention(query, _repeat_kv(key, times), _repeat_kv(value, times), group, scaling,
                                  _allowed(attention_mask, n), dropout)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, s2_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _rope(config: Any) -> dict:
    return dict(getattr(config, "rope_parameters", None) or {})


def scale_rope(model: Any, factor: float) -> None:
    """Linear position interpolation: positions are divided by `factor` inside RoPE. A base that
    already interpolates linearly is divided further; other RoPE variants (llama3, yarn, ...)
    compute frequencies in ways a linear factor cannot be combined with, so they are refused."""
    if factor == 1:
        return
    config = model.config
    params = _rope(config)
    kind = params.get("rope_type")
    if kind is None:  # no RoPE, or transformers 4.x (rope_scaling), where setting rope_parameters does nothing
        raise FtuneError("method=longlora: the model config has no rope_parameters to interpolate",
                         hint="Use a RoPE model with transformers >= 5, or method.context_factor=1.")
    if kind not in ("default", "linear"):
        raise FtuneError(f"method=longlora: this model's RoPE ({kind}) cannot take linear position interpolation",
                         hint="Use a model with plain RoPE, or method.context_factor=1.")
    params.update({"rope_type": "linear", "factor": float(factor) * float(params.get("factor", 1.0))})
    config.rope_parameters = params
    config.max_position_embeddings = int(config.max_position_embeddings * factor)
    for parent in model.modules():
        for child, module in list(parent.named_children()):
            if type(module).__name__.endswith("RotaryEmbedding"):
                setattr(parent, child, type(module)(config=config).to(module.inv_freq.device))


ROPE_NOTE = "ftune_longlora.json"
README_HEADING = "## LongLoRA: load the base with its RoPE scaling"
LOAD_EXAMPLE = """```python
import json
from peft import PeftModel
from transformers import AutoModelForCausalLM

note = json.load(open("<this folder>/ftune_longlora.json"))
base = AutoModelForCausalLM.from_pretrained("<base model>", rope_parameters=note["rope_parameters"],
                                            max_position_embeddings=note["max_position_embeddings"])
model = PeftModel.from_pretrained(base, "<this folder>")
```"""


def save_rope_note(model: Any, folder: Path, method: Any) -> None:
    """A peft folder holds the adapter, not the base config that training changed: record the
    RoPE scaling beside it (ftune_longlora.json, and how to use it in README.md)."""
    if method.context_factor == 1:  # the base config is unchanged
        return
    config = model.config
    note = {"format": "ftune-longlora-v1", "context_factor": float(method.context_factor),
            "rope_parameters": _rope(config), "max_position_embeddings": config.max_position_embeddings,
            "note": "Trained with linear RoPE interpolation: load the base model with these rope_parameters and "
                    "max_position_embeddings before attaching the adapter, or it computes different outputs. "
                    "ftune does this itself; `ftune merge` writes them into the merged model's config.json."}
    (folder / ROPE_NOTE).write_text(json.dumps(note, indent=2))
    readme = folder / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    if README_HEADING not in text:  # peft keeps what the card already holds when it saves again
        readme.write_text(f"{text.rstrip()}\n\n{README_HEADING}\n\nTrained at {method.context_factor:g}x the base "
                          "model's context with linear RoPE interpolation, which a peft adapter does not carry. "
                          f"Load the base with the scaling in `{ROPE_NOTE}` (transformers >= 5):\n\n{LOAD_EXAMPLE}\n")


def restore_rope(base_model: Any, folder: Path) -> None:
    """Give a freshly loaded base the RoPE scaling a LongLoRA adapter in `folder` was trained
    with (nothing without ftune_longlora.json); refuse when this base cannot reproduce it."""
    path = Path(folder) / ROPE_NOTE
    if not path.is_file():
        return
    note = json.loads(path.read_text())
    scale_rope(base_model, note["context_factor"])
    got = {"rope_parameters": _rope(base_model.config),
           "max_position_embeddings": base_model.config.max_position_embeddings}
    want = {key: note[key] for key in got}
    if got != want:
        raise FtuneError(f"{folder}: this base model cannot reproduce the RoPE scaling the adapter was trained with",
                         [f"trained with {want}", f"this base scaled gives {got}"],
                         "Load the adapter on the base model it was trained from.")


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


register(MethodSpec(LongLoraConfig, apply_longlora, save_extra=save_rope_note, prepare_base=restore_rope))
