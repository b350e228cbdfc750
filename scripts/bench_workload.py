"""The benchmark's workload, shared by both sides: settings, ftune overrides, the exact batches of
every step, the model FLOPs of a step, and the peak matmul FLOP/s of the machine.

Both sides train on the batches ftune's own data pipeline and data order produce (read from
ftune, not re-implemented), so the token counts and the FLOPs of a step are computed once, from
the same samples, for either side.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftune.config.compose import compose
from ftune.data.build import build
from ftune.data.order import DataOrder
from ftune.models.load import load_tokenizer, resolve_model_path

# The projections of a Llama decoder layer that LoRA can target, as (input, output) dimension
# names; peft's "all-linear" means all seven (lm_head excluded).
LLAMA_LINEARS = {
    "q_proj": ("hidden", "q"), "k_proj": ("hidden", "kv"), "v_proj": ("hidden", "kv"), "o_proj": ("q", "hidden"),
    "gate_proj": ("hidden", "mlp"), "up_proj": ("hidden", "mlp"), "down_proj": ("mlp", "hidden"),
}


@dataclass
class Settings:
    """One benchmark invocation; passed to workers as JSON so both sides read the same values."""

    device: str = "cpu"
    recipe: str = "smollm2-lora-sft"
    steps: int = 12
    rounds: int = 2
    seq_len: int = 256
    batch: int = 8
    """Samples per micro-batch (both sides, unpacked)."""
    grad_accum: int = 1
    packed_batch: int = 2
    """Packed rows of seq_len tokens per micro-batch for the `ftune-packed` arm (the recipe's 2)."""
    compile: str = "true"
    """hardware.compile of the ftune arms: true measures the steady state of a long run (auto
    compiles runs of 200+ steps); the one-time compile lands in the untimed first step, and the
    report shows that step's seconds and every run's wall time."""
    arms: list[str] = field(default_factory=lambda: ["ftune", "baseline", "ftune-packed"])
    timeout_s: int = 420
    workdir: str = ""
    """Scratch folder for run directories and logs (a temporary folder when empty)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        return cls(**json.loads(text))


def ftune_overrides(s: Settings, packed: bool, output_dir: str = "outputs", run_name: str = "bench") -> list[str]:
    """The `ftune train` command line of one arm. Evaluation during training, checkpoints, the
    sample answer and TensorBoard are switched off: none of them is measured, all cost time."""
    hardware = "cpu" if s.device == "cpu" else "single-gpu"
    return [f"recipe={s.recipe}", f"hardware={hardware}", f"train.max_steps={s.steps}",
            f"dataset.max_seq_len={s.seq_len}", f"dataset.packing={'true' if packed else 'false'}",
            f"train.micro_batch_size={s.packed_batch if packed else s.batch}", f"train.grad_accum={s.grad_accum}",
            f"hardware.compile={s.compile}", "train.gradient_checkpointing=false",  # as the baseline: no recompute
            "train.eval_every=0", "train.save_every=0", "train.sample_max_new_tokens=0", "train.tensorboard=false",
            f"train.output_dir={output_dir}", f"train.run_name={run_name}"]


def compose_arm(s: Settings, packed: bool) -> Any:
    """ftune's composed, validated config for one arm (nothing loaded)."""

    return compose(ftune_overrides(s, packed)).cfg


def model_folder(cfg: Any) -> str:
    """The folder ftune loads the model from: for the shipped GGUF, ftune's cached safetensors
    conversion (made on first use, so this also works on a fresh machine)."""

    return resolve_model_path(cfg.model)


def load_samples(cfg: Any) -> tuple[list[dict], list[dict], Any]:
    """(train samples, held-out samples, tokenizer) exactly as `ftune train` builds them (and from
    the same cache)."""

    tokenizer = load_tokenizer(model_folder(cfg), cfg.model)
    data = build(cfg.dataset, cfg.stage.name, cfg.train.seed, tokenizer)
    return data.train, data.eval, tokenizer


def step_rows(n_rows: int, cfg: Any, steps: int) -> list[list[int]]:
    """Row indices of every optimiser step, in ftune's own seeded data order (micro-batches of a
    step concatenated): the baseline is fed these rows in this order."""

    order = DataOrder(n_rows, cfg.train.micro_batch_size, cfg.train.seed)
    per_step = cfg.train.grad_accum
    return [[i for m in range(k * per_step, (k + 1) * per_step) for i in order.micro(m)] for k in range(steps)]


@dataclass
class StepWork:
    """What one optimiser step trains on."""

    tokens: int
    """Non-padding tokens fed to the model."""
    targets: int
    """Tokens that carry a loss (assistant tokens, after the shift)."""
    samples: int
    attention_pairs: int
    """Sum over samples of n(n+1)/2: the (query, key) pairs a causal mask allows within each sample."""


def sample_lengths(row: dict) -> list[int]:
    """Lengths of the samples in a row: one sample, or, for a packed row, one per position-id restart."""
    if "position_ids" not in row:
        return [len(row["input_ids"])]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return [b - a for a, b in zip(starts, starts[1:])]


def step_work(rows: list[dict], steps: list[list[int]]) -> list[StepWork]:
    out = []
    for indices in steps:
        chosen = [rows[i] for i in indices]
        lengths = [n for r in chosen for n in sample_lengths(r)]
        out.append(StepWork(tokens=sum(lengths), samples=len(lengths),
                            targets=sum(sum(x != -100 for x in r["labels"][1:]) for r in chosen),
                            attention_pairs=sum(n * (n + 1) // 2 for n in lengths)))
    return out


@dataclass
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int

    @classmethod
    def from_folder(cls, folder: str) -> "ModelShape":
        c = json.loads((Path(folder) / "config.json").read_text())
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        return cls(c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"],
                   c.get("num_key_value_heads", c["num_attention_heads"]), head_dim, c["intermediate_size"], c["vocab_size"])

    def dims(self) -> dict[str, int]:
        return {"hidden": self.hidden, "q": self.heads * self.head_dim, "kv": self.kv_heads * self.head_dim, "mlp": self.mlp}


def lora_targets(target_modules: list[str]) -> list[str]:
    if list(target_modules) == ["all-linear"]:
        return list(LLAMA_LINEARS)
    return [name for name in LLAMA_LINEARS if name in target_modules]


def flop_terms(shape: ModelShape, r: int, targets: list[str]) -> dict[str, float]:
    """Per-unit FLOP coefficients of LoRA training (see results.md for the derivation):
    - per token: frozen linear weights N_body forward (2N) + input gradient (2N) = 4 N_body;
      LoRA weights N_lora forward (2N) + input and weight gradients (4N) = 6 N_lora;
    - per target token: the LM head (vocab x hidden, frozen and tied) forward + input gradient
      = 4 V d — only the positions that carry a loss need logits;
    - per causal (query, key) pair and layer: scores and weighted values, forward 4 q_dim,
      backward 8 q_dim = 12 q_dim."""
    dims = shape.dims()
    body = sum(dims[i] * dims[o] for i, o in LLAMA_LINEARS.values()) * shape.layers
    lora = sum(r * (dims[LLAMA_LINEARS[t][0]] + dims[LLAMA_LINEARS[t][1]]) for t in targets) * shape.layers
    return {"per_token": 4.0 * body + 6.0 * lora, "per_target": 4.0 * shape.vocab * shape.hidden,
            "per_attention_pair": 12.0 * dims["q"] * shape.layers, "body_params": float(body), "lora_params": float(lora)}


def step_flops(work: StepWork, terms: dict[str, float]) -> float:
    return (work.tokens * terms["per_token"] + work.targets * terms["per_target"]
            + work.attention_pairs * terms["per_attention_pair"])


def peak_matmul_flops(device: str, dtype: torch.dtype, seconds: float = 2.0) -> dict[str, float]:
    """Best FLOP/s of large square matmuls in `dtype` on `device`, over a few sizes (the fastest
    size differs by machine), each timed for about seconds / sizes after a warm-up."""
    sizes = (512, 1024, 2048) if device == "cpu" else (4096, 8192)
    best: dict[str, float] = {}
    for n in sizes:
        a, b, c = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(3))
        _sync(device, torch.mm(a, b, out=c))
        rate, deadline = 0.0, time.perf_counter() + seconds / len(sizes)
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            _sync(device, torch.mm(a, b, out=c))  # into a kept buffer: no allocation in the timing
            rate = max(rate, 2 * n ** 3 / (time.perf_counter() - start))
        best[str(n)] = rate
        del a, b, c
    return {"flops_per_s": max(best.values()), "by_size": best}


def _sync(device: str, t: torch.Tensor) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def median(values: list[float]) -> float:
    vals = sorted(v for v in values if v is not None and not math.isnan(v))
    if not vals:
        return float("nan")
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
