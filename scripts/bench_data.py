"""Benchmark of data preparation at scale: a generated 1,000,000-row instruction set and a 2 GB
raw-text corpus, each built twice by `data.build.build` (the path `ftune train` takes) in a fresh
process: the first run reads, renders, tokenises and writes the Arrow cache; the second reads the
cache back. Writes bench/data.md and bench/data.json.

    .venv/bin/python scripts/bench_data.py                     # ~30-40 min on 2 cores
    .venv/bin/python scripts/bench_data.py --rows 100000 --corpus-gb 0.2 --num-proc 2
    make bench-data

Reported per build: wall time, peak resident memory of the process and its workers (getrusage),
rows and tokens, the cache's size on disk. The tokenizer and chat template are the default
model's (SmolLM2-135M-Instruct), the instruction set goes through its chat template as in the
default recipe, the corpus through stage=pt's blocks (packing=true, max_seq_len 2048).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
         "you were her she there been one all we their has would when if so no will more can out up about who them "
         "some time could these two may then do first any my now such like our over man me even most made after also "
         "did many before must through back years where much your way well down should because each just those people "
         "river mountain city market engine garden theory history music planet language winter harbour").split()

CHILD = r"""
import json, resource, sys, time
from ftune.config.compose import compose
from ftune.data.build import build
from ftune.models.load import load_tokenizer, resolve_model_path
overrides = json.loads(sys.argv[1])
cfg = compose(overrides).cfg
tokenizer = load_tokenizer(resolve_model_path(cfg.model), cfg.model)
start = time.perf_counter()
bundle = build(cfg.dataset, cfg.stage.name, cfg.train.seed, tokenizer, prompts_only=cfg.stage.prompts_only)
n = len(bundle.train)
touched = sum(len(bundle.train[i]["input_ids"]) for i in range(0, n, max(n // 1000, 1)))  # read rows back
seconds = time.perf_counter() - start
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
status = open("/proc/self/status").read()
anon = int(status.split("RssAnon:")[1].split()[0])  # private memory now, without the mapped cache pages
print("RESULT " + json.dumps({"seconds": seconds, "peak_gib": peak / 2**20, "anon_gib": anon / 2**20,
                              "train_rows": n, "eval_rows": len(bundle.eval),
                              "stats": bundle.stats, "cached": "from_cache" in bundle.stats}))
"""


def make_instructions(path: Path, rows: int, rng: random.Random) -> None:
    with path.open("w") as f:
        for i in range(rows):
            a, b = rng.randrange(1000), rng.randrange(1000)
            kind = i % 3
            if kind == 0:
                row = {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
            elif kind == 1:
                words = rng.sample(WORDS, 6)
                row = {"instruction": "Sort these words alphabetically.", "input": " ".join(words),
                       "output": " ".join(sorted(words))}
            else:
                words = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(8, 40)))
                row = {"instruction": "Repeat the sentence in upper case.", "input": words, "output": words.upper()}
            f.write(json.dumps(row) + "\n")


def make_corpus(path: Path, gib: float, rng: random.Random) -> int:
    target, written, docs = int(gib * 2**30), 0, 0
    with path.open("w") as f:
        while written < target:
            sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(6, 24))).capitalize() + "."
                         for _ in range(rng.randrange(10, 60))]
            line = json.dumps({"text": " ".join(sentences)}) + "\n"
            f.write(line)
            written += len(line)
            docs += 1
    return docs


def run_build(overrides: list[str], cache: Path) -> dict:
    env = {**os.environ, "FTUNE_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(overrides)], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"build failed:\n{out.stderr[-3000:]}")
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])


def folder_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in (cache / "data").rglob("*") if p.is_file())


def measure(name: str, overrides: list[str], work: Path, cached_only: bool = False, before: dict | None = None) -> dict:
    cache = work / f"cache-{name}"
    if cached_only:  # the first build's figures from the last report; the cached build measured again
        second = run_build(overrides, cache)
        assert second["cached"], f"{name}: no cache under {cache}"
        return {**before, "second": second}
    (cache / "models").parent.mkdir(parents=True, exist_ok=True)
    user_models = Path.home() / ".cache" / "ftune" / "models"
    if user_models.is_dir() and not (cache / "models").exists():
        (cache / "models").symlink_to(user_models)  # the converted default model, not re-made
    first = run_build(overrides, cache)
    size = folder_bytes(cache)
    second = run_build(overrides, cache)
    print(f"{name}: first {first['seconds']:.0f} s, {first['peak_gib']:.2f} GiB; cached {second['seconds']:.1f} s, "
          f"{second['peak_gib']:.2f} GiB ({second['anon_gib']:.2f} GiB private); cache {size / 2**30:.2f} GiB", flush=True)
    return {"first": first, "second": second, "cache_bytes": size}


def write_report(results: dict, out: Path) -> None:
    lines = ["# Data preparation at scale", "",
             f"Made by `scripts/bench_data.py` on {results['machine']}, {results['date']}. Each build is a fresh process "
             "running `data.build.build` (what `ftune train` runs before training); the second build of each finds the "
             "Arrow cache the first wrote. Peak memory: peak resident set of the process or its largest worker "
             "(getrusage); it counts the pages of the memory-mapped cache the process touched, which the kernel "
             "drops under pressure, so the private memory at the end (RssAnon) is given too.", "",
             "| data | build | wall time | peak memory | private at end | rows | tokens | cache on disk |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        t = r["first"]["stats"]["train"]
        tokens = t.get("tokens", 0) + r["first"]["stats"]["eval"].get("tokens", 0)
        for label, b in (("first (tokenise, write)", r["first"]), ("second (cached)", r["second"])):
            lines.append(f"| {results['inputs'][name]} | {label} | {b['seconds']:.1f} s | {b['peak_gib']:.2f} GiB | "
                         + (f"{b['anon_gib']:.2f} GiB | " if "anon_gib" in b else "— | ") +
                         f"{b['train_rows']:,} train + {b['eval_rows']:,} held-out | {tokens:,} | "
                         f"{r['cache_bytes'] / 2**30:.2f} GiB |")
    lines += ["", f"num_proc={results['num_proc']} ({os.cpu_count()} cores). Rows: samples (instructions) or packed rows of "
              "2048 tokens (corpus). The corpus keeps every token: tokens read "
              f"{results['runs']['corpus']['first']['stats']['train'].get('tokens_read', 0):,} (train split), none cut.", ""]
    out.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--corpus-gb", type=float, default=2.0)
    ap.add_argument("--num-proc", type=int, default=0, help="dataset.num_proc (0: one per core)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the generated data and caches (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "data.md")
    ap.add_argument("--cached-only", action="store_true",
                    help="measure the cached builds again (the caches under --work and the first builds of --out's json)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ftune-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    instr, corpus = work / "instructions.jsonl", work / "corpus.jsonl"
    t = time.perf_counter()
    if not instr.is_file():
        make_instructions(instr, args.rows, rng)
    if not corpus.is_file():
        make_corpus(corpus, args.corpus_gb, rng)
    print(f"data generated in {time.perf_counter() - t:.0f} s under {work}", flush=True)
    common = [f"dataset.num_proc={args.num_proc}", "dataset.eval_max_rows=200"]
    before = json.loads(args.out.with_suffix(".json").read_text())["runs"] if args.cached_only else {}
    runs = {
        "instructions": measure("instructions", ["dataset.name=bench-instr", f"dataset.sources.0.path={instr}",
                                                 "dataset.eval_fraction=0.001", *common], work, args.cached_only,
                                before.get("instructions")),
        "corpus": measure("corpus", ["recipe=smollm2-lora-pt", "dataset.name=bench-corpus", f"dataset.sources.0.path={corpus}",
                                     "dataset.max_seq_len=2048", "dataset.eval_fraction=0.0001", *common], work,
                          args.cached_only, before.get("corpus")),
    }
    results = {"machine": f"{platform.machine()} {platform.processor() or 'CPU'}, {os.cpu_count()} cores",
               "date": time.strftime("%Y-%m-%d"), "num_proc": args.num_proc, "runs": runs,
               "inputs": {"instructions": f"{args.rows:,} alpaca rows ({instr.stat().st_size / 2**20:.0f} MiB)",
                          "corpus": f"raw text, {corpus.stat().st_size / 2**30:.2f} GiB JSONL"}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    write_report(results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
