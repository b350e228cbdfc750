"""A model's shape (layers, widths, parameter counts) read from its config, and the parameters a
method trains, for the memory estimate."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftune.errors import FtuneError
from ftune.methods import Setup, apply, spec_of
from ftune.models.load import resolve_model_path
from ftune.models.runs import is_run_dir, run_config


@dataclass
class Shape:
    """What the estimate needs from a model's config.json."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    total_params: int
    linear_params: int  # parameters in the decoder layers' linear weights (what 4-bit quantises)


def shape_from_config(config: dict) -> Shape:
    text = config.get("text_config", config)
    h, layers, inter = text["hidden_size"], text["num_hidden_layers"], text["intermediate_size"]
    heads = text["num_attention_heads"]
    kv = text.get("num_key_value_heads") or heads
    hd = text.get("head_dim") or h // heads
    vocab = text["vocab_size"]
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    attn = h * heads * hd * 2 + h * kv * hd * 2
    bias = (heads + 2 * kv) * hd if text.get("attention_bias") or config.get("model_type") == "qwen2" else 0
    linear = layers * (attn + 3 * h * inter)
    total = vocab * h * (1 if tied else 2) + linear + layers * (2 * h + bias) + h
    return Shape(vocab, h, layers, inter, heads, kv, hd, tied, total, linear)


# The shipped model configs' shapes (their public config.json values), so `ftune plan` works offline
# before a multi-GB download.
KNOWN = {
    "meta-llama/Llama-2-7b-hf": dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                                     num_attention_heads=32, num_key_value_heads=32),
    "meta-llama/Llama-3.1-8B-Instruct": dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
                                             intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "mistralai/Mistral-7B-Instruct-v0.3": dict(vocab_size=32768, hidden_size=4096, num_hidden_layers=32,
                                               intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "Qwen/Qwen2.5-7B-Instruct": dict(vocab_size=152064, hidden_size=3584, num_hidden_layers=28, intermediate_size=18944,
                                     num_attention_heads=28, num_key_value_heads=4, model_type="qwen2"),
}


def model_shape(cfg: Any) -> Shape:
    """The model's shape from its config.json (a local folder, a converted GGUF, or the HF cache)."""
    path = cfg.model.path
    if is_run_dir(path):
        return model_shape(run_config(Path(path)))
    resolved = Path(resolve_model_path(cfg.model))
    if (resolved / "config.json").is_file():
        try:
            return shape_from_config(json.loads((resolved / "config.json").read_text()))
        except (KeyError, TypeError, ValueError) as exc:  # the loader reports a broken model properly
            raise FtuneError(f"{resolved / 'config.json'} lacks the model's shape ({type(exc).__name__}: {exc})") from None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(str(cfg.model.path), "config.json")  # never touches the network
    if isinstance(cached, str):
        return shape_from_config(json.loads(Path(cached).read_text()))
    if cfg.model.path in KNOWN:
        return shape_from_config(KNOWN[cfg.model.path])
    raise FtuneError(f"memory preflight: the config of {cfg.model.path} is not on this machine",
                     hint="Download the model first (its config.json is enough), or skip the check with --force.")


def trainable_params(cfg: Any, shape: Shape) -> int:
    """Parameters the method trains: counted exactly by building the method on an empty (meta)
    model; a rank-based formula when the method cannot be built that way."""
    try:
        return _meta_count(cfg)
    except Exception:
        pass
    m = cfg.method
    r = getattr(m, "r", 16)
    per_layer_linear = 2 * (shape.hidden + shape.heads * shape.head_dim) + 2 * (shape.hidden + shape.kv_heads * shape.head_dim) \
        + 3 * (shape.hidden + shape.intermediate)
    if m.trains_every_weight:
        return shape.total_params
    return r * per_layer_linear * shape.layers


def _meta_count(cfg: Any) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM


    config = AutoConfig.from_pretrained(resolve_model_path(cfg.model), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        meta_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantization="none"))
        if cfg.method.counted_as:  # e.g. QLoRA: LoRA's adapter; its 4-bit base is counted with the weights

            schema = spec_of(cfg.method.counted_as).schema
            fields = {f.name for f in dataclasses.fields(schema)}
            lora = schema(**{k: v for k, v in vars(cfg.method).items() if k in fields and k != "name"})
            meta_cfg = dataclasses.replace(meta_cfg, method=lora)
        model = apply(model, meta_cfg, Setup(total_steps=1, model_path=str(cfg.model.path)))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
