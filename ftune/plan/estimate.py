"""Memory preflight: will the composed recipe fit, before anything loads? (`ftune plan`, and the
check `ftune train` runs first.)

Per device, in bytes:
- weights: frozen parameters in their storage dtype (bf16/fp16 2 B, fp32 4 B; bitsandbytes 4-bit
  ~0.56 B for quantised linear weights with double quantisation, 8-bit 1 B), trainable parameters as
  fp32 master weights (4 B);
- gradients of trainable parameters (4 B) and AdamW state (8 B; 8-bit AdamW 2 B);
- activations kept for the backward pass, per token and layer: the norm outputs, query, attention
  output, keys/values and the four MLP tensors in the autocast dtype, the two RMSNorm inputs in
  fp32 (counted with saved-tensor hooks; layout after Korthikanti et al. 2022, "Reducing
  Activation Recomputation", Sec. 4, for SwiGLU and grouped-query attention); eager attention adds
  its probabilities, CPU SDPA its mask. N recomputed layers (gradient checkpointing) keep only
  their input; `auto` picks N (resolve_checkpointing);
- logits: one chunk of target positions (stages pt/sft: the head runs only where a loss is
  taken), or all positions with their fp32 copy and gradient for other stages;
- 16-bit copies autocast keeps of fp32 trained weights;
- sharding: fsdp divides weights, gradients and optimiser state by the process count; DeepSpeed
  ZeRO-2 divides gradients and optimiser state, ZeRO-3 all three; offload moves them to CPU RAM;
- runtime: the framework itself (CUDA context and allocator slack on GPUs; the Python process with
  torch/transformers loaded on CPU), a constant measured on this project's runs.
- heap fragmentation (CPU): glibc's heap beyond the live tensors, fitted: on a 4/8-bit base, and
  for unpacked rows, whose micro-batches change shape all the time.

Activation and runtime terms are calibrated against measured peak memory (docs/memory.md,
scripts/memory_calibration.py); the formulas and their sources are kept here and in that doc.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftune.errors import FtuneError
from ftune.models.load import resolve_model_path
from ftune.models.runs import is_run_dir
from ftune.plan.shape import Shape, model_shape, trainable_params
from ftune.runtime import AUTO_MIN_STEPS, cuda_wanted, training_attention, tristate, weight_dtype, world_size
from ftune.runtime import HEAD_CHUNK as CHUNK

GIB = 2 ** 30


# Measured (docs/memory.md): peak RSS of a CPU training run of the tiny model, where weights,
# activations and logits are negligible — Python, torch, transformers, peft, accelerate, data.
CPU_RUNTIME = 0.53 * GIB


# CPU runs on a bitsandbytes-quantised base: glibc's heap grows beyond the live tensors over the
# first ~5 steps and then holds (with every block from 64 KiB mmapped it does not grow, so it is
# the heap's free gaps, not tensors; likely left by the dequantisation temporaries between the
# saved activations). Fitted on SmolLM2 QLoRA, 10 steps, 4 / 2 / 8 rows of 256: the peak exceeded
# the counted terms by 0.53 / 0.67 / 0.37 times the activations (docs/memory.md). A 16-bit base
# grows by little, inside its calibration.
CPU_QUANT_FRAGMENTATION = 0.5


# CPU runs of unpacked rows (dataset.packing=false, padded or padding-free): every micro-batch has
# another shape, and the heap keeps growing as new shapes leave their free gaps behind (it does
# not shrink back between steps). Measured on SmolLM2 LoRA, rows of 150-500 tokens, micro-batch
# 4 x 2, seq 512, padding-free: the estimate of the live tensors was 2.76 GiB; resident memory was
# 2.9 GiB after step 1, 3.97 after step 20 and 4.54 at step 30, still rising slowly (the held-out
# passes add shapes too). Counted as once more the micro-batch's activations, attention and
# logits (4.65 GiB for that run), the safe side of the growth seen; fixed-shape (packed) rows
# stay inside their calibration without it.
CPU_VARIABLE_SHAPE_FRAGMENTATION = 1.0


# CUDA context + kernels (~0.5 GiB) and allocator fragmentation, a common rule of thumb.
CUDA_RUNTIME = 0.8 * GIB


# train.gradient_checkpointing=auto aims below this share of the device's memory: the estimate is
# within ~10% on the calibrated runs (docs/memory.md), and a run killed for memory costs more
# than a few recomputed layers.
AUTO_HEADROOM = 0.9


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Estimate:
    """Peak memory per device, by part (bytes), and what the device has."""

    parts: dict[str, float]
    device: str
    processes: int
    available: float
    cpu_offloaded: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.available <= 0 or self.total <= self.available


def checkpoint_mode(value: Any) -> str:
    """train.gradient_checkpointing as written: "false", "true", "auto" or a layer count ("12")."""
    return tristate(value)


def fixed_checkpointed_layers(value: Any, layers: int) -> int | None:
    """Decoder layers recomputed in the backward pass for false | true | N; None for auto."""
    mode = checkpoint_mode(value)
    if mode == "auto":
        return None
    if mode == "true":
        return layers
    if mode == "false":
        return 0
    return min(int(mode), layers)  # config checks admit only digits here


def estimate(cfg: Any, shape: Shape | None = None, trainable: int | None = None,
             checkpointed: int | None = None) -> Estimate:
    """Peak memory per process. checkpointed: decoder layers recomputed in the backward pass
    (default: what train.gradient_checkpointing fixes; none for auto, see resolve_checkpointing)."""
    shape = shape or model_shape(cfg)
    trainable = trainable_params(cfg, shape) if trainable is None else trainable
    hw, tr = cfg.hardware, cfg.train
    cuda, world, full = cuda_wanted(hw), world_size(cfg), cfg.method.trains_every_weight
    wbytes = DTYPE_BYTES.get(str(weight_dtype(cfg)).removeprefix("torch."), 4)
    # A 4/8-bit base (QLoRA): adapters over bitsandbytes weights, prepared by peft for kbit training.
    kbit = cfg.model.quantization in ("4bit", "8bit") and not full
    state, offloaded = _model_state(cfg, shape, trainable, world, wbytes, kbit)
    tokens = tr.micro_batch_size * cfg.dataset.max_seq_len  # one micro-batch: accumulation frees it
    abytes = 2 if hw.precision in ("bf16", "fp16") else 4
    attn = _attention(cfg, cuda)
    if checkpointed is None:
        checkpointed = fixed_checkpointed_layers(tr.gradient_checkpointing, shape.layers) or 0
    forward = _forward_state(cfg, shape, tokens, abytes, kbit, cuda, attn, checkpointed)
    # Autocast's 16-bit copies of the fp32 trained weights, kept for the backward pass (measured on
    # the full fine-tune; negligible for adapters). Sharded runs gather one layer at a time.
    sharded = hw.strategy in ("fsdp", "deepspeed") and world > 1
    casts = trainable * abytes if hw.precision in ("bf16", "fp16") and not sharded else 0.0
    parts = {**state, "16-bit weight copies": casts, **forward, "runtime": CUDA_RUNTIME if cuda else CPU_RUNTIME}
    acts, per_micro_batch = forward["activations"], sum(forward[k] for k in ("activations", "attention scores", "logits"))
    heap = heap_fragmentation(cfg, cuda, kbit, acts, per_micro_batch)
    if heap:
        parts["heap fragmentation"] = heap
    if not cuda:
        # A checkpoint converted while loading (fp32 file -> bf16 weights) is mapped in memory until
        # the model has loaded: the process's peak is the larger of loading and training, so only
        # the part of the file beyond the training-time terms adds to it (measured; docs/memory.md).
        training = sum(v for k, v in parts.items() if k not in ("weights", "runtime"))
        parts["loading"] = max(0.0, _conversion_bytes(cfg, wbytes, full) - training)
    available = hw.memory_gib * GIB if hw.memory_gib else _device_memory(cuda, world if not cuda else 1)
    est = Estimate(parts, "cuda" if cuda else "cpu", world, available, offloaded)
    label = attn
    if attn == "eager (compiled)" and tr.max_steps <= 0 and tristate(hw.compile) == "auto":
        # an epoch-sized run's step count is known only once its data is read: the larger case is counted
        label = f"eager (compiled; only if the run reaches {AUTO_MIN_STEPS} steps, else sdpa)"
    est.notes.append(f"{shape.total_params / 1e6:,.0f}M parameters, {trainable / 1e6:,.2f}M trained "
                     f"({cfg.method.name}), {tokens:,} tokens per micro-batch, attention {label}")
    return est


def _model_state(cfg: Any, shape: Shape, trainable: int, world: int, wbytes: int, kbit: bool
                 ) -> tuple[dict[str, float], float]:
    """(weights, fp32 trainable copies, gradients, optimiser state per process, bytes offloaded)."""
    hw = cfg.hardware
    frozen = 0 if cfg.method.trains_every_weight else shape.total_params
    if kbit:
        # prepare_model_for_kbit_training casts every weight it does not quantise (embeddings,
        # norms, an untied output layer) to fp32.
        per_weight = {"4bit": 0.5625, "8bit": 1.0}[cfg.model.quantization]
        weights = shape.linear_params * per_weight + (frozen - shape.linear_params) * 4
    else:
        weights = frozen * wbytes
    master = grads = trainable * 4
    optim = trainable * (2 if cfg.train.optim in ("adamw_8bit", "paged_adamw_8bit") else 8)
    offloaded = 0.0
    if hw.strategy == "fsdp" and world > 1:
        weights, master, grads, optim = weights / world, master / world, grads / world, optim / world
        if hw.cpu_offload:
            offloaded = weights + master + grads + optim
            weights = master = grads = optim = 0.0
    elif hw.strategy == "deepspeed" and world > 1:
        grads, optim = grads / world, optim / world
        if hw.zero_stage == 3:
            weights, master = weights / world, master / world
        if hw.offload_optimizer:
            offloaded += optim
            optim = 0.0
        if hw.offload_params:
            offloaded += weights + master
            weights = master = 0.0
    return {"weights": weights, "trainable (fp32)": master, "gradients": grads, "optimiser": optim}, offloaded


def _forward_state(cfg: Any, shape: Shape, tokens: int, abytes: int, kbit: bool, cuda: bool, attn: str,
                   checkpointed: int) -> dict[str, float]:
    """What one micro-batch keeps for its backward pass: activations, attention scores, logits and
    the layer rebuilt by recomputation."""
    # Bytes each layer keeps per token for the backward pass, counted with saved-tensor hooks on
    # SmolLM2 (docs/memory.md): in the compute dtype the two norm outputs, the query and the
    # attention output (4H), keys and values (2 kv), gate, up, their SiLU product and the
    # down-projection input (4I); in fp32 the two RMSNorm inputs (they normalise in fp32).
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    per_token_layer = abytes * (4 * h + 2 * kv + 4 * i) + 4 * 2 * h
    stream_bytes = abytes  # the residual stream, which a recomputed layer keeps
    if kbit:
        # QLoRA: peft's prepare_model_for_kbit_training keeps the norms in fp32, so the residual
        # stream and the MLP's elementwise tensors are fp32, and autocast saves a 16-bit copy of
        # each matmul input besides (hooks on SmolLM2 QLoRA: 55.6 KB per token and layer).
        per_token_layer = 4 * (7 * h + 4 * i) + abytes * (9 * h + i + 2 * kv)
        stream_bytes = 4
    # A recomputed layer keeps only its input; the backward pass rebuilds its tensors one layer at a
    # time. The recomputed layers are the first ones, whose backward runs last: by then the kept
    # layers and the head's logits are freed. So the peak is the end of the forward pass (inputs,
    # kept layers, logits), unless every layer is recomputed and one rebuilt layer outweighs the
    # logits (the "recomputed layer" part below).
    layers_kept = shape.layers - checkpointed
    kept = tokens * layers_kept * per_token_layer
    acts = tokens * stream_bytes * checkpointed * h + kept
    # Attention. Eager attention keeps each layer's softmax output in fp32 and the probabilities in
    # the compute dtype (counted with saved-tensor hooks); compiled (CPU runs switch to it), inductor
    # keeps the probabilities alone (fitted, docs/memory.md). SDPA on CPU runs its flash kernel even
    # with a mask (padding, packed rows), keeping no scores, but it saves the mask converted to the
    # compute dtype, [rows x 1 x seq x seq] per layer. SDPA and flash-attention on CUDA keep neither.
    seq = cfg.dataset.max_seq_len
    scores_per_layer = 0.0
    per_score = {"eager": 4 + (abytes if abytes < 4 else 0), "eager (compiled)": abytes}.get(attn)
    if per_score:
        scores_per_layer = tokens * shape.heads * seq * per_score
    elif not cuda:
        scores_per_layer = tokens * seq * abytes
    scores = scores_per_layer * layers_kept
    logits = _logits_bytes(cfg, tokens, shape, abytes, cfg.method.trains_every_weight)
    rebuilt = tokens * per_token_layer + scores_per_layer if checkpointed else 0.0
    recompute = max(0.0, rebuilt - kept - scores - logits)
    return {"activations": acts, "attention scores": scores, "logits": logits, "recomputed layer": recompute}


def heap_fragmentation(cfg: Any, cuda: bool, kbit: bool, acts: float, per_micro_batch: float) -> float:
    """glibc's heap beyond the live tensors on CPU (the larger of the two fitted effects: one
    heap holds both, and neither measurement separates them)."""
    if cuda:
        return 0.0
    quantised = CPU_QUANT_FRAGMENTATION * acts if kbit else 0.0
    varying = CPU_VARIABLE_SHAPE_FRAGMENTATION * per_micro_batch if not cfg.dataset.packing else 0.0
    return max(quantised, varying)


def _logits_bytes(cfg: Any, tokens: int, shape: Shape, abytes: int, full: bool) -> float:
    """The output layer's share. Stages pt/sft apply it only to target positions, CHUNK rows at a
    time with the gradient made in the same pass (train/objectives/causal_lm.py): one chunk's logits
    in the compute dtype and in fp32, all positions counted as targets (continued pretraining), plus
    the head's fp32 gradient when the head trains. Other stages and heads (a trained head in
    modules_to_save, FSDP-sharded weights) build all logits, their fp32 copy and its gradient."""
    chunked = cfg.stage.token_loss and not getattr(cfg.method, "modules_to_save", None) \
        and not (cfg.hardware.strategy == "fsdp")
    if not chunked:
        return tokens * shape.vocab * (abytes + 4 + 4)
    head_grad = shape.vocab * shape.hidden * 4 if full else 0
    return min(tokens, CHUNK) * shape.vocab * (abytes + 4) + head_grad


def _conversion_bytes(cfg: Any, wbytes: int, full: bool) -> float:
    """Size of the checkpoint files when the weights are converted to a smaller dtype on load."""
    if full or is_run_dir(cfg.model.path):
        return 0.0
    folder = Path(resolve_model_path(cfg.model))
    if not folder.is_dir():
        return 0.0
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    file_dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    if DTYPE_BYTES.get(file_dtype, 4) <= wbytes:
        return 0.0
    return float(sum(f.stat().st_size for f in folder.glob("*.safetensors")))


def _attention(cfg: Any, cuda: bool) -> str:
    """The training forward's attention, decided as the run decides it (ftune.runtime). The step
    count is max_steps; an epoch-sized run's is known only once its data is read, and counts as
    long enough to compile (the larger estimate)."""


    steps = cfg.train.max_steps if cfg.train.max_steps > 0 else None
    try:
        attention, compiled = training_attention(cfg, torch.device("cuda" if cuda else "cpu"), steps)
    except FtuneError:  # compile=true without a compiler: the run refuses; estimate it compiled
        attention, compiled = "eager", True
    if compiled and attention == "eager" and not cuda:  # inductor keeps only the probabilities
        return "eager (compiled)"
    return attention


def _device_memory(cuda: bool, processes_sharing: int) -> float:
    """Memory one process may use: the GPU's total, or the machine's available RAM split among the
    processes on it (0 when unknown: the check then passes)."""
    if cuda:

        return float(torch.cuda.mem_get_info(0)[1]) if torch.cuda.is_available() else 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / max(1, processes_sharing)
    except OSError:
        pass
    return 0.0
