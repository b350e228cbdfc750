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
    """Canonical field -> column in this source, e.g. {instruction: prompt, output: completion}."""
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


# ----------------------------------------------------------------------------- stage
@dataclass
class StageConfig:
    """The training objective: pt and sft (causal_lm); dpo, rm and ppo have their own schemas."""

    name: str = MISSING
    """pt (continue-pretraining on raw text) | sft (supervised fine-tuning on prompts/answers) |
    dpo | rm | ppo."""
    objective: str = "causal_lm"
    """Registry name of the loss (causal_lm: token-level cross-entropy on the labelled tokens)."""


@dataclass
class DpoStageConfig(StageConfig):
    """Preference optimisation on prompt/chosen/rejected pairs (the DPO family)."""

    name: str = "dpo"
    objective: str = "dpo"
    loss: str = "sigmoid"
    """sigmoid (DPO, Rafailov et al. 2023) | cdpo (DPO with label_smoothing, conservative DPO) |
    ipo (Azar et al. 2023) | simpo (reference-free, length-normalised, Meng et al. 2024) |
    orpo (SFT loss + odds-ratio term, reference-free, Hong et al. 2024) |
    kto (unpaired desirable/undesirable answers, dataset format feedback, Ethayarajh et al. 2024)."""
    beta: float = 0.1
    """Strength of the implicit KL constraint (DPO, IPO's 1/(2 beta) target) or reward scale (SimPO)."""
    label_smoothing: float = 0.0
    """cdpo: assumed probability that a preference label is flipped (0 < eps < 0.5)."""
    simpo_gamma_ratio: float = 0.5
    """SimPO target margin gamma as a fraction of beta."""
    orpo_lambda: float = 0.1
    """ORPO weight of the odds-ratio term beside the SFT loss."""
    kto_desirable_weight: float = 1.0
    """KTO weight lambda_D of desirable answers (raise it when they are rarer than undesirable ones)."""
    kto_undesirable_weight: float = 1.0
    """KTO weight lambda_U of undesirable answers."""
    reference: Optional[str] = None
    """A separate reference model (hub id, folder, .gguf or run directory), e.g. for method=full.
    Its log-probs are computed once before training and the model is freed again. Unset: the
    trained model with its adapter disabled."""
    precompute_reference: bool = False
    """Compute the reference log-probs of every sample once before training (one extra pass over
    the data instead of one extra forward per step)."""


@dataclass
class RewardStageConfig(StageConfig):
    """Reward model on prompt/chosen/rejected pairs: a scalar head read at the last token."""

    name: str = "rm"
    objective: str = "pairwise"
    margin: float = 0.0
    """Required score gap: loss -log sigmoid(r_chosen - r_rejected - margin) (Llama 2's margin)."""
    center_rewards_coef: float = 0.0
    """Adds coef x (r_chosen + r_rejected)^2 so scores stay centred near 0 (0: off)."""


@dataclass
class PpoStageConfig(StageConfig):
    """RLHF with PPO (InstructGPT stage 3): generate, score, KL-penalise against the reference,
    estimate advantages with a value head and GAE, then clipped policy and value updates."""

    name: str = "ppo"
    objective: str = "ppo"
    reward: str = "model"
    """model (the reward model of a stage=rm run, see reward_model) | length (closeness to
    reward_target_length words) | regex (1 when reward_pattern matches the answer, else 0) |
    reference (1 when the dataset's reference answer appears in the answer) |
    python:<file.py or module>:<function> (your function(prompt, response, reference) -> float)."""
    reward_model: Optional[str] = None
    """Run directory of a stage=rm run (reward=model)."""
    reward_pattern: str = ""
    """reward=regex: a Python regular expression searched in the answer."""
    reward_target_length: int = 32
    """reward=length: the answer length (words) that scores 1; the reward falls linearly to 0 at
    twice or zero that length."""
    max_new_tokens: int = 48
    """Longest generated answer per rollout."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    top_k: int = 0
    """Sample from the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1: off)."""
    ppo_epochs: int = 2
    """Passes over each rollout batch; each pass is `mini_batches` optimiser steps."""
    mini_batches: int = 1
    """Optimiser steps per pass. A rollout has micro_batch_size x grad_accum x mini_batches answers."""
    kl_coef: float = 0.05
    """Weight of the per-token KL penalty log pi(y|x) - log pi_ref(y|x) in the reward."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards target_kl (Ziegler et al. 2019) instead of keeping it fixed."""
    target_kl: float = 6.0
    """adaptive_kl: the KL per answer (nats) the controller aims for."""
    kl_horizon: int = 10000
    """adaptive_kl: how fast the coefficient moves (answers per full correction)."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """Lambda of GAE (bias/variance of the advantage estimate)."""
    cliprange: float = 0.2
    """Clip of the policy probability ratio."""
    cliprange_value: float = 0.2
    """Clip of the value prediction around its rollout value."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    value_lr_ratio: float = 1.0
    """Learning rate of the value head as a multiple of train.lr. Keep it near 1 with AdamW:
    measured, 100 (2e-2) made the linear head's predictions swing by several reward units per
    step, and the advantages became noise."""
    critic_warmup: int = 0
    """Rollouts at the start that train only the value head (the policy waits until the critic
    gives per-prompt baselines; a reward model's scores differ a lot between kinds of prompts)."""
    value_shares_trunk: bool = False
    """false: the value head reads the policy's hidden states without sending gradients back, so the
    value loss never moves the policy (measured: with a shared trunk, the early value error's
    gradient dominates and lowers the reward). true: the value loss also trains the adapter."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over each rollout batch."""
    score_clip: float = 0.0
    """Clip scores to [-score_clip, score_clip] (0: no clipping)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of an answer that hits max_new_tokens without ending."""


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
# group's come from ftune.config.registry (each method module registers its own).
SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"model": ModelConfig},
    "dataset": {"dataset": DatasetConfig},
    "stage": {"stage": StageConfig, "dpo": DpoStageConfig, "rm": RewardStageConfig, "ppo": PpoStageConfig},
    "hardware": {"hardware": HardwareConfig},
}


def all_schemas() -> dict[str, dict[str, type]]:
    """Every group's schemas, the registered methods' included."""
    return {**SCHEMAS, "method": schemas("method")}

