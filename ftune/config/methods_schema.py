"""Typed schemas of the method group: one dataclass per method, a docstring under every field.

Each configs/method/<file>.yaml names one of these in its defaults list (`/schema/method/<name>`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING


@dataclass
class MethodConfig:
    """What is trained. The subclasses below are the method group's choices."""

    name: str = MISSING
    """The method's registry name (full, freeze, lora, qlora)."""


@dataclass
class FullConfig(MethodConfig):
    """Every parameter is trained."""

    name: str = "full"


@dataclass
class FreezeConfig(MethodConfig):
    """Only the last decoder layers and/or named modules are trained; the rest is frozen."""

    name: str = "freeze"
    trainable_layers: int = 2
    """How many of the last decoder layers to train (0: none)."""
    trainable_modules: list[str] = field(default_factory=list)
    """Extra parameter-name fragments to train, e.g. [lm_head, model.norm]."""


@dataclass
class LoraConfig(MethodConfig):
    """Low-rank adapters (LoRA, Hu et al. 2021) through peft, with DoRA and rsLoRA switches."""

    name: str = "lora"
    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Scaling numerator: updates are scaled by alpha/r (alpha/sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter input (0.05-0.1 regularises long runs; on CPU it costs ~25% speed)."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt (q_proj, v_proj, …) or [all-linear] for every linear layer but the head."""
    use_dora: bool = False
    """DoRA: decompose into magnitude and direction (Liu et al. 2024)."""
    use_rslora: bool = False
    """rsLoRA: scale by alpha/sqrt(r), stable at high ranks (Kalajdzievski 2023)."""
    bias: str = "none"
    """none | all | lora_only: which biases are trained with the adapter."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved beside the adapter (e.g. [lm_head, embed_tokens])."""
    init: str = "default"
    """Adapter initialisation: default (A random, B zero) | gaussian | pissa (A, B from the top
    singular vectors of W; the residual stays in the base, Meng et al. 2024)."""
    loraplus_lr_ratio: float = 0.0
    """LoRA+ (Hayou et al. 2024): B matrices learn at lr x this ratio (16 in the paper); 0: off."""


@dataclass
class QLoraConfig(LoraConfig):
    """LoRA on a 4-bit NF4 base (Dettmers et al. 2023). Sets model.quantization=4bit."""

    name: str = "qlora"


@dataclass
class BitFitConfig(MethodConfig):
    """BitFit (Ben Zaken et al. 2022): train only bias terms."""

    name: str = "bitfit"
    norms: str = "auto"
    """Also train normalisation weights: auto (only when the model has no biases, as in
    Llama-family models, with a notice) | always | never (refuse a bias-free model)."""


@dataclass
class PromptConfig(MethodConfig):
    """Prompt tuning (Lester et al. 2021): k trainable virtual-token embeddings before the input."""

    name: str = "prompt"
    num_virtual_tokens: int = 20
    """How many virtual tokens are prepended."""
    init_text: Optional[str] = None
    """Initialise the virtual tokens from this text's token embeddings (unset: random)."""


@dataclass
class PTuningConfig(MethodConfig):
    """P-tuning v1 (Liu et al. 2021): virtual tokens produced by a trainable prompt encoder."""

    name: str = "ptuning"
    num_virtual_tokens: int = 20
    """How many virtual tokens are prepended."""
    encoder: str = "mlp"
    """mlp | lstm: the prompt encoder."""
    encoder_hidden_size: int = 256
    """Hidden size of the prompt encoder."""


@dataclass
class PrefixConfig(MethodConfig):
    """Prefix tuning (Li & Liang 2021): trainable key/value prefixes in every layer, produced by a
    reparameterisation MLP during training."""

    name: str = "prefix"
    num_virtual_tokens: int = 20
    """Prefix length."""
    encoder_hidden_size: int = 256
    """Hidden size of the reparameterisation MLP."""


@dataclass
class PTuningV2Config(MethodConfig):
    """P-tuning v2 (Liu et al. 2022): deep prompts (key/value prefixes) in every layer, trained
    directly, without reparameterisation."""

    name: str = "ptuning-v2"
    num_virtual_tokens: int = 20
    """Prefix length per layer."""
    init_std: float = 0.02
    """Standard deviation of the initial prefixes: small, so training starts from the base model."""


@dataclass
class AdapterConfig(MethodConfig):
    """Bottleneck adapters (Houlsby et al. 2019): down-projection, non-linearity, up-projection and
    a residual, after each chosen sublayer; the up-projection starts at zero (model unchanged)."""

    name: str = "adapter"
    bottleneck: int = 64
    """Width of the bottleneck."""
    placement: str = "both"
    """attn (after self-attention) | mlp (after the feed-forward block) | both (Houlsby)."""
    activation: str = "gelu"
    """gelu | relu | silu."""
    train_norms: bool = True
    """Also train the normalisation layers' weights (every decoder layer's and the final one), as
    Houlsby et al. do; they are saved with the adapters. false: only the bottlenecks are trained."""


@dataclass
class IA3Config(MethodConfig):
    """IA3 (Liu et al. 2022): learned vectors that rescale keys, values and FFN activations."""

    name: str = "ia3"
    target_modules: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    """Modules whose activations are rescaled."""
    feedforward_modules: list[str] = field(default_factory=lambda: ["down_proj"])
    """Of those, the feed-forward ones (their input is rescaled, not their output)."""


@dataclass
class LycorisConfig(MethodConfig):
    """Knobs shared by the LyCORIS-family methods peft implements (LoHa, LoKr)."""

    r: int = 8
    """Rank of the low-rank factors."""
    alpha: float = 16.0
    """Scaling numerator (alpha / r)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Modules to adapt."""
    module_dropout: float = 0.0
    """Probability of skipping a module's update during training."""


@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa (Hyeon-Woo et al. 2022): the update is a Hadamard product of two low-rank products."""

    name: str = "loha"


@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr (Yeh et al. 2023): the update is a Kronecker product with a low-rank factor."""

    name: str = "lokr"


@dataclass
class AdaLoraConfig(MethodConfig):
    """AdaLoRA (Zhang et al. 2023): SVD-form LoRA whose rank budget is reallocated during training
    by importance; the trainer calls the budget update every step."""

    name: str = "adalora"
    init_r: int = 12
    """Starting rank of every matrix."""
    target_r: int = 8
    """Average rank after pruning (the budget)."""
    alpha: float = 32.0
    """Scaling numerator."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"])
    """Modules to adapt."""
    tinit: float = 0.1
    """Fraction of steps trained before pruning starts."""
    tfinal: float = 0.2
    """Fraction of steps at the end trained with the final ranks."""
    delta_t: int = 1
    """Steps between budget reallocations."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality regulariser on P and Q."""


@dataclass
class DyLoraConfig(MethodConfig):
    """DyLoRA (Valipour et al. 2023): each step trains a random rank b <= r (A, B truncated to b),
    so after one run the adapter works at every rank and can be cut to any of them."""

    name: str = "dylora"
    r: int = 16
    """Largest rank."""
    alpha: float = 16.0
    """Scaling numerator; a rank-b slice is scaled by alpha / b."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"])
    """Modules to adapt."""
    eval_ranks: list[int] = field(default_factory=list)
    """Ranks evaluated on the held-out set after training (empty: 1, 2, 4, … up to r, and r)."""
    save_rank: int = 0
    """Rank of the saved adapter (0: the full r)."""


@dataclass
class VeraConfig(MethodConfig):
    """VeRA (Kopiczko et al. 2024): one pair of frozen random matrices shared by all layers, with
    trainable scaling vectors per layer."""

    name: str = "vera"
    r: int = 256
    """Rank of the shared random matrices (VeRA uses large ranks; they are frozen)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Modules to adapt."""
    d_initial: float = 0.1
    """Initial value of the d scaling vector."""
    projection_prng_key: int = 0
    """Seed of the shared random matrices."""


@dataclass
class QALoraConfig(MethodConfig):
    """QA-LoRA (Xu et al. 2023): INT4 group-quantised base; LoRA on the group-pooled input, so the
    update merges exactly into the group zero-points and the merged model stays quantised."""

    name: str = "qalora"
    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Scaling numerator (alpha / r)."""
    group_size: int = 32
    """Input columns per quantisation group (must divide every target layer's input width)."""
    bits: int = 4
    """Bits per quantised weight (2..8)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"])
    """Modules quantised and adapted."""


@dataclass
class LongLoraConfig(MethodConfig):
    """LongLoRA (Chen et al. 2024): LoRA + trainable embeddings and norms, shifted sparse attention
    while training, and linear RoPE interpolation to a longer context."""

    name: str = "longlora"
    r: int = 8
    """Adapter rank."""
    alpha: float = 16.0
    """Scaling numerator (alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Modules with LoRA adapters (the paper adapts the attention projections)."""
    context_factor: float = 2.0
    """Train at this many times the model's native context (RoPE positions divided by it)."""
    group_fraction: float = 0.25
    """S²-Attn group size as a fraction of the sequence length (the paper uses 1/4)."""
    train_embeddings: bool = True
    """Train the input embeddings in full (needed to adapt to a longer context, per the paper)."""
    train_norms: bool = True
    """Train the normalisation layers in full."""
