"""Calibrate the memory preflight (ftune/plan/) against measured peak memory on CPU.

    python scripts/memory_calibration.py        # ~10 minutes; writes docs/memory_calibration.json

Each configuration trains 3 steps (QLoRA 10: its heap grows for ~5 steps; the variable-length
rows 30, with the held-out pass and the final sample: a new shape every micro-batch keeps growing
the heap) in a fresh process (`ftune train … --force`); the process's peak resident set size (summary.json peak_memory_gib,
from getrusage) is compared with `ftune plan`'s estimate for the same overrides. The tiny model (2 layers, hidden 64) shows the runtime floor;
the default model (SmolLM2-135M) the weights, optimiser, activation and logit terms.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from ftune.config.compose import compose
from ftune.models.load import resolve_model_path
from ftune.plan import GIB, estimate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny model (tests/kill_resume.py, conftest.py)
from kill_resume import tiny_model  # noqa: E402  (needs the tests folder on the path)

QUICK = ["train.eval_every=0", "train.save_every=0", "train.sample_max_new_tokens=0",
         "dataset.eval_max_rows=8", "train.tensorboard=false"]
CONFIGS = {
    "tiny lora": ["{tiny}", "model.name=tiny"],
    "default lora (mbs 4, seq 256)": ["train.micro_batch_size=4", "dataset.max_seq_len=256"],
    "default lora + gradient checkpointing": ["train.micro_batch_size=4", "dataset.max_seq_len=256",
                                              "train.gradient_checkpointing=true"],
    "default lora (mbs 8, seq 512)": ["train.micro_batch_size=8", "dataset.max_seq_len=512"],
    "default full fine-tune (mbs 4, seq 256)": ["method=full", "train.micro_batch_size=4", "dataset.max_seq_len=256"],
    "default qlora (mbs 4, seq 256)": ["method=qlora", "train.micro_batch_size=4", "dataset.max_seq_len=256",
                                       "train.max_steps=10"],
    "default qlora (mbs 2, seq 256)": ["method=qlora", "train.micro_batch_size=2", "dataset.max_seq_len=256",
                                       "train.max_steps=10"],
    "default qlora (mbs 8, seq 256)": ["method=qlora", "train.micro_batch_size=8", "dataset.max_seq_len=256",
                                       "train.max_steps=10"],
    "default lora, eager attention (mbs 4, seq 256)": ["train.micro_batch_size=4", "dataset.max_seq_len=256",
                                                       "model.attn_implementation=eager"],
    "default lora, compiled (mbs 4, seq 256)": ["train.micro_batch_size=4", "dataset.max_seq_len=256",
                                                "hardware.compile=true"],
    "default lora, 12 of 30 layers recomputed (mbs 8, seq 512)": ["train.micro_batch_size=8", "dataset.max_seq_len=512",
                                                                  "train.gradient_checkpointing=12"],
    # Unpacked rows of 150-500 tokens (2,000 rows cut from installed packages' descriptions),
    # padding-free micro-batches: every micro-batch has a new shape.
    "default lora, variable-length rows (mbs 4 x 2, seq 512, 30 steps)": [
        "{varlen}", "dataset.packing=false", "dataset.max_seq_len=512", "train.micro_batch_size=4",
        "train.grad_accum=2", "train.max_steps=30", "train.eval_every=15", "train.sample_max_new_tokens=48"],
    # Not used to fit CPU_RUNTIME (held out):
    "held out: default lora (mbs 2, seq 1024)": ["train.micro_batch_size=2", "dataset.max_seq_len=1024"],
    "held out: default full + checkpointing (mbs 8, seq 256)": ["method=full", "train.micro_batch_size=8",
                                                               "dataset.max_seq_len=256", "train.gradient_checkpointing=true"],
}


def variable_length_rows(path: Path, rows: int = 2000, low: int = 150, high: int = 500) -> Path:
    """Alpaca rows whose rendered samples are `low`-`high` tokens long: spans of the installed
    packages' descriptions, cut with the default model's tokenizer (deterministic for one venv)."""

    from transformers import AutoTokenizer


    tok = AutoTokenizer.from_pretrained(resolve_model_path(compose([]).cfg.model))
    texts = []
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        ids = tok(dist.metadata.get_payload() or "", add_special_tokens=False)["input_ids"]
        if len(ids) > high + 100:
            texts.append((dist.metadata["Name"], ids))
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(rows):
            name, ids = texts[rng.randrange(len(texts))]
            n = rng.randint(low - 40, high - 40)  # the instruction and the chat template add ~40
            start = rng.randrange(len(ids) - n)
            row = {"instruction": f"Continue the description of the Python package {name}.",
                   "output": tok.decode(ids[start:start + n]).strip()}
            f.write(json.dumps(row) + "\n")
    return path


def main() -> None:


    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_model(Path(tmp) / "tiny")
        varlen = variable_length_rows(Path(tmp) / "varlen.jsonl")
        for name, extra in CONFIGS.items():
            overrides = [e.replace("{tiny}", f"model.path={tiny}").replace(
                "{varlen}", f"dataset.sources=[{{path: {varlen}, format: alpaca}}]") for e in extra]
            overrides = [*(q for q in QUICK if q.split("=")[0] not in {o.split("=")[0] for o in overrides}), *overrides]
            overrides += [] if any(e.startswith("train.max_steps=") for e in extra) else ["train.max_steps=3"]
            est = estimate(compose(overrides).cfg)
            out = Path(tmp) / "runs"
            run = ["train", *overrides, f"train.output_dir={out}", f"train.run_name=r{len(rows)}", "--force"]
            subprocess.run([sys.executable, "-m", "ftune.cli", *run], check=True, cwd=ROOT, capture_output=True)
            measured = json.loads((out / f"r{len(rows)}" / "summary.json").read_text())["peak_memory_gib"]
            rows.append({"config": name, "estimate_gib": round(est.total / GIB, 3), "measured_gib": round(measured, 3),
                         "error": round(est.total / GIB / measured - 1, 3),
                         "parts_gib": {k: round(v / GIB, 3) for k, v in est.parts.items()}})
            print(f"{name:<42} estimate {est.total / GIB:6.2f} GiB  measured {measured:6.2f} GiB  "
                  f"error {100 * rows[-1]['error']:+.0f}%", flush=True)
    (ROOT / "docs" / "memory_calibration.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
