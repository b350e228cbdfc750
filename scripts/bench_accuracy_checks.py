"""What differs by design between the two arms of scripts/bench_accuracy.py, checked on the real
model and the accuracy task's rows (seed 1, the first step's rows). Writes bench/accuracy_checks.json.

    .venv/bin/python scripts/bench_accuracy_checks.py

1. precision: the dtypes each arm trains with, and the first step's loss and LoRA-B gradient of
   each arm's model against an fp32 reference (the same LoRA init, the same 8 rows);
2. attention isolation in ftune's padding-free micro-batches (samples sharing a row);
3. the prompt: ftune's rendering of a row (template=model, the tokenizer's chat template with its
   default system prompt) against the scorer's prompt tokens, for every test prompt;
4. end of turn: which answer tokens carry a loss, in ftune's rows and after trl's collator;
5. LoRA init from the same seed in both arms;
6. loss normalisation: trl's compute_loss with num_items_in_batch against ftune's sum / targets.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from bench_accuracy import DATA, arm_overrides, compose_cfg, render_prompts  # scripts/ is on the path (run as a script)
from bench_baseline import lora_config, sft_config
from bench_workload import Settings, load_samples, model_folder, step_rows

from ftune.data import formats
from ftune.data.build import tokenize_records
from ftune.data.collate import collate, collate_padding_free
from ftune.methods import apply as apply_method
from ftune.methods.fused_lora import fuse_lora_layers
from ftune.methods.peft_methods import keep_activation_dtype
from ftune.models import load as model_load
from ftune.train.objectives.causal_lm import causal_lm
from ftune.train.run import seed_everything

ROOT = Path(__file__).resolve().parent.parent
IGNORE = -100


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b|"""
    return float((a.double() - b.double()).norm() / b.double().norm())


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n.replace("base_model.model.", ""): p.grad.detach().float().clone()
            for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def attention_isolation(cfg, train_rows: list[dict], tok, base: str) -> dict:
    """The first step whose padding-free micro-batch puts several samples in one row: each
    sample's fp32 logits there against the sample run alone (no adapter)."""
    from transformers import AutoModelForCausalLM


    steps = step_rows(len(train_rows), cfg, 60)
    rows_per_step = [collate_padding_free([train_rows[i] for i in st], tok.pad_token_id)["input_ids"].shape[0]
                     for st in steps]
    k_step = next(k for k, n in enumerate(rows_per_step) if n < len(steps[k]))
    samples = [train_rows[i] for i in steps[k_step]]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    pf = collate_padding_free(samples, tok.pad_token_id)
    worst, checked, in_shared = 0.0, 0, 0
    with torch.no_grad():
        logits = model(input_ids=pf["input_ids"], position_ids=pf["position_ids"], use_cache=False).logits  # noqa: E501 (as causal_lm calls it)
        for r_i in range(pf["input_ids"].shape[0]):
            pos = pf["position_ids"][r_i].tolist()
            starts = [i for i, p_ in enumerate(pos) if p_ == 0] + [len(pos)]
            found = 0
            for a, z in zip(starts, starts[1:]):
                ids = pf["input_ids"][r_i, a:z]
                if not any(r["input_ids"] == ids.tolist() for r in samples):
                    continue  # the padding tail
                alone = model(input_ids=ids[None], use_cache=False).logits[0]
                worst = max(worst, float((logits[r_i, a:z] - alone).abs().max()))
                checked += 1
                found += 1
            in_shared += found if found > 1 else 0
    return {"steps_with_shared_rows_of_60": sum(n < len(st) for n, st in zip(rows_per_step, steps)),
            "rows_per_step_min_max": [min(rows_per_step), max(rows_per_step)], "checked_step": k_step + 1,
            "rows": int(pf["input_ids"].shape[0]), "samples_checked": checked, "samples_in_shared_rows": in_shared,
            "max_abs_logit_diff_shared_row_vs_alone": worst}


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer


    out: dict = {}
    s = Settings(steps=60, batch=8, compile="false", seq_len=512)
    seed = 1
    with tempfile.TemporaryDirectory() as tmp:
        overrides = arm_overrides(s, seed, 2e-4, DATA / "train.jsonl", tmp, "checks")
        cfg = compose_cfg(overrides)
        base = model_folder(cfg)
        train_rows, _, tok = load_samples(cfg)
        step1 = [train_rows[i] for i in step_rows(len(train_rows), cfg, 1)[0]]

        # ---------------------------------------------------------------- 3. the prompt
        row = step1[0]
        first_target = next(i for i, x in enumerate(row["labels"]) if x != IGNORE)
        out["prompt"] = {"row0_rendered_start": tok.decode(row["input_ids"][:40]),
                         "row0_answer_and_end": tok.decode(row["input_ids"][first_target:])}
        test = [json.loads(x) for x in (DATA / "test.jsonl").read_text().splitlines() if x.strip()]
        records = formats.to_records([{k: r[k] for k in ("instruction", "input", "output")} for r in test], "alpaca",
                                     {}, None, "test")
        ftune_test, _ = tokenize_records(records, cfg.dataset, tok)
        scorer = render_prompts(test, tok)
        same = sum(r["input_ids"][:next(i for i, x in enumerate(r["labels"]) if x != IGNORE)] == p
                   for r, p in zip(ftune_test, scorer))
        out["prompt"].update({"test_prompts": len(test), "scorer_prompt_equals_ftune_prompt": same,
                              "system_prompt_in_every_train_row": sum(
                                  "You are a helpful AI assistant named SmolLM" in tok.decode(r["input_ids"][:30])
                                  for r in train_rows), "train_rows": len(train_rows)})

        # ---------------------------------------------------------------- 4. end of turn
        eot = tok.convert_tokens_to_ids("<|im_end|>")
        tails = []
        for r in train_rows:
            labelled = [x for x in r["labels"] if x != IGNORE]
            tails.append(tok.convert_ids_to_tokens(labelled[-2:]))
        out["end_of_turn"] = {"labelled_tail_tokens_row0": tails[0],
                              "rows_with_im_end_labelled": sum(t[0] == "<|im_end|>" for t in tails),
                              "rows_with_trailing_newline_labelled": sum(t[-1] == "Ċ" for t in tails),
                              "im_end_id": eot}

        # ---------------------------------------------------------------- the baseline's model (trl)
        from datasets import Dataset

        dataset = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in step1])
        trainer = SFTTrainer(model=base, args=sft_config(cfg, s, tmp + "/trl"), train_dataset=dataset,
                             processing_class=tok, peft_config=lora_config(cfg))
        trl_model = trainer.model
        trl_batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
        trl_labels_ok = all(
            trl_batch["labels"][i, :len(r["labels"])].tolist() == r["labels"]
            and bool((trl_batch["labels"][i, len(r["labels"]):] == IGNORE).all()) for i, r in enumerate(step1))
        out["end_of_turn"]["trl_collator_labels_equal_ftune_labels"] = trl_labels_ok

        # ---------------------------------------------------------------- ftune's model, as `ftune train` builds it
        seed_everything(cfg.train.seed)
        if cfg.hardware.threads:
            torch.set_num_threads(cfg.hardware.threads)
        ft_model, _ = model_load.load(cfg, torch.device("cpu"))
        ft_model = apply_method(ft_model, cfg, None)
        keep_activation_dtype(ft_model)
        fused = fuse_lora_layers(ft_model) if cfg.hardware.fused_ops else 0

        def dtypes(m: torch.nn.Module) -> dict:
            counts: dict = {}
            for n, p in m.named_parameters():
                kind = "trainable" if p.requires_grad else ("norm" if "norm" in n else "frozen")
                counts.setdefault(kind, {}).setdefault(str(p.dtype).removeprefix("torch."), 0)
                counts[kind][str(p.dtype).removeprefix("torch.")] += p.numel()
            return counts

        out["precision"] = {"ftune_params": dtypes(ft_model), "baseline_params": dtypes(trl_model),
                            "ftune_fused_lora_layers": fused}

        # ---------------------------------------------------------------- 5. LoRA init
        ft_a = {n.replace("base_model.model.", ""): p.detach().float() for n, p in ft_model.named_parameters()
                if p.requires_grad}
        trl_a = {n.replace("base_model.model.", ""): p.detach().float() for n, p in trl_model.named_parameters()
                 if p.requires_grad}
        same_names = sorted(set(ft_a) & set(trl_a))
        out["lora_init"] = {"tensors": len(ft_a), "common": len(same_names),
                            "max_abs_diff": max(float((ft_a[n] - trl_a[n]).abs().max()) for n in same_names),
                            "lora_B_all_zero": all(float(ft_a[n].abs().max()) == 0 for n in same_names if "lora_B" in n)}

        # ---------------------------------------------------------------- 1. first step: loss and gradient
        n_targets = sum(int((torch.tensor(r["labels"][1:]) != IGNORE).sum()) for r in step1)
        ft_batch = collate_padding_free(step1, tok.pad_token_id)
        ft_model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_sum, n = causal_lm(ft_model, ft_batch)
        (loss_sum / n).backward()
        g_ft = lora_grads(ft_model)
        ft_loss = float(loss_sum) / n

        trl_model.train()
        inputs = {k: v for k, v in trl_batch.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            trl_loss = trainer.compute_loss(trl_model, inputs, num_items_in_batch=torch.tensor(n_targets))
        trl_loss.backward()
        g_trl = lora_grads(trl_model)

        # fp32 reference: fp32 base, no autocast, plain peft, same LoRA init
        ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        ref = get_peft_model(ref, lora_config(cfg))
        with torch.no_grad():
            for name, p in ref.named_parameters():
                key = name.replace("base_model.model.", "")
                if p.requires_grad:
                    p.copy_(trl_a[key])
        ref.train()
        b = collate(step1, tok.pad_token_id)
        logits = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), b["labels"][:, 1:].reshape(-1),
                                                     ignore_index=IGNORE, reduction="sum") / n_targets
        ref_loss.backward()
        g_ref = lora_grads(ref)
        names = sorted(set(g_ref) & set(g_ft) & set(g_trl))
        cat = lambda g: torch.cat([g[k].flatten() for k in names])  # noqa: E731
        out["first_step"] = {
            "targets": n_targets, "ftune_targets_counted": n,
            "loss": {"ftune": ft_loss, "baseline": float(trl_loss), "fp32_reference": float(ref_loss)},
            "grad_vs_fp32": {"ftune_cos": cos(cat(g_ft), cat(g_ref)), "baseline_cos": cos(cat(g_trl), cat(g_ref)),
                             "ftune_rel_err": rel(cat(g_ft), cat(g_ref)), "baseline_rel_err": rel(cat(g_trl), cat(g_ref)),
                             "ftune_vs_baseline_cos": cos(cat(g_ft), cat(g_trl))},
            "grad_norm": {"ftune": float(cat(g_ft).norm()), "baseline": float(cat(g_trl).norm()),
                          "fp32_reference": float(cat(g_ref).norm())},
            "tensors_compared": len(names)}

        # ---------------------------------------------------------------- 2. attention isolation
        out["attention_isolation"] = attention_isolation(cfg, train_rows, tok, base)

        # ---------------------------------------------------------------- 6. loss normalisation (trl, accumulation)
        out["loss_normalisation"] = {
            "ftune": "sum of token losses of every micro-batch / target tokens of the whole step (trainer.train_step)",
            "trl": "SFTTrainer.compute_loss: per-token loss sum / num_items_in_batch, which transformers' Trainer "
                   "counts over all micro-batches of the accumulated step (labels != -100)",
            "trl_loss_equals_sum_over_targets": abs(float(trl_loss) - out["first_step"]["loss"]["baseline"]) < 1e-9,
        }
    path = ROOT / "bench" / "accuracy_checks.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(out, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    if sys.argv[1:] == ["--attention-only"]:  # rerun check 2 alone, into the existing JSON
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        s = Settings(steps=60, batch=8, compile="false", seq_len=512)
        cfg = compose_cfg(arm_overrides(s, 1, 2e-4, DATA / "train.jsonl", "/tmp", "checks"))
        rows, _, tok = load_samples(cfg)
        path = ROOT / "bench" / "accuracy_checks.json"
        out = json.loads(path.read_text()) if path.is_file() else {}
        out["attention_isolation"] = attention_isolation(cfg, rows, tok, model_folder(cfg))
        path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
        print(json.dumps(out["attention_isolation"], indent=1))
    else:
        main()
