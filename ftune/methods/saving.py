"""Saving what a method trained, and loading it back onto a base model.

- peft methods: the standard peft folder (PeftModel.from_pretrained loads it without ftune).
- methods that save a full model (the schema's saves_full_model): a complete Hugging Face folder.
- ftune's own methods: `ftune_adapter.json` (the method config and base model) +
  `adapter.safetensors` (the trained tensors); `load_trained` rebuilds the method on a base model
  and loads them.
A method adds its own files through its spec (save_extra) and adjusts a base before its adapter
loads (prepare_base, rebuild).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from safetensors.torch import load_file, save_file

from ftune import safety
from ftune.errors import FtuneError
from ftune.methods.base import SPECS, Setup, is_peft, spec_of

FORMAT = "ftune-adapter-v1"


def save_trained(model: Any, tokenizer: Any, method: Any, base_path: str, out: Path,
                 state_dict: dict | None = None) -> Path:
    """`state_dict`: whole tensors gathered from shards (FSDP); None reads them from the model."""
    spec = spec_of(method)
    if is_peft(model) or method.saves_full_model:
        model.save_pretrained(out, **({"state_dict": state_dict} if state_dict is not None else {}))
    else:
        state, saved_method = native_state(model, method, state_dict)
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "adapter.safetensors"))
        meta = {"format": FORMAT, "method": dataclasses.asdict(saved_method), "base_model": base_path}
        (out / "ftune_adapter.json").write_text(json.dumps(meta, indent=2))
    if spec.save_extra is not None:
        spec.save_extra(model, out, method)
    tokenizer.save_pretrained(out)
    return out


def native_state(model: Any, method: Any, state_dict: dict | None = None) -> tuple[dict, Any]:
    """Tensors to save and the method config that rebuilds them (the spec may cut them)."""
    if state_dict is not None:
        state = {n: t.contiguous() for n, t in state_dict.items()}
    else:
        state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    spec = spec_of(method)
    return spec.saved_state(state, method) if spec.saved_state is not None else (state, method)


def attach_trained(base_model: Any, folder: Path, method: Any, allow_pickle: bool = False,
                   trainable: bool = False) -> Any:
    """A saved adapter (ftune-native or peft) of `method` on a freshly loaded base model. A damaged
    or incomplete folder is an FtuneError naming it, not a library traceback."""
    folder = Path(folder)
    safety.refuse_pickle(folder, f"adapter {folder}", allow_pickle)
    native = (folder / "ftune_adapter.json").is_file()
    if not native and not (folder / "adapter_config.json").is_file():
        raise FtuneError(f"{folder}: no adapter here (neither ftune_adapter.json nor adapter_config.json)",
                         hint="The run did not finish saving; resume it (train.resume=true) or train it again.")
    try:
        if native:
            return load_trained(base_model, folder)
        from peft import PeftModel

        spec = spec_of(method)
        if spec.prepare_base is not None:  # e.g. the RoPE scaling the adapter was trained with
            spec.prepare_base(base_model, folder)
        return PeftModel.from_pretrained(base_model, folder, is_trainable=trainable)
    except FtuneError:
        raise
    except Exception as exc:  # safetensors/json/peft errors all mean the folder is damaged
        raise FtuneError(f"{folder}: the saved adapter could not be read ({type(exc).__name__})",
                         [str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__],
                         "The folder is damaged or incomplete; resume the run (train.resume=true) or train it "
                         "again.") from None


def load_trained(base_model: Any, folder: Path) -> Any:
    """Apply an ftune-native adapter folder to a freshly loaded base model."""
    meta = json.loads((Path(folder) / "ftune_adapter.json").read_text())
    if meta.get("format") != FORMAT:
        raise FtuneError(f"{folder}: not an ftune adapter folder (format {meta.get('format')})")
    spec = SPECS.get(meta["method"]["name"], key=f"{folder}/ftune_adapter.json: method.name")
    method = spec.schema(**meta["method"])
    if spec.rebuild is not None:  # e.g. the quantised groups training saved, not a new quantisation
        model = spec.rebuild(base_model, method, Path(folder))
    else:
        model = spec.apply(base_model, SimpleNamespace(method=method), Setup(total_steps=1, model_path=meta["base_model"]))
    tensors = load_file(str(Path(folder) / "adapter.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise FtuneError(f"{folder}: {len(missing)} saved tensors do not match the base model", [missing[0]])
    for name, tensor in tensors.items():
        params[name].data.copy_(tensor)
    return model
