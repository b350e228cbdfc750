"""`ftune merge`: a trained run -> a standard Hugging Face model folder.

The run's base is loaded in float32 (so folding the update in loses nothing), its method is merged
(ftune.methods.merge: LoRA family, IA3, VeRA, DyLoRA, QA-LoRA, BitFit, full), quantised layers are
turned back into plain linear layers (QLoRA's 4-bit base is dequantised before the adapter is
folded in; QA-LoRA's merged INT4 groups are dequantised), and the result is cast to the chosen
dtype and saved with safetensors, the tokenizer and its chat template, and a generation config
whose EOS includes the template's end-of-turn token. The folder is written under a temporary name
and renamed, so an interrupted merge never leaves a half-written model behind. QA-LoRA's groups are
the ones its training saved with the adapter, not a re-quantisation of the float32 base (which
would move codes that a bf16 run fitted to the bf16-rounded weights). A 4-bit QA-LoRA run
also keeps its merged groups (codes, scales, zero-points) in `ftune_qalora/groups.safetensors`, so
export-gguf can write them as q4_1 blocks exactly instead of re-quantising the dequantised weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ftune.data.jinja import to_jinja
from ftune.data.templates import load_template, stop_token_ids
from ftune.errors import FtuneError
from ftune.methods import spec_of
from ftune.methods.merge import merge
from ftune.methods.qalora import GroupQuantLinear
from ftune.methods.runs import load_model
from ftune.methods.saving import attach_trained
from ftune.models.runs import run_config, trained_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
# Not model weights: transformers loads only model.safetensors (or the files its index names) and
# our GGUF writer skips this file by name. Tools that load every *.safetensors in a folder would not.
# In a subfolder: tools that load every top-level *.safetensors of a model folder as weights
# (vLLM without an index file, for one) must not see it.
QALORA_GROUPS = "ftune_qalora/groups.safetensors"


def default_name(cfg: Any, dtype: str) -> str:
    """<base>-<method>-<stage>-<dtype>, e.g. smollm2-135m-lora-sft-bf16."""
    return f"{cfg.model.name}-{cfg.method.name}-{cfg.stage.name}-{SHORT[dtype]}"


def dequantize_linears(model: Any, dtype: torch.dtype) -> int:
    """Replace bitsandbytes 4/8-bit layers and QA-LoRA group-quantised layers by nn.Linear."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            weight = _dense_weight(child)
            if weight is None:
                continue
            bias = getattr(child, "bias", None)
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype,
                                     device=weight.device)
            with torch.no_grad():
                linear.weight.copy_(weight.to(dtype))
                if bias is not None:
                    linear.bias.copy_(bias.detach().to(dtype))
            setattr(parent, name, linear)
            replaced += 1
    return replaced


def _dense_weight(module: Any) -> torch.Tensor | None:
    if isinstance(module, GroupQuantLinear):
        return module.weight_dequantized().detach()
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).detach()
    if isinstance(module, bnb.nn.Linear8bitLt):
        state = module.state
        scale = state.SCB if state.SCB is not None else module.weight.SCB
        return (module.weight.data.float() * scale.float().unsqueeze(1) / 127).detach()
    return None


def merged_model(run_dir: Path, dtype: str) -> tuple[Any, Any, Any, tuple[dict[str, torch.Tensor], int]]:
    """(plain transformers model in `dtype`, tokenizer, the run's config, (QA-LoRA groups, group size)).

    The groups are only kept for 4-bit QA-LoRA, the one case a GGUF type (q4_1) holds them exactly."""
    saved = run_config(run_dir)
    folder = trained_folder(run_dir, saved)
    model_cfg = dataclasses.replace(saved.model, dtype="float32")
    if saved.method.saves_full_model:
        model_cfg = dataclasses.replace(model_cfg, path=str(folder))
    model, tokenizer = load_model(dataclasses.replace(saved, model=model_cfg), torch.device("cpu"))
    # QLoRA/8-bit bases: back to dense float32 before the adapter is folded in.
    dequantize_linears(model, torch.float32)
    if not saved.method.saves_full_model:
        model = attach_trained(model, folder, saved.method, saved.model.allow_pickle)
        model = merge(model, saved.method)
    spec = spec_of(saved.method)
    groups = spec.merged_groups(model, saved.method) if spec.merged_groups is not None else ({}, 0)
    dequantize_linears(model, torch.float32)  # QA-LoRA merges into its INT4 groups
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer, model.is_quantized = None, False
    for attr in ("quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if attr in vars(model):
            delattr(model, attr)
    return model.to(DTYPES[dtype]), tokenizer, saved, groups


def merge_run(run_dir: str | Path, out: str | Path | None = None, dtype: str = "bfloat16",
              overwrite: bool = False) -> Path:
    """Merge a finished run into a Hugging Face folder; returns the folder."""
    run_dir = Path(run_dir)
    if dtype not in DTYPES:
        raise FtuneError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    model, tokenizer, saved, (groups, group_size) = merged_model(run_dir, dtype)
    target = Path(out) if out else Path("merged") / default_name(saved, dtype)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FtuneError(f"out: {target} exists and is not empty", hint="Pick another out=, or add --overwrite.")
    model.config.name_or_path = target.name
    gen = model.generation_config

    stops = stop_token_ids(tokenizer, saved.dataset.template)
    gen.eos_token_id = stops[0] if len(stops) == 1 else stops
    gen.pad_token_id = tokenizer.pad_token_id
    template = load_template(saved.dataset.template)
    if template is not None:  # the merged model's chat template is the format it was trained on
        tokenizer.chat_template = to_jinja(template, tokenizer)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    meta = {"run": str(run_dir), "base_model": saved.model.path, "method": saved.method.name,
            "stage": saved.stage.name, "dtype": dtype, "template": saved.dataset.template}
    if groups:

        (tmp / QALORA_GROUPS).parent.mkdir()
        save_file(groups, str(tmp / QALORA_GROUPS))
        meta["qalora_group_size"] = group_size
    (tmp / "ftune_merge.json").write_text(json.dumps(meta, indent=2))
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return target
