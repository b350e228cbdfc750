"""Runtime decisions, made in one place and read by train, plan, eval, export and serve: the
device, the process count, dtypes, the attention implementation, whether a run compiles, and where
a model's decoder layers are. The memory estimate (plan) and the run call the same functions, so
they cannot disagree.

This layer sits just below config: it reads a composed config by its fields (no config import), so
config's validation can use it too.
"""

from __future__ import annotations

import shutil
from typing import Any

import torch

from ftune.errors import FtuneError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_CHUNK = 4096  # target positions per logits chunk (stages pt/sft): 4096 x 150k-vocab fp32 logits = 2.4 GB
AUTO_MIN_STEPS = 200  # compile=auto: the one-time compile (~35 s on 2 cores) pays back after ~130 steps


def tristate(value: Any) -> str:
    """auto | true | false (or a number, kept as its text) from a YAML or command-line value:
    `true` arrives as the bool True or the string "True"."""
    return str(value).strip().lower()


# ----------------------------------------------------------------------------- processes, device
def processes_per_node(hw: Any) -> int:
    """hardware.num_processes, or 0: one per visible GPU (at least one)."""
    if hw.num_processes > 0:
        return hw.num_processes
    return max(1, torch.cuda.device_count()) if hw.device != "cpu" else 1


def world_size(cfg: Any) -> int:
    """Processes of the whole run."""
    return processes_per_node(cfg.hardware) * max(1, cfg.hardware.num_nodes)


def cuda_wanted(hw: Any) -> bool:
    return hw.device == "cuda" or (hw.device == "auto" and torch.cuda.is_available())


def pick_device(cfg: Any) -> torch.device:
    if cuda_wanted(cfg.hardware):
        if not torch.cuda.is_available():
            raise FtuneError("hardware.device=cuda, but torch sees no CUDA GPU",
                             hint="Use hardware=cpu, or install a CUDA build of torch on a GPU machine.")
        return torch.device("cuda")
    return torch.device("cpu")


# ----------------------------------------------------------------------------- dtypes
def weight_dtype(cfg: Any) -> torch.dtype:
    """auto: a frozen base in the training precision; a method that trains base weights keeps them
    in fp32 (master weights: AdamW on bf16 weights loses small updates)."""
    if cfg.model.dtype != "auto":
        return DTYPES[cfg.model.dtype]
    if cfg.method.trains_base:
        return torch.float32
    return PRECISION_DTYPES[cfg.hardware.precision]


# ----------------------------------------------------------------------------- attention, compile
def attention_impl(model_cfg: Any, device: torch.device, hardware: Any = None) -> str:
    """The implementation a model loads with: the model's setting, else the hardware profile's,
    else flash-attention 2 on CUDA when installed, else SDPA."""
    if model_cfg.attn_implementation != "auto":
        return model_cfg.attn_implementation
    if hardware is not None and hardware.attn_implementation != "auto":
        return hardware.attn_implementation
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def compiler_missing(device: torch.device) -> str | None:
    """Why torch.compile cannot build kernels here, or None when it can."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed (pip install triton)"
        return None
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "no C++ compiler on PATH (inductor builds CPU kernels with g++ or clang++)"
    return None


def compiles(hw: Any, steps: int | None, device: torch.device) -> tuple[bool, str | None]:
    """(compile the decoder layers?, a note for the user) from hardware.compile = auto | true | false.
    steps: the run's optimiser steps; None when not known yet (a plan before the data is read),
    which counts as long enough (the estimate stays on the safe side)."""
    mode = tristate(hw.compile)
    if mode == "false":
        return False, None
    missing = compiler_missing(device)
    if mode == "true":
        if missing:
            raise FtuneError("hardware.compile=true, but torch.compile cannot run here", [missing],
                             "Install the compiler, or set hardware.compile=auto (compiles only when it can) "
                             "or false.")
        return True, None
    if hw.strategy in ("fsdp", "deepspeed") or missing or (steps is not None and steps < AUTO_MIN_STEPS):
        return False, None
    return True, f"hardware.compile=auto: compiling the decoder layers ({steps} steps); set false to skip"


def compiled_attention(cfg: Any, device: torch.device) -> str | None:
    """The attention implementation a compiled CPU run switches to, or None to keep the loaded one.

    Compiled, the plain matmul-softmax-matmul attention beats the CPU flash-attention kernel
    (whose backward is the largest non-matmul cost of the step): inductor fuses the mask, softmax
    and casts around two batched matmuls. Measured on the default workload (packed 2x256, bf16,
    compiled): 1.13x tokens/s. Only when neither model nor hardware names an implementation."""
    if device.type != "cpu" or cfg.model.attn_implementation != "auto" or cfg.hardware.attn_implementation != "auto":
        return None
    return "eager"


def training_attention(cfg: Any, device: torch.device, steps: int | None) -> tuple[str, bool]:
    """(attention implementation of the training forward, compiled?): what the run uses and the
    memory estimate assumes."""
    compiled, _ = compiles(cfg.hardware, steps, device)
    switched = compiled_attention(cfg, device) if compiled else None
    return switched or attention_impl(cfg.model, device, cfg.hardware), compiled


# ----------------------------------------------------------------------------- model structure
def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The stack of decoder blocks: the ModuleList as long as config.num_hidden_layers, else the
    modules whose class name ends in DecoderLayer or Block ([] when none is found)."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    for module in model.modules():
        if n and isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return list(module)
    return [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))
            and any(p.numel() for p in m.parameters())]
