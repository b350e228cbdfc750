"""Accuracy benchmark: does an adapter trained by ftune score as well as one trained by
transformers + peft + trl's SFTTrainer on the same rows? Writes bench/accuracy.md and
bench/accuracy.json.

    .venv/bin/python scripts/bench_accuracy.py                        # 3 seeds x 60 steps, 300 test prompts
    .venv/bin/python scripts/bench_accuracy.py --seeds 1 --steps 4 --test-n 20   # a quick trial
    make bench-accuracy                                               # the same as the first line
    make bench                                                        # the speed arm (scripts/bench.py), then this

Task (scripts/bench_accuracy_data.py): structured extraction from real records available offline,
the METADATA text of the Python distributions installed on this machine -> a JSON object of a few
header fields; train and test distributions disjoint; ~230-token prompts.

Arms, per seed (train.seed; it also decides ftune's data order, which the baseline is fed):
- ftune: `ftune train` with the default recipe (smollm2-lora-sft: LoRA r=16 alpha 32 on all
  linear layers, bf16 on CPU), the dataset overridden, dataset.packing=false, lr 2e-4 cosine with
  the recipe's 5% warmup, N steps x 8 samples;
- baseline: SFTTrainer fed the same tokenised rows in the same order with the same settings
  (scripts/bench_baseline.py's SFTConfig and LoraConfig; the model loaded as trl loads it).

Scoring is the same for both adapters, in its own process each: the converted base in float32 +
the peft adapter (merged), greedy decoding of the test prompts rendered by the tokenizer's chat
template (left-padded batches), the same max_new_tokens, and exact match of the parsed JSON
against the reference object (key order ignored; unparsable output is wrong).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_accuracy_data import build, write_jsonl
from bench_accuracy_report import write_report
from bench_baseline import held_out_loss, lora_config, sft_config
from bench_workload import Settings, ftune_overrides, load_samples, model_folder, step_rows

# The bench scripts run as scripts (`python scripts/<name>.py`), so Python puts scripts/ first on the
# path and they import each other by name.
from bench import run_process
from ftune.config.compose import compose

ROOT = Path(__file__).resolve().parent.parent
MARK = "ACCURACY_RESULT "
DATA = ROOT / "bench" / "accuracy_data"


# ----------------------------------------------------------------------------- the arms' configs
def arm_overrides(s: Settings, seed: int, lr: float, train_file: Path, output_dir: str, name: str,
                  threads: int = 0, eval_rows: int = 16) -> list[str]:
    """ftune's command line for one seed (the baseline composes the same config)."""
    return [*ftune_overrides(s, packed=False, output_dir=output_dir, run_name=name),
            f"dataset.sources=[{{path: {train_file}, format: alpaca}}]", "dataset.name=pkg-metadata",
            f"dataset.eval_max_rows={eval_rows}", f"hardware.threads={threads}",
            f"train.lr={lr}", f"train.seed={seed}", "train.overwrite=true"]


def compose_cfg(overrides: list[str]):

    return compose(overrides).cfg


