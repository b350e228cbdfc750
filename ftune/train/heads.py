"""A scalar head on a causal LM: the reward model (stage rm) and PPO's value head (stage ppo).

The head is one linear layer on the last hidden state. It wraps the model after the method is
applied, so the trunk may carry any adapter (LoRA, …) or be fully trained, and the adapter can
still be disabled through the wrapper (PPO's free reference model). Hidden states come from the
transformer body, not the LM head: a reward model never pays for the vocabulary projection.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

HEAD_FILE = "scalar_head.safetensors"
HEAD_META = "scalar_head.json"
# Soft-prompt methods add virtual tokens inside PeftModel.forward, so their hidden states must come
# through the full forward (output_hidden_states) rather than the bare body.
PROMPT_LEARNING = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


def _prompt_learning(model: Any) -> bool:
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    return config is not None and str(getattr(config, "peft_type", "")).split(".")[-1] in PROMPT_LEARNING


def hidden_size(model: Any) -> int:
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return int(config.hidden_size)


def last_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final-layer hidden states (after the last norm), one per input position."""
    if _prompt_learning(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        return out.hidden_states[-1][:, -input_ids.shape[1]:]
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, inner.base_model_prefix)
    return body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False).last_hidden_state


class WithScalarHead(torch.nn.Module):
    """`lm` (the trained model, possibly a PeftModel) + a linear head giving one scalar per token."""

    def __init__(self, lm: Any, init_std: float = 0.0, trunk_grad: bool = True):
        super().__init__()
        self.lm = lm
        self.trunk_grad = trunk_grad
        """False: head="with_logits" values do not backpropagate into the LM (PPO's separate critic)."""
        param = next(lm.parameters())
        self.head = torch.nn.Linear(hidden_size(lm), 1, device=param.device, dtype=torch.float32)
        # A zero head starts every score at 0: a reward model starts at chance with no bias, and
        # PPO's critic starts predicting "no reward" instead of noise.
        torch.nn.init.normal_(self.head.weight, std=init_std) if init_std else torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One scalar per position, shape (batch, seq), in fp32."""
        hidden = last_hidden(self.lm, input_ids, attention_mask, position_ids)
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, head: str | None = None, **kwargs: Any) -> Any:
        """head=None: the LM's own output (logits); head="only": per-token scores, shape (batch, seq),
        without the LM head (reward model); head="with_logits": (logits, per-token values) from
        one forward (PPO's policy and value). Going through forward keeps DDP's gradient sync."""
        if head == "only":
            return self.scores(input_ids, attention_mask, position_ids)
        if head == "with_logits":
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          output_hidden_states=True, use_cache=False)
            hidden = out.hidden_states[-1][:, -input_ids.shape[1]:]
            hidden = hidden if self.trunk_grad else hidden.detach()
            values = self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()
            return out.logits[:, -input_ids.shape[1]:], values
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        with self.lm.disable_adapter():
            yield

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.lm.generate(*args, **kwargs)


def unwrap_head(model: Any) -> Any:
    """The model the method built (without the stage's scalar head)."""
    return model.lm if isinstance(model, WithScalarHead) else model


def last_token_scores(per_token: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The score at each row's last real token (rows are right-padded)."""
    last = attention_mask.sum(-1).clamp(min=1) - 1
    return per_token.gather(1, last.unsqueeze(1)).squeeze(1)


def save_head(head: torch.nn.Linear, folder: Path, kind: str, state: dict | None = None) -> None:
    """`state`: the head's whole tensors when they were gathered from shards (several processes)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = state or {"weight": head.weight.detach(), "bias": head.bias.detach()}
    save_file({k: state[k].float().cpu().contiguous() for k in ("weight", "bias")}, str(folder / HEAD_FILE))
    (folder / HEAD_META).write_text(json.dumps({"kind": kind, "hidden_size": head.in_features}, indent=2))


def load_head(model: WithScalarHead, folder: Path) -> None:
    tensors = load_file(str(folder / HEAD_FILE))
    with torch.no_grad():
        model.head.weight.copy_(tensors["weight"])
        model.head.bias.copy_(tensors["bias"])
