"""Crash-exact resume, tested the hard way: a training run of the tiny model is killed with SIGKILL
at random moments — several of them while a checkpoint is being written — and resumed each time;
the final weights must be bit-identical to an uninterrupted run's.

    python tests/kill_resume.py --kills 5 [--seed 0] [--out DIR]    # tests/test_reliability.py runs 5 kills

Checkpoints are written every step (train.save_every=1, keep 2). FTUNE_CHECKPOINT_DELAY makes each
checkpoint write pause halfway (after the tensors, before the completion marker), so random kills
land inside writes often; the harness counts how many did. Exit code 0 when the weights match.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # run as a script: conftest's tiny tokenizer sits beside it


def tiny_model(folder: Path) -> Path:
    import torch
    from conftest import make_tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def overrides(model: Path, out: Path, steps: int) -> list[str]:
    return [f"model.path={model}", "model.name=tiny", "hardware.precision=fp32", "hardware.threads=1",
            f"train.output_dir={out}", "train.sample_max_new_tokens=0", "train.tensorboard=false",
            "dataset.max_rows=64", "dataset.max_seq_len=128", "dataset.eval_max_rows=4", "train.micro_batch_size=2",
            f"train.max_steps={steps}", "train.lr=5e-3", "train.eval_every=0", "train.save_every=1",
            "train.save_total_limit=2"]


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ftune.cli", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def steps_done(run: Path) -> int:
    ckpts = sorted((run / "checkpoints").glob("step-*/state.json")) if (run / "checkpoints").is_dir() else []
    return int(ckpts[-1].parent.name.removeprefix("step-")) if ckpts else 0


def writing(run: Path) -> bool:
    return (run / "checkpoints").is_dir() and any((run / "checkpoints").glob(".step-*.tmp*"))


def harness(kills: int, seed: int, out: Path, steps: int = 40) -> dict:
    rng = random.Random(seed)
    model = tiny_model(out / "tiny")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "FTUNE_CACHE_DIR": str(out / "cache")}
    base = overrides(model, out / "runs", steps)
    ref = subprocess.run([sys.executable, "-m", "ftune.cli", "train", *base, "train.run_name=ref"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if ref.returncode != 0:
        raise SystemExit(f"uninterrupted run failed:\n{ref.stderr[-2000:]}")
    run = out / "runs" / "killed"
    slow = {**env, "FTUNE_CHECKPOINT_DELAY": "0.3"}
    log, during_write = [], 0
    while len(log) < kills:
        resume = ["train.resume=true"] if steps_done(run) else []
        proc = start([*base, "train.run_name=killed", *resume], slow)
        # Wait for training to be under way, then kill at a random moment of the next few steps.
        begun = steps_done(run)
        deadline = time.time() + 120
        while steps_done(run) <= begun and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before kill {len(log) + 1} (exit {proc.returncode}): {proc.stderr.read()[-1500:]}")
        in_write = writing(run)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        during_write += in_write
        log.append({"kill": len(log) + 1, "last_complete_step": steps_done(run), "during_checkpoint_write": in_write})
        print(f"kill {len(log)}: last complete checkpoint step {steps_done(run)}"
              + (" (killed during a checkpoint write)" if in_write else ""), flush=True)
    final = subprocess.run([sys.executable, "-m", "ftune.cli", "train", *base, "train.run_name=killed",
                            "train.resume=true"], cwd=ROOT, env=env, capture_output=True, text=True)
    if final.returncode != 0:
        raise SystemExit(f"final resume failed:\n{final.stderr[-2000:]}")
    a = (out / "runs" / "ref" / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    from safetensors.torch import load_file

    ta = load_file(str(out / "runs" / "ref" / "adapter" / "adapter_model.safetensors"))
    tb = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    identical = set(ta) == set(tb) and all(bool((ta[k] == tb[k]).all()) for k in ta)
    result = {"kills": kills, "during_checkpoint_write": during_write, "steps": steps, "bit_identical": identical,
              "same_file_bytes": a == b, "log": log}
    print(json.dumps({k: v for k, v in result.items() if k != "log"}))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = harness(args.kills, args.seed, args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = harness(args.kills, args.seed, Path(tmp))
    sys.exit(0 if result["bit_identical"] else 1)


if __name__ == "__main__":
    main()
