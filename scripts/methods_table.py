"""Train every method briefly on the real default model and write docs/methods.md.

    .venv/bin/python scripts/methods_table.py            # all methods, 20 steps each (~15 min on 2 CPU cores)
    .venv/bin/python scripts/methods_table.py lora vera  # a subset; rows of other methods are kept

Each run is the default recipe (SmolLM2-135M-Instruct, shipped instruction set, CPU, bf16) with
`method=<name>`, a learning rate suited to the method, 20 optimiser steps and 48 held-out rows.
"""

from __future__ import annotations

import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from ftune.config.compose import compose
from ftune.logs import quiet_libraries
from ftune.train.run import train

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "methods.md"
STEPS = 20
# Soft prompts cannot pack rows: 8 unpacked samples per step keep the tokens per step comparable.
UNPACKED = ["train.micro_batch_size=8"]
# method -> (family, learning rate, extra overrides); learning rates follow each paper's range.
METHODS = {
    "full": ("selection", 2e-5, []),
    "freeze": ("selection", 1e-4, []),
    "bitfit": ("selection", 1e-3, []),
    "prompt": ("soft prompt", 3e-2, ["method.init_text=Answer in one short sentence.", *UNPACKED]),
    "ptuning": ("soft prompt", 1e-3, UNPACKED),
    "prefix": ("soft prompt", 1e-3, UNPACKED),
    "ptuning-v2": ("soft prompt", 1e-2, UNPACKED),
    "adapter": ("adapter", 1e-3, []),
    "ia3": ("adapter", 3e-3, []),
    "lora": ("low-rank", 5e-4, []),
    "lora-attn": ("low-rank", 5e-4, []),
    "lora+dora": ("low-rank", 5e-4, ["method=lora", "method.use_dora=true"]),
    "lora+pissa": ("low-rank", 2e-4, ["method=lora", "method.init=pissa"]),
    "lora+loraplus": ("low-rank", 2e-4, ["method=lora", "method.loraplus_lr_ratio=16"]),
    "loha": ("low-rank", 1e-3, []),
    "lokr": ("low-rank", 1e-3, []),
    "adalora": ("low-rank", 5e-3, []),
    "dylora": ("low-rank", 5e-4, []),
    "vera": ("low-rank", 1e-2, []),
    "qlora": ("low-rank", 5e-4, []),
    "qalora": ("low-rank", 5e-4, []),
    "longlora": ("low-rank", 5e-4, UNPACKED),
    "mam": ("mixed", 1e-3, UNPACKED),
    "unipelt": ("mixed", 1e-3, UNPACKED),
}


NOTES = """Reading the table: 20 steps show that each method learns, not which is best. The loss before
training differs where a method changes the model at step 0: qlora and qalora quantise the base
(NF4, INT4), longlora interpolates RoPE for twice the native context (of no use at 256 tokens, hence
its high start), soft prompts add virtual tokens and are evaluated on unpacked rows. Methods with
few parameters (vera, ia3, loha, lokr, prompt) need more steps or higher learning rates than 20
steps allow. tokens/s count input tokens (virtual tokens excluded) on 2 CPU cores.

## Choosing and using a method

`ftune train method=<name>` with any recipe; every knob is documented in `configs/method/<name>.yaml`.

| method | what is trained | saved as | merge (`ftune.methods.merge.merge`) |
|---|---|---|---|
| full, freeze | all weights / the last N layers | Hugging Face model | nothing to merge |
| bitfit | biases; norms on bias-free models (with a notice) | ftune adapter folder | trivially (base tensors) |
| prompt, ptuning, prefix, ptuning-v2 | virtual tokens / their encoder / per-layer K,V prefixes | peft | refused: adds inputs, changes no weight |
| adapter | Houlsby bottlenecks after attention and/or MLP, plus the layer norms | ftune adapter folder | refused: non-linear |
| ia3 | rescaling vectors of K, V and FFN activations | peft | exact (peft) |
| lora, lora-attn (+ DoRA, rsLoRA, PiSSA, LoRA+) | low-rank A, B | peft | exact (peft) |
| loha, lokr, adalora, vera | Hadamard / Kronecker / SVD-form / scaling vectors | peft | exact (peft) |
| dylora | A, B trained at a random rank each step | ftune adapter folder (cut to `save_rank`) | exact at the active rank |
| qlora | LoRA on a 4-bit NF4 base | peft | through peft on a dequantised base |
| qalora | LoRA on the group-pooled input of an INT4 group-quantised base | ftune adapter folder | exact, into the group zero-points: the merged model stays INT4 |
| longlora | LoRA on attention + embeddings + norms, S²-Attn, RoPE x context_factor | peft (set the same RoPE scaling when reloading) | exact for the LoRA part (peft) |
| mam | key/value prefixes on attention + a scaled parallel adapter on the feed-forward block | ftune adapter folder | refused: prefixes and a non-linear adapter |
| unipelt | gated LoRA on q, v + gated prefixes + a gated adapter after the feed-forward block | ftune adapter folder | refused: input-dependent gates |

ftune adapter folders (`ftune_adapter.json` + `adapter.safetensors`) load with
`ftune.methods.saving.load_trained(base_model, folder)`. peft folders load with
`PeftModel.from_pretrained(base_model, folder)` and no ftune installed.

DyLoRA evaluates the held-out loss at every rank in `method.eval_ranks` (default 1, 2, 4, … r) after
one run and writes it to `summary.json` (`eval_loss_by_rank`); `method.save_rank` cuts the saved adapter.
AdaLoRA's budget update runs after every optimiser step; the final per-matrix ranks are in the saved
`adapter_config.json` (`rank_pattern`).

Mixed methods are compositions of these parts (ftune/methods/mixes.py): MAM (He et al. 2022) puts
`prefix_length` key/value prefixes on every attention layer and a parallel adapter, scaled by
`ffn_scale`, beside every feed-forward block; UniPELT (Mao et al. 2022) gates LoRA on the query and
value projections, the prefixes and a bottleneck adapter after the feed-forward block, each with a
per-token gate sigmoid(W x) (per token, so the model stays causal).
"""


