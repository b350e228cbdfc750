"""Base model + tokenizer from a hub id, a local folder or a .gguf file.

A .gguf base is converted once into a plain safetensors folder in ftune's cache. transformers
loads GGUF by dequantising it but still marks the model as quantised (config.quantization_config,
hf_quantizer), which makes saving, merging and peft misbehave; a plain folder has none of that,
and later runs skip the ~20 s dequantisation. Every other path goes straight to from_pretrained.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ftune import resources, safety
from ftune.config.schema import FtuneConfig, ModelConfig
from ftune.errors import FtuneError
from ftune.models.runs import is_run_dir
from ftune.runtime import PRECISION_DTYPES, attention_impl, weight_dtype


def gguf_to_folder(gguf: Path) -> Path:
    """Dequantise a .gguf file once into <cache>/models/<stem>-<hash>/ (safetensors + tokenizer)."""
    st = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = resources.cache_dir() / "models" / f"{gguf.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Drop the GGUF "quantisation" marks: the weights are already plain float tensors.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = gguf.stem
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(cfg: ModelConfig) -> str:
    """A local folder or hub id that from_pretrained understands."""
    path = Path(os.path.expanduser(resources.resolve_path(cfg.path)))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FtuneError(f"model.path: {path} does not exist")
        return str(gguf_to_folder(path))
    safety.refuse_pickle(path, "model.path", cfg.allow_pickle)
    return str(path) if path.exists() else cfg.path


def quantization_config(cfg: FtuneConfig) -> Any:
    if cfg.model.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise FtuneError(f"model.quantization={cfg.model.quantization} needs bitsandbytes",
                         hint="pip install 'ftune[quant]' (bitsandbytes) on a CUDA machine.") from None
    if cfg.model.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.model.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=cfg.model.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=PRECISION_DTYPES[cfg.hardware.precision])


def load_tokenizer(path: str, cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    if cfg.trust_remote_code:

        safety.note_remote_code(Console(stderr=True), path)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:  # labels mask padding, so sharing a special token is safe
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _device_map_target(device: torch.device) -> str | int:
    return "cpu" if device.type == "cpu" else (device.index or 0)


def load(cfg: FtuneConfig, device: torch.device) -> tuple[Any, Any]:
    """(model, tokenizer) of a hub id, model folder or .gguf file, the model on `device`, in eval
    mode until the trainer starts. A run directory is ftune.methods.runs.load_model's."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg.model)
    if is_run_dir(path):
        raise FtuneError(f"model.path: {path} is a run directory; it loads through ftune.methods.runs.load_model")
    quant = quantization_config(cfg)
    try:
        tokenizer = load_tokenizer(path, cfg.model)
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=cfg.model.revision, dtype=weight_dtype(cfg), trust_remote_code=cfg.model.trust_remote_code,
            attn_implementation=attention_impl(cfg.model, device, cfg.hardware), quantization_config=quant,
            device_map={"": _device_map_target(device)} if quant is not None else None,
            use_safetensors=None if cfg.model.allow_pickle else True)
    except FtuneError:
        raise
    except Exception as exc:  # missing files, corrupt safetensors, unknown architectures: all the input's
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise FtuneError(f"model.path: could not load '{cfg.model.path}'", [f"{type(exc).__name__}: {first}"],
                         "Give a complete Hugging Face model folder (config.json, tokenizer, *.safetensors), a "
                         ".gguf file, or a hub id that is cached or reachable.") from None
    if quant is None:
        model.to(device)
    if cfg.hardware.liger:
        apply_liger(model, device)
    model.config.use_cache = False  # training never reuses the KV cache
    return model, tokenizer


def apply_liger(model: Any, device: torch.device) -> None:
    """Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) on this model."""
    if device.type != "cuda":
        raise FtuneError("hardware.liger=true needs a CUDA GPU (Liger kernels are Triton kernels)")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise FtuneError("hardware.liger=true, but liger-kernel is not installed",
                         hint="pip install liger-kernel, or set hardware.liger=false") from None
    _apply_liger_kernel_to_instance(model=model)
