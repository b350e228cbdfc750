"""Saving what a method trained, and loading it back onto a base model.

- peft methods: the standard peft folder (PeftModel.from_pretrained loads it without ftune).
- full and freeze: a complete Hugging Face model folder.
- ftune's own methods (bitfit, adapter, dylora): `ftune_adapter.json` (the method config and
  base model) + `adapter.safetensors` (the trained tensors); `load_trained` re-applies the method
  to a base model and loads them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from safetensors.torch import load_file, save_file

from ftune.config.schema import SCHEMAS
from ftune.errors import FtuneError
from ftune.methods import Setup, apply, is_peft

FULL_MODEL_METHODS = ("full", "freeze")
FORMAT = "ftune-adapter-v1"


def output_name(method: str) -> str:
    return "model" if method in FULL_MODEL_METHODS else "adapter"


def save_trained(model: Any, tokenizer: Any, method: Any, base_path: str, out: Path,
                 state_dict: dict | None = None) -> Path:
    """`state_dict`: whole tensors gathered from shards (FSDP); None reads them from the model."""
    if is_peft(model) or method.name in FULL_MODEL_METHODS:
        model.save_pretrained(out, **({"state_dict": state_dict} if state_dict is not None else {}))
    else:
        state, saved_method = native_state(model, method, state_dict)
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "adapter.safetensors"))
        meta = {"format": FORMAT, "method": dataclasses.asdict(saved_method), "base_model": base_path}
        (out / "ftune_adapter.json").write_text(json.dumps(meta, indent=2))
    tokenizer.save_pretrained(out)
    return out


def native_state(model: Any, method: Any, state_dict: dict | None = None) -> tuple[dict, Any]:
    """Tensors to save and the method config that rebuilds them (DyLoRA: cut to save_rank)."""
    if method.name == "dylora" and method.save_rank and method.save_rank != method.r:
        from ftune.methods.dylora import truncated_state

        return truncated_state(model, method.save_rank), dataclasses.replace(method, r=method.save_rank)
    if state_dict is not None:
        return {n: t.contiguous() for n, t in state_dict.items()}, method
    state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return state, method


def load_trained(base_model: Any, folder: Path) -> Any:
    """Apply an ftune-native adapter folder to a freshly loaded base model."""
    meta = json.loads((Path(folder) / "ftune_adapter.json").read_text())
    if meta.get("format") != FORMAT:
        raise FtuneError(f"{folder}: not an ftune adapter folder (format {meta.get('format')})")
    method = SCHEMAS["method"][meta["method"]["name"]](**meta["method"])
    model = apply(base_model, SimpleNamespace(method=method), Setup(total_steps=1, model_path=meta["base_model"]))
    tensors = load_file(str(Path(folder) / "adapter.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise FtuneError(f"{folder}: {len(missing)} saved tensors do not match the base model", [missing[0]])
    for name, tensor in tensors.items():
        params[name].data.copy_(tensor)
    return model