def run_one(name: str, tmp: Path) -> dict:
    family, lr, extra = METHODS[name]
    method = [] if any(x.startswith("method=") for x in extra) else [f"method={name}"]
    composed = compose([*method, *extra, f"train.lr={lr}", f"train.max_steps={STEPS}", "train.eval_every=0",
                        "train.save_every=0", "train.sample_max_new_tokens=0", "train.tensorboard=false",
                        "dataset.eval_max_rows=48", f"train.output_dir={tmp}", f"train.run_name={name}"])
    s = train(composed, Console(quiet=True))
    return {"method": name, "family": family, "lr": lr, "trainable": s["trainable_parameters"],
            "tokens_per_s": s["tokens_per_s"], "before": s["eval_loss_before"], "after": s["eval_loss_after"],
            "extra": extra, **({"by_rank": s["eval_loss_by_rank"]} if "eval_loss_by_rank" in s else {})}


def load_rows() -> dict:
    if not OUT.is_file():
        return {}
    match = re.search(r"<!-- rows (.*) -->", OUT.read_text())
    return json.loads(match.group(1)) if match else {}


def write(rows: dict) -> None:
    lines = [
        "# Methods: a short real run of each",
        "",
        f"Made by `scripts/methods_table.py` on {platform.machine()} CPU ({platform.processor() or 'unknown'}), "
        f"{time.strftime('%Y-%m-%d')}. Each row: the default recipe (SmolLM2-135M-Instruct, the shipped",
        f"instruction set, bf16 autocast) with that method, {STEPS} optimiser steps of 512 tokens, held-out loss on",
        "48 rows before and after. Soft-prompt methods train unpacked rows (8 samples per step).",
        "",
        "| method | family | trainable params | lr | tokens/s | held-out loss before -> after |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name in METHODS:
        if name in rows:
            r = rows[name]
            lines.append(f"| `{name}` | {r['family']} | {r['trainable']:,} | {r['lr']:g} | {r['tokens_per_s']:.0f} | "
                         f"{r['before']:.3f} -> {r['after']:.3f} |")
    for r in rows.values():
        if "by_rank" in r:
            ranks = ", ".join(f"r={k}: {v:.3f}" for k, v in r["by_rank"].items())
            lines += ["", f"DyLoRA, one run evaluated at several ranks (held-out loss): {ranks}."]
    lines += ["", NOTES, f"<!-- rows {json.dumps(rows)} -->", ""]
    OUT.write_text("\n".join(lines))


def main() -> None:
    quiet_libraries()
    names = sys.argv[1:] or list(METHODS)
    rows = load_rows()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"{name} ...", flush=True)
            rows[name] = run_one(name, Path(tmp))
            print(f"  {rows[name]['before']:.3f} -> {rows[name]['after']:.3f}, {rows[name]['tokens_per_s']:.0f} tok/s",
                  flush=True)
            write(rows)


if __name__ == "__main__":
    main()
