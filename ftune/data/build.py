"""dataset config -> tokenised train and held-out samples, cached on disk.

Order of work: read every source, convert rows to canonical records, split off the held-out rows
(per source, seeded, before weighting so a repeated row never lands on both sides), apply mixing
weights, render with the template, tokenise, then pack. Everything from the records on is cached
under a key that hashes all inputs that change the result, so a rerun does not tokenise again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftune import resources
from ftune.config.schema import DatasetConfig, SourceConfig
from ftune.data import formats, sources, templates
from ftune.data.badrows import FAIL, BadRows
from ftune.data.packing import pack
from ftune.data.tokenize import TokenStats, tokenize_all
from ftune.errors import FtuneError

CACHE_VERSION = "2"  # bump when tokenisation output changes for the same inputs


@dataclass
class DataBundle:
    """What the trainer needs: samples (packed rows when packing is on) and a few prompts to show."""

    train: list[dict]
    eval: list[dict]
    stats: dict[str, Any]
    eval_prompts: list[list[dict]] = field(default_factory=list)


def read_source(src: SourceConfig, index: int, bad: BadRows = FAIL) -> list[dict]:
    rows = sources.read_rows(src.path, src.split, src.subset, bad)
    return formats.to_records(rows, src.format, dict(src.columns), src.system, f"dataset.sources[{index}] ({src.path})", bad)


def weighted(records: list[dict], weight: float, rng: random.Random) -> list[dict]:
    """weight x records: whole repeats, then a seeded sample for the fractional part."""
    whole, frac = int(weight), weight - int(weight)
    out = records * whole
    if frac > 0:
        out += rng.sample(records, round(frac * len(records)))
    return out


def split_records(cfg: DatasetConfig, seed: int, bad: BadRows = FAIL) -> tuple[list[dict], list[dict]]:
    """(train, held-out) canonical records after splitting and mixing; bad rows go to `bad`."""
    rng = random.Random(seed)
    train, held = [], []
    for i, src in enumerate(cfg.sources):
        records = read_source(src, i, bad)
        rng.shuffle(records)
        n_eval = 0 if cfg.eval_path else min(round(cfg.eval_fraction * len(records)), len(records) - 1)
        held += records[:n_eval]
        train += weighted(records[n_eval:], src.weight, rng)
    if cfg.eval_path:
        first = cfg.sources[0]
        rows = sources.read_rows(cfg.eval_path, bad=bad)
        held = formats.to_records(rows, first.format, dict(first.columns), first.system,
                                  f"dataset.eval_path ({cfg.eval_path})", bad)
    rng.shuffle(train)
    if cfg.max_rows:
        train = train[: cfg.max_rows]
    if not train:
        raise FtuneError("dataset: no training rows left after the held-out split",
                         hint="Lower dataset.eval_fraction or add rows.")
    return train, held[: cfg.eval_max_rows]


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((body + str(tokenizer.chat_template) + str(tokenizer.eos_token)).encode()).hexdigest()


def cache_key(cfg: DatasetConfig, stage: str, seed: int, tokenizer: Any) -> str:
    template_file = (Path(str(cfg.template)).expanduser() if str(cfg.template).endswith((".yaml", ".yml"))
                     else resources.templates_dir() / f"{cfg.template}.yaml")
    parts = {
        "version": CACHE_VERSION,
        "dataset": dataclasses.asdict(cfg),
        "stage": stage,
        "seed": seed,
        "template": template_file.read_text() if template_file.is_file() else cfg.template,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "files": [sources.fingerprint(s.path) for s in cfg.sources]
        + ([sources.fingerprint(cfg.eval_path)] if cfg.eval_path else []),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def tokenize_records(records: list[dict], cfg: DatasetConfig, tokenizer: Any, prompts_only: bool = False
                     ) -> tuple[list[dict], TokenStats]:
    """prompts_only: the stage generates the answers, so rows are tokenised as prompts (PPO)."""
    template = templates.load_template(cfg.template)
    if prompts_only:
        return tokenize_prompts(records, template, cfg, tokenizer)
    if records and "chosen" in records[0]:
        return tokenize_pairs(records, template, cfg, tokenizer)
    if records and "completion" in records[0]:
        return tokenize_feedback(records, template, cfg, tokenizer)
    segment_lists = [templates.render(r, template, tokenizer) for r in records]
    return tokenize_all(segment_lists, tokenizer, cfg.max_seq_len, cfg.train_on)


def tokenize_pairs(records: list[dict], template: Any, cfg: DatasetConfig, tokenizer: Any) -> tuple[list[dict], TokenStats]:
    """Preference records -> {chosen_*, rejected_*} samples, each side masked like SFT (the final
    answer is the target). A pair is dropped when either side loses its answer to truncation."""
    sides = {}
    for side in ("chosen", "rejected"):
        convs = [{"messages": [*r["messages"], {"role": "assistant", "content": r[side]}]} for r in records]
        segs = [templates.render(c, template, tokenizer) for c in convs]
        sides[side], _ = tokenize_all(segs, tokenizer, cfg.max_seq_len, "last", drop_empty=False)
    stats, pairs = TokenStats(), []
    for c, r in zip(sides["chosen"], sides["rejected"]):
        if c is None or r is None:
            stats.dropped_no_target += 1
            continue
        pairs.append({"chosen": c, "rejected": r})
        stats.samples += 1
        stats.tokens += len(c["input_ids"]) + len(r["input_ids"])
        stats.trained_tokens += sum(x != -100 for x in c["labels"][1:]) + sum(x != -100 for x in r["labels"][1:])
    return pairs, stats


def tokenize_feedback(records: list[dict], template: Any, cfg: DatasetConfig, tokenizer: Any
                      ) -> tuple[list[dict], TokenStats]:
    """Unpaired feedback (KTO) -> samples masked like SFT, each with a `label` (desirable or not)
    and a mismatched row for KTO's KL estimate: this prompt with the next sample's answer (a fixed
    pairing, so the reference log-probs of these rows can be computed once)."""
    convs = [{"messages": [*r["messages"], {"role": "assistant", "content": r["completion"]}]} for r in records]
    samples, stats = tokenize_all([templates.render(c, template, tokenizer) for c in convs], tokenizer,
                                  cfg.max_seq_len, "last", drop_empty=False)
    kept = [(s, r["label"]) for s, r in zip(samples, records) if s is not None]

    def split(sample: dict) -> int:  # where the answer's labelled tokens start
        return next(i for i, label in enumerate(sample["labels"]) if i > 0 and label != -100)

    out = []
    for i, (sample, label) in enumerate(kept):
        other = kept[(i + 1) % len(kept)][0]
        p, a = split(sample), split(other)
        kl_ids = sample["input_ids"][:p] + other["input_ids"][a:]
        kl_labels = [-100] * p + other["labels"][a:]
        out.append({**sample, "label": bool(label), "kl": {"input_ids": kl_ids[:cfg.max_seq_len + 64],
                                                           "labels": kl_labels[:cfg.max_seq_len + 64]}})
    return out, stats


def prompt_of(record: dict) -> tuple[list[dict], str | None]:
    """(messages ending with a user turn, reference answer or None) for any record with messages:
    an SFT record's final answer and a preference record's chosen answer become the reference."""
    messages, reference = record["messages"], record.get("reference") or record.get("chosen")
    if messages[-1]["role"] == "assistant":
        messages, reference = messages[:-1], reference or messages[-1]["content"]
    return messages, reference


def tokenize_prompts(records: list[dict], template: Any, cfg: DatasetConfig, tokenizer: Any
                     ) -> tuple[list[dict], TokenStats]:
    """PPO prompts: the rendered prompt up to the assistant's turn, its messages and reference.
    A prompt longer than max_seq_len is dropped (counted): cutting it would change the question."""
    stats, out = TokenStats(), []
    for record in records:
        messages, reference = prompt_of(record)
        ids = tokenizer(templates.render_prompt(messages, template, tokenizer), add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.max_seq_len:
            stats.truncated += 1
            continue
        out.append({"prompt_ids": ids, "messages": messages, "reference": reference})
        stats.samples += 1
        stats.tokens += len(ids)
    return out, stats


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj))  # JSON, not pickle: the cache folder is not trusted code
    os.replace(tmp, path)


def build(cfg: DatasetConfig, stage: str, seed: int, tokenizer: Any, use_cache: bool = True,
          prompts_only: bool = False) -> DataBundle:
    """Tokenised samples for training and evaluation (from the cache when nothing changed); `stage`
    names the stage in the cache key, prompts_only is its schema's fact (see tokenize_records)."""
    key = cache_key(cfg, stage, seed, tokenizer)
    path = resources.cache_dir() / "data" / f"{cfg.name}-{key}.json"
    if use_cache and path.is_file():
        cached = json.loads(path.read_text())
        cached["stats"]["from_cache"] = str(path)
        return DataBundle(**cached)
    if cfg.packing and not tokenizer.eos_token:
        raise FtuneError("dataset.packing=true, but the tokenizer has no EOS token",
                         ["packed samples are told apart by the EOS token that ends each one; without it the "
                          "model never learns where a sample stops"],
                         "Set dataset.packing=false, or use a tokenizer with an eos_token (tokenizer_config.json).")
    bad = BadRows(skip=cfg.on_bad_row == "skip")
    train_records, eval_records = split_records(cfg, seed, bad)
    train, train_stats = tokenize_records(train_records, cfg, tokenizer, prompts_only)
    held, eval_stats = tokenize_records(eval_records, cfg, tokenizer, prompts_only)
    if not train:
        raise FtuneError("dataset: every training sample was dropped (no trained tokens left)",
                         [f"{train_stats.dropped_no_target} samples had no assistant tokens within "
                          f"max_seq_len={cfg.max_seq_len}"],
                         "Raise dataset.max_seq_len or check the template and train_on setting.")
    prompts = [prompt_of(r)[0] for r in eval_records[:4] if "messages" in r]
    stats = {"train": dataclasses.asdict(train_stats), "eval": dataclasses.asdict(eval_stats), "cache": str(path),
             "bad_rows": bad.summary()}
    if cfg.packing:
        train, held = pack(train, cfg.max_seq_len), pack(held, cfg.max_seq_len)
        stats["packed_rows"] = {"train": len(train), "eval": len(held)}
    bundle = DataBundle(train=train, eval=held, stats=stats, eval_prompts=prompts)
    if use_cache:
        _save_atomic(dataclasses.asdict(bundle), path)
    return bundle