# ----------------------------------------------------------------------------- workers
def train_baseline(s: Settings, overrides: list[str], out_dir: Path) -> dict:
    """SFTTrainer on ftune's rows in ftune's order; the adapter saved to out_dir."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from trl import SFTTrainer

    cfg = compose_cfg(overrides)
    train_rows, eval_rows, tokenizer = load_samples(cfg)
    steps = step_rows(len(train_rows), cfg, s.steps)
    ordered = [train_rows[i] for rows in steps for i in rows]
    dataset = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in ordered])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as tmp:
        trainer = SFTTrainer(model=model_folder(cfg), args=sft_config(cfg, s, tmp), train_dataset=dataset,
                             processing_class=tokenizer, peft_config=lora_config(cfg))
        assert len(trainer.train_dataset) == len(ordered), "SFTTrainer changed the rows"
        same = all(a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
                   for a, b in zip(trainer.train_dataset, ordered))
        dtypes = sorted({str(p.dtype) for p in trainer.model.parameters()})
        trainer.train()
        history = trainer.state.log_history
        eval_after = held_out_loss(trainer.model, eval_rows, cfg.train.micro_batch_size, tokenizer.pad_token_id,
                                   "cpu", cfg.hardware.precision)
        trainer.model.save_pretrained(out_dir)
    return {"losses": [h["loss"] for h in history if "loss" in h],
            "lrs": [h["learning_rate"] for h in history if "learning_rate" in h],
            "grad_norms": [h.get("grad_norm") for h in history if "loss" in h],
            "eval_loss_after": eval_after, "rows_identical": same, "param_dtypes": dtypes,
            "train_seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}


def render_prompts(rows: list[dict], tokenizer) -> list[list[int]]:
    """The prompt each answer is generated from: the tokenizer's chat template (as ftune renders
    training rows with template=model), one user turn, generation prompt added."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}],
                                           tokenize=False, add_generation_prompt=True) for r in rows]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def parse(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def score(adapter: str, test_file: Path, test_n: int, batch: int, max_new: int, base: str, dtype: str,
          with_loss: bool = True) -> dict:
    """Greedy answers to the first test_n test prompts with the adapter merged into the fp32 base
    (then cast to `dtype` for decoding)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    rows = [json.loads(line) for line in test_file.read_text().splitlines() if line.strip()][:test_n]
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()  # merged in fp32
    model = model.to(DTYPES[dtype]).eval()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompts = render_prompts(rows, tokenizer)
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    answers: dict[int, str] = {}
    start = time.perf_counter()
    with torch.no_grad():
        for k in range(0, len(order), batch):
            idx = order[k:k + batch]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx])
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=[eos], pad_token_id=pad, use_cache=True)
            for i, seq in zip(idx, out[:, width:].tolist()):
                if eos in seq:
                    seq = seq[:seq.index(eos)]
                answers[i] = tokenizer.decode(seq, skip_special_tokens=True).strip()
    gen_seconds = time.perf_counter() - start
    nll = (answer_nll(model, tokenizer, rows, prompts, order, batch, eos, pad) if with_loss
           else {i: (float("nan"), 0) for i in range(len(rows))})
    results = []
    for i, row in enumerate(rows):
        ref, got = json.loads(row["output"]), parse(answers[i])
        fields = {k: isinstance(got, dict) and k in got and got[k] == v for k, v in ref.items()}
        results.append({"i": i, "dist": row["dist"], "task": row["task"], "exact": got == ref,
                        "parsed": got is not None, "fields": fields, "answer": answers[i],
                        "nll": nll[i][0], "answer_tokens": nll[i][1]})
    n = len(results)
    return {"n": n, "exact_match": sum(r["exact"] for r in results) / n,
            "parsed": sum(r["parsed"] for r in results) / n,
            "field_accuracy": sum(sum(r["fields"].values()) for r in results) / sum(len(r["fields"]) for r in results),
            **({"answer_loss": sum(x[0] for x in nll.values()) / sum(x[1] for x in nll.values())} if with_loss else {}),
            "gen_seconds": gen_seconds, "loss_seconds": time.perf_counter() - start - gen_seconds, "items": results}


def answer_nll(model, tokenizer, rows: list[dict], prompts: list[list[int]], order: list[int], batch: int, eos: int,
               pad: int) -> dict[int, tuple[float, int]]:
    """Teacher-forced loss of each reference answer (its tokens and <|im_end|>) after its prompt:
    (sum of token losses, tokens), in the decoding dtype with fp32 log-softmax."""

    answers = tokenizer([r["output"] for r in rows], add_special_tokens=False)["input_ids"]
    out = {}
    with torch.no_grad():
        for k in range(0, len(order), batch):
            idx = order[k:k + batch]
            seqs = [prompts[i] + answers[i] + [eos] for i in idx]
            width = max(map(len, seqs))
            ids = torch.tensor([q + [pad] * (width - len(q)) for q in seqs])
            mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs])
            logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
            for j, i in enumerate(idx):
                a, z = len(prompts[i]), len(seqs[j])
                target = ids[j, a:z]
                out[i] = (float(-logp[j, a - 1:z - 1].gather(1, target[:, None]).sum()), z - a)
    return out


# ----------------------------------------------------------------------------- the driver
ANSWER_LOSS = True  # score workers also compute the teacher-forced loss of the reference answers
THREAD_ENV: dict = {}  # OMP_NUM_THREADS for every child when --threads is given


def run_worker(args: list[str], log: Path, timeout: int) -> dict:
    proc = run_process([sys.executable, str(Path(__file__).resolve()), *args], log, timeout, THREAD_ENV)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.code != 0 or not lines:
        raise RuntimeError(f"worker {args[:2]} exited {proc.code}; log: {log}")
    return {**json.loads(lines[-1][len(MARK):]), "wall_seconds": proc.wall_seconds, "peak_rss_gib": proc.peak_rss_gib,
            "other_cpu": proc.other_cpu}


def train_ftune(overrides: list[str], run_dir: Path, log: Path, timeout: int) -> dict:
    proc = run_process([sys.executable, "-m", "ftune.cli", "train", *overrides], log, timeout, THREAD_ENV)
    if proc.code != 0:
        raise RuntimeError(f"ftune train exited {proc.code}; log: {log}")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "loss" in r]
    return {"losses": [r["loss"] for r in steps], "lrs": [r["lr"] for r in steps],
            "grad_norms": [r.get("grad_norm") for r in steps], "target_tokens": [r["target_tokens"] for r in steps],
            "eval_loss_before": summary.get("eval_loss_before"), "eval_loss_after": summary.get("eval_loss_after"),
            "train_seconds": sum(r["step_seconds"] for r in steps), "wall_seconds": proc.wall_seconds,
            "peak_rss_gib": proc.peak_rss_gib, "other_cpu": proc.other_cpu}


def paired(a: list[dict], b: list[dict]) -> dict:
    """Prompts right in one arm only, and an exact McNemar p-value (two-sided binomial)."""
    only_a = sum(x["exact"] and not y["exact"] for x, y in zip(a, b))
    only_b = sum(y["exact"] and not x["exact"] for x, y in zip(a, b))
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(0, min(only_a, only_b) + 1)) / 2 ** n if n else 1.0
    return {"only_ftune": only_a, "only_baseline": only_b, "both": sum(x["exact"] and y["exact"] for x, y in zip(a, b)),
            "neither": sum(not x["exact"] and not y["exact"] for x, y in zip(a, b)), "mcnemar_p": min(1.0, 2 * tail)}


def mean_sd(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return m, sd


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3", help="comma-separated train.seed values")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--test-n", type=int, default=300, help="test prompts scored (of the shuffled test file)")
    p.add_argument("--batch", type=int, default=8, help="samples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=112)
    p.add_argument("--score-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="weights the merged model decodes in (both arms alike); bf16: ~4x faster on CPU")
    p.add_argument("--threads", type=int, default=0, help="torch threads of every run (0: all cores)")
    p.add_argument("--eval-rows", type=int, default=16, help="dataset.eval_max_rows: held-out rows for the loss")
    p.add_argument("--arms", default="ftune,baseline")
    p.add_argument("--no-base", action="store_true", help="skip scoring the untrained base model")
    p.add_argument("--no-answer-loss", action="store_true",
                   help="skip the teacher-forced answer loss (about as long as the decoding)")
    p.add_argument("--timeout", type=int, default=2400, help="seconds one worker may take")
    p.add_argument("--workdir", default="")
    p.add_argument("--out", type=Path, default=ROOT / "bench")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="merge the runs of earlier accuracy.json files (seeds or arms run separately, e.g. "
                        "at the same time) into --out, with the summary and report; trains nothing")
    p.add_argument("--worker", choices=["baseline", "score"], help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        job = json.loads(args.job)
        if args.worker == "baseline":
            result = train_baseline(Settings.from_json(job["settings"]), job["overrides"], Path(job["out"]))
        else:
            result = score(job["adapter"], Path(job["test"]), job["test_n"], job["batch"], job["max_new"], job["base"],
                           job["dtype"], job.get("answer_loss", ANSWER_LOSS))
        print(MARK + json.dumps(result), flush=True)
        return

    if args.merge:
        merge(args.merge, args.out)
        return

    if args.threads:
        THREAD_ENV["OMP_NUM_THREADS"] = str(args.threads)
    seeds = [int(x) for x in args.seeds.split(",")]
    arms = args.arms.split(",")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ftune-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    s = Settings(steps=args.steps, batch=args.batch, grad_accum=args.grad_accum, compile="false", seq_len=512,
                 arms=arms, timeout_s=args.timeout)
    base = model_folder(compose_cfg(ftune_overrides(s, packed=False)))
    t0 = time.perf_counter()
    train, test, dists = build(base)
    write_jsonl(train, DATA / "train.jsonl")
    write_jsonl(test, DATA / "test.jsonl")
    print(f"data: {len(train)} train prompts ({len(dists['train'])} distributions), {len(test)} test prompts "
          f"({len(dists['test'])} distributions), {time.perf_counter() - t0:.0f} s; work dir {work}", flush=True)
    test_n = min(args.test_n, len(test))

    def scored(adapter: str, name: str) -> dict:
        job = {"adapter": adapter, "test": str(DATA / "test.jsonl"), "test_n": test_n, "batch": args.gen_batch,
               "max_new": args.max_new_tokens, "base": base,
               "dtype": args.score_dtype, "answer_loss": not args.no_answer_loss}
        r = run_worker(["--worker", "score", "--job", json.dumps(job)], work / f"score-{name}.log", args.timeout)
        print(f"  score {name:14s} exact {r['exact_match']:.3f}  parsed {r['parsed']:.3f}  fields "
              f"{r['field_accuracy']:.3f}  ({r['gen_seconds']:.0f} s)", flush=True)
        return r

    results = {"settings": {**vars(args), "out": str(args.out), "seeds": seeds, "test_n": test_n, "seq_len": s.seq_len,
                            "model_folder": base, "workdir": str(work)},
               "data": {"train_prompts": len(train), "test_prompts": len(test), "train_distributions": len(dists["train"]),
                        "test_distributions": len(dists["test"])},
               "runs": {}}
    if not args.no_base:
        results["base"] = scored("", "base")
    for k, seed in enumerate(seeds):
        overrides = arm_overrides(s, seed, args.lr, DATA / "train.jsonl", str(work), f"ftune-s{seed}", args.threads,
                                  args.eval_rows)
        run = results["runs"].setdefault(str(seed), {})
        for arm in (arms if k % 2 == 0 else list(reversed(arms))):  # alternate which arm goes first
            print(f"seed {seed}: training {arm}", flush=True)
            if arm == "ftune":
                trained = train_ftune(overrides, work / f"ftune-s{seed}", work / f"ftune-s{seed}.log", args.timeout)
                adapter = str(work / f"ftune-s{seed}" / "adapter")
            else:
                adapter = str(work / f"baseline-s{seed}")
                job = {"settings": s.to_json(), "overrides": overrides, "out": adapter}
                trained = run_worker(["--worker", "baseline", "--job", json.dumps(job)], work / f"baseline-s{seed}.log",
                                     args.timeout)
            print(f"  trained {arm}: final loss {trained['losses'][-1]:.4f}, held-out {trained['eval_loss_after']:.4f}, "
                  f"{trained['train_seconds']:.0f} s", flush=True)
            run[arm] = {"train": trained, "score": scored(adapter, f"{arm}-s{seed}")}
        # After every seed: the summary and report of the seeds done so far (an interrupted run keeps them).
        done = seeds[:k + 1]
        results["settings"]["seeds_done"] = done
        results["summary"] = summarise(results, done, arms)
        results["total_seconds"] = time.perf_counter() - t0
        results["finished"] = time.strftime("%Y-%m-%d %H:%M")
        _save(results, args.out)

        (args.out / "accuracy.md").write_text(write_report(results))
    print(json.dumps(results["summary"], indent=2))


def summarise(results: dict, seeds: list[int], arms: list[str]) -> dict:
    out: dict = {"per_seed": {}}
    for arm in arms:
        em = [results["runs"][str(sd)][arm]["score"]["exact_match"] for sd in seeds]
        fa = [results["runs"][str(sd)][arm]["score"]["field_accuracy"] for sd in seeds]
        m, sd = mean_sd(em)
        out[arm] = {"exact_match": em, "mean": m, "sd": sd, "min": min(em), "max": max(em),
                    "field_accuracy_mean": sum(fa) / len(fa),
                    "eval_loss_after": [results["runs"][str(x)][arm]["train"]["eval_loss_after"] for x in seeds],
                    "final_loss_mean_last5": [sum(results["runs"][str(x)][arm]["train"]["losses"][-5:]) / 5 for x in seeds]}
    if {"ftune", "baseline"} <= set(arms):
        diffs, pooled = [], {"only_ftune": 0, "only_baseline": 0}
        for sd in seeds:
            r = results["runs"][str(sd)]
            pr = paired(r["ftune"]["score"]["items"], r["baseline"]["score"]["items"])
            diffs.append(r["ftune"]["score"]["exact_match"] - r["baseline"]["score"]["exact_match"])
            out["per_seed"][str(sd)] = {"diff": diffs[-1], **pr}
            pooled["only_ftune"] += pr["only_ftune"]
            pooled["only_baseline"] += pr["only_baseline"]
            steps_a, steps_b = r["ftune"]["train"]["losses"], r["baseline"]["train"]["losses"]
            out["per_seed"][str(sd)]["step_loss_diff_mean"] = sum(a - b for a, b in zip(steps_a, steps_b)) / len(steps_a)
            out["per_seed"][str(sd)]["step1_loss"] = [steps_a[0], steps_b[0]]
        m, sd = mean_sd(diffs)
        n = pooled["only_ftune"] + pooled["only_baseline"]
        lo = min(pooled.values())
        p = min(1.0, 2 * sum(math.comb(n, k) for k in range(lo + 1)) / 2 ** n) if n else 1.0
        out["paired"] = {"diff_mean": m, "diff_sd": sd, "diffs": diffs, **pooled, "pooled_sign_test_p": p}
    return out


def merge(paths: list[Path], out: Path) -> None:
    """One accuracy.json from several: runs by seed and arm (a later file adds arms and seeds, it
    never replaces a run), settings of the first, each file's own settings kept under `parts`."""
    parts = [json.loads(p_.read_text()) for p_ in paths]
    results = {k: v for k, v in parts[0].items() if k not in ("runs", "summary")}
    results["runs"], results["parts"] = {}, []
    for part in parts:
        results["parts"].append({"settings": part["settings"], "finished": part.get("finished"),
                                 "seeds_arms": {sd: sorted(run) for sd, run in part["runs"].items()}})
        for sd, run in part["runs"].items():
            for arm, value in run.items():
                results["runs"].setdefault(sd, {}).setdefault(arm, value)
    seeds = sorted(int(sd) for sd in results["runs"])
    arms = [a for a in ("ftune", "baseline") if all(a in results["runs"][str(sd)] for sd in seeds)]
    results["settings"] = {**results["settings"], "seeds": seeds, "seeds_done": seeds, "arms": ",".join(arms)}
    results["summary"] = summarise(results, seeds, arms)
    results["finished"] = max(part.get("finished") or "" for part in parts)
    results["total_seconds"] = sum(part.get("total_seconds", 0) for part in parts)
    _save(results, out)

    (out / "accuracy.md").write_text(write_report(results))
    print(json.dumps(results["summary"], indent=2))


def _save(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
