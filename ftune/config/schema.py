"""The typed schema of a composed ftune config: one dataclass per group choice.

Every setting has its default here and a docstring under it. The dataclasses are stored in Hydra's
ConfigStore under `schema/<group>/<name>` (ftune/config/compose.py), and each YAML file in
configs/ names its schema in its defaults list, so a misspelt key is refused at compose time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from ftune.config.methods_schema import MethodConfig  # noqa: F401 (the method group's base)
from ftune.config.registry import schemas
from ftune.config.stage_schema import StageConfig


# ----------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """The base model and how it is loaded."""

    name: str = MISSING
    """Short name, used in run directory names (e.g. smollm2-135m)."""
    path: str = MISSING
    """Hub id (meta-llama/Llama-2-7b-hf), a local Hugging Face folder, a .gguf file, or
    `package:<module>/<file>` for a model shipped inside a Python package."""
    revision: str = "main"
    """Hub revision (branch, tag or commit) when `path` is a hub id."""
    dtype: str = "auto"
    """Weight dtype: auto | float32 | bfloat16 | float16. auto: the precision of the hardware
    profile for a frozen base (LoRA family), float32 master weights for full/freeze training."""
    attn_implementation: str = "auto"
    """auto | sdpa | eager | flash_attention_2. auto: flash_attention_2 on CUDA when flash-attn is
    installed, else sdpa."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a hub model. Off: only code in transformers runs. On: ftune
    says so each time it loads the model."""
    allow_pickle: bool = False
    """Read pickle-based files (pytorch_model.bin, adapter_model.bin, *.pt, checkpoints of older
    ftune versions). Pickle can run code when loaded; off, only safetensors are read."""
    quantization: str = "none"
    """none | 4bit | 8bit: load the frozen base through bitsandbytes. method=qlora sets 4bit."""
    bnb_4bit_quant_type: str = "nf4"
    """4-bit data type: nf4 (QLoRA's NormalFloat) or fp4."""
    bnb_4bit_use_double_quant: bool = True
    """Quantise the quantisation constants too (QLoRA's double quantisation, ~0.4 bit/param)."""
    template: str = "model"
    """Prompt template used when the dataset does not name one: a data_templates/ name, or
    `model` for the tokenizer's own chat template."""


# ----------------------------------------------------------------------------- dataset
@dataclass
class SourceConfig:
    """One source of rows inside a dataset."""

    path: str = MISSING
    """A local .json/.jsonl/.csv/.parquet file, `ftune:<file>` for data shipped with ftune, or a
    Hugging Face dataset name (read from the local cache; offline, nothing is downloaded)."""
    format: str = "alpaca"
    """text | alpaca | qa | messages | sharegpt (SFT and pre-training) | preference (prompt, chosen,
    rejected) | prompt (prompts only: PPO) | feedback (prompt, completion, label: KTO): how a row
    becomes a canonical record."""
    columns: dict[str, str] = field(default_factory=dict)
    """Canonical field -> column in this source, e.g. {instruction: prompt, output: completion}
    (on the command line: dataset.sources.0.columns.instruction=prompt)."""
    message_keys: dict[str, str] = field(default_factory=dict)
    """Part of a conversation turn -> this file's key for it: role, content, reasoning, tool_calls,
    train, name; e.g. {role: speaker, content: text}. Unset parts are read from the usual keys
    (role/from, content/value, reasoning_content, tool_calls, train)."""
    roles: dict[str, Any] = field(default_factory=dict)
    """Role -> this file's name (or names) for it: user, assistant, system, tool (a tool's result),
    tool_call (a turn holding a call as JSON); e.g. {user: customer, assistant: [agent, bot]}. Added
    to the usual names (human, gpt, observation, function_call, …)."""
    split: str = "train"
    """Split to read for Hugging Face datasets."""
    subset: Optional[str] = None
    """Configuration name for Hugging Face datasets that have several."""
    weight: float = 1.0
    """Mixing weight: rows used = weight x rows in the source (0.5 takes a seeded half, 2 repeats
    every row twice)."""
    system: Optional[str] = None
    """System prompt for rows that carry none."""


@dataclass
class DatasetConfig:
    """Rows, how they are rendered into tokens, and the held-out split."""

    name: str = MISSING
    """Short name, used in run directory names."""
    sources: list[SourceConfig] = field(default_factory=list)
    """One or more sources, mixed by weight."""
    template: Optional[str] = None
    """Prompt template: a data_templates/ name, a template file of your own (path ending in .yaml,
    same fields as data_templates/chatml.yaml) or `model`; unset: model.template."""
    max_seq_len: int = 512
    """Tokens per sample (or per packed row); longer samples are truncated with a counted warning."""
    packing: bool = False
    """Pack several samples into each row of max_seq_len tokens, without attention across samples."""
    padding_free: bool = True
    """Unpacked micro-batches (packing=false) are laid out without padding: the micro-batch's own
    samples share rows as wide as its longest sample, position ids restarting per sample and
    attention kept within each sample. Same samples per step, same loss, no work on pad tokens.
    false: one right-padded row per sample with an attention mask. Off for methods and stages
    that cannot share rows (the ones that turn packing off)."""
    train_on: str = "assistant"
    """assistant: loss on assistant tokens only | last: only the last assistant turn | all: every
    token. Stage pt always trains on all tokens."""
    eval_fraction: float = 0.1
    """Fraction of rows held out for evaluation (seeded), when eval_path is unset."""
    eval_max_rows: int = 200
    """At most this many held-out rows (keeps evaluation quick)."""
    eval_path: Optional[str] = None
    """A separate held-out file in the first source's format; replaces eval_fraction."""
    max_rows: Optional[int] = None
    """Use at most this many training rows after mixing (quick runs)."""
    on_bad_row: str = "fail"
    """fail: stop at the first unreadable row (not UTF-8, not JSON, missing or wrong-typed columns),
    naming file and row | skip: leave such rows out, count them, report them after tokenising and
    in summary.json."""
    sample_prompt: Optional[str] = None
    """Prompt answered after training to show the model; unset: the first held-out prompt."""
    system: Optional[str] = None
    """System prompt for rows that carry none (a source's own `system` wins). "": no system prompt
    at all, not even the default one a chat template inserts into rows without one. Unset: rows keep
    what they have, and a template's default is inserted (said in the run's data line)."""
    placeholders: dict[str, str] = field(default_factory=dict)
    """Text filled in for {{name}} placeholders in every row, e.g. {name: Ada, author: the lab} for
    identity sets. Placeholders left unfilled in trained text are counted in a warning."""
    num_proc: int = 1
    """Processes that render and tokenise the rows (0: one per CPU core); the result is the same
    whatever the count. Worth it from ~100k rows: a process costs ~1 s to start."""
    train_reasoning: bool = True
    """An assistant turn's reasoning (reasoning_content, or <think>…</think> before the answer) is
    trained with the answer; false: it stays in the input, masked, and only the answer is trained."""


# ----------------------------------------------------------------------------- stage
# ----------------------------------------------------------------------------- hardware
@dataclass
class HardwareConfig:
    """Where the run executes and in which precision."""

    name: str = MISSING
    """Profile name (cpu, single-gpu, …)."""
    device: str = "auto"
    """auto | cpu | cuda. auto: cuda when available, else cpu."""
    precision: str = "bf16"
    """bf16 | fp16 | fp32: autocast precision of the forward/backward (fp16 adds loss scaling)."""
    threads: int = 0
    """CPU threads for torch (0: torch's default, all cores)."""
    num_processes: int = 1
    """Processes per node; 0: one per visible GPU. More than one: `ftune train` relaunches itself
    under torchrun. The global batch stays micro_batch_size x grad_accum: the processes split each
    step's micro-batches, so the loss curve does not depend on the process count."""
    num_nodes: int = 1
    """Machines taking part (each runs the same command; see node_rank and master_addr)."""
    node_rank: int = -1
    """This machine's index among num_nodes; -1: from NODE_RANK or SLURM_NODEID."""
    master_addr: str = ""
    """Address of node 0; "": MASTER_ADDR, else the first host of SLURM_JOB_NODELIST, else localhost."""
    master_port: int = 29500
    """Rendezvous port on node 0 (MASTER_PORT overrides)."""
    strategy: str = "none"
    """none | ddp | fsdp | deepspeed: how several processes share the work. ddp: every process
    holds the model, gradients are averaged. fsdp: FSDP2 fully_shard per decoder layer (weights,
    gradients and optimiser state sharded). deepspeed: ZeRO stage zero_stage through Accelerate."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass (sets train.gradient_checkpointing)."""
    cpu_offload: bool = False
    """fsdp: keep sharded parameters, gradients and optimiser state in CPU memory."""
    zero_stage: int = 0
    """deepspeed: 2 (optimiser state + gradients sharded) or 3 (weights too)."""
    offload_optimizer: bool = False
    """deepspeed: optimiser state in CPU memory (ZeRO-Offload)."""
    offload_params: bool = False
    """deepspeed zero_stage 3: parameters in CPU memory too."""
    attn_implementation: str = "auto"
    """auto | sdpa | eager | flash_attention_2 for this hardware (model.attn_implementation, when
    not auto, wins). auto: flash_attention_2 on CUDA when flash-attn is installed, else sdpa."""
    fused_ops: bool = True
    """ftune's fused training paths: each LoRA linear layer as one autograd function (frozen matmul
    and adapter accumulated in one matmul, hand-written backward). false: peft's stock forward.
    The adapters and their files are the same either way."""
    compile: str = "auto"
    """auto | true | false: torch.compile each decoder layer's training forward (one graph shared
    by all layers, dynamic shapes; evaluation and sampling stay eager). The first compile takes
    ~35 s on 2 CPU cores (~12 s from inductor's cache) and then saves ~20% of every step. auto: on
    for runs of at least 200 steps when a compiler is found (g++/clang++ on CPU, Triton on CUDA),
    strategy none or ddp."""
    liger: bool = False
    """CUDA: Liger kernels (fused RMSNorm, SwiGLU, RoPE, cross-entropy) when liger-kernel is installed."""
    memory_gib: float = 0.0
    """Memory per device for the preflight check; 0: measured (free GPU memory, or available RAM
    shared by the processes on CPU)."""


# ----------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    """The loop: steps, batches, optimiser, schedule, evaluation, checkpoints."""

    seed: int = 42
    """Seeds torch, Python and the data order; the same seed gives the same run on CPU."""
    epochs: float = 1.0
    """Passes over the training rows (fractions allowed) when max_steps is -1."""
    max_steps: int = -1
    """Optimiser steps to run; -1: derive from epochs."""
    micro_batch_size: int = 4
    """Samples (or packed rows) per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimiser step. Loss is normalised by the tokens of the whole step."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (never applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    optim: str = "adamw"
    """adamw (torch) | adamw_8bit | paged_adamw_8bit | paged_adamw_32bit (bitsandbytes, CUDA)."""
    lr_scheduler: str = "cosine"
    """cosine | linear | constant (each after warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps; 0 with warmup_ratio > 0 derives it."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the total steps (used when warmup_steps is 0)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    on_nonfinite: str = "stop"
    """A step whose loss or gradient norm is NaN/inf: stop (with the step and rows reported; the last
    checkpoint stays the newest) or skip (no update, counted and reported at the end)."""
    gradient_checkpointing: str = "auto"
    """auto | true | false | N: recompute decoder layers' activations in the backward pass instead
    of keeping them (each recomputed layer keeps only its input: less memory, about one more
    forward of that layer). true: every layer; N: the first N layers; auto: none when the memory
    preflight's estimate fits in 90% of the device's memory, else the fewest layers that make it
    fit (`ftune plan` shows the choice). A hardware profile with activation_checkpointing sets true."""
    eval_every: int = 0
    """Held-out evaluation every N steps (0: only before and after training)."""
    log_every: int = 1
    """Write metrics every N steps."""
    save_every: int = 0
    """Checkpoint every N steps (0: none during training)."""
    save_total_limit: int = 2
    """Keep the last K checkpoints."""
    resume: str = "false"
    """false | true (the last checkpoint of run_dir) | a checkpoint or run directory path."""
    output_dir: str = "outputs"
    """Parent folder of run directories."""
    run_name: Optional[str] = None
    """Run directory name; unset: <recipe>-<date>-<time>. Needed to resume with resume=true."""
    overwrite: bool = False
    """Replace an existing run directory of the same name (`ftune train --overwrite`). Off: a fresh
    run never writes into an existing run directory; resume it or pick another run_name."""
    sample_max_new_tokens: int = 48
    """Tokens generated for the sample answer after training (0: no sample)."""
    tensorboard: bool = True
    """Write TensorBoard event files under <run>/tb."""


# ----------------------------------------------------------------------------- top
@dataclass
class FtuneConfig:
    """A composed run: recipe = model x method x dataset x hardware x stage, plus train knobs."""

    recipe: str = "custom"
    """The recipe this config came from (set by ftune)."""
    description: str = ""
    """One line shown by `ftune recipes`."""
    model: ModelConfig = MISSING
    method: Any = MISSING
    """A MethodConfig subclass: the method's own schema (registered by its module in ftune/methods)."""
    dataset: DatasetConfig = MISSING
    stage: StageConfig = MISSING
    hardware: HardwareConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)


# Group -> {choice schema name -> dataclass} of the groups with a fixed set of schemas; the method
# and stage groups' come from ftune.config.registry (each method and stage module registers its own).
SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"model": ModelConfig},
    "dataset": {"dataset": DatasetConfig},
    "hardware": {"hardware": HardwareConfig},
}


def all_schemas() -> dict[str, dict[str, type]]:
    """Every group's schemas, the registered methods' included."""
    return {**SCHEMAS, "method": schemas("method"), "stage": schemas("stage")}

