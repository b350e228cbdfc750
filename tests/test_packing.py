"""Packing leaks no attention across samples: packed loss == unpacked loss on the same samples."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from ftune.config.compose import compose
from ftune.data.collate import collate
from ftune.data.packing import pack
from ftune.data.templates import load_template, render
from ftune.data.tokenize import tokenize_all
from ftune.train.objectives.causal_lm import causal_lm

RECORDS = [
    {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Name the capital of France, please, in one word."},
                  {"role": "assistant", "content": "Paris."}]},
    {"text": "Raw text also packs: sort these numbers and reverse the word hello world."},
    {"messages": [{"role": "user", "content": "Count letters"}, {"role": "assistant", "content": "Five letters."},
                  {"role": "user", "content": "And again?"}, {"role": "assistant", "content": "Still five."}]},
]


@pytest.fixture(scope="module")
def samples(tiny_tokenizer):
    segs = [render(r, load_template("chatml"), tiny_tokenizer) for r in RECORDS]
    out, _ = tokenize_all(segs, tiny_tokenizer, max_len=256, train_on="assistant")
    assert len({len(s["input_ids"]) for s in out}) > 1
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(samples, tiny_model_dir, tiny_tokenizer, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn).eval()
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        loss_unpacked, n_unpacked = causal_lm(model, collate(samples, pad))
        rows = pack(samples, max_len=sum(len(s["input_ids"]) for s in samples))
        assert len(rows) == 1, "all samples in one row"
        packed_batch = collate(rows, pad)
        assert "attention_mask" not in packed_batch
        loss_packed, n_packed = causal_lm(model, packed_batch)
        # Negative control: the same row with positions running on (samples see each other).
        leaky = dict(packed_batch, position_ids=torch.arange(packed_batch["input_ids"].shape[1])[None])
        loss_leaky, _ = causal_lm(model, leaky)
    assert n_packed == n_unpacked
    torch.testing.assert_close(loss_packed, loss_unpacked, rtol=1e-5, atol=1e-4)
    assert abs(float(loss_leaky) - float(loss_unpacked)) > 1e-3


def test_pack_respects_max_len_and_restarts_positions(samples):
    longest = max(len(s["input_ids"]) for s in samples)
    rows = pack(samples, max_len=longest + 5)
    assert len(rows) > 1
    assert all(len(r["input_ids"]) <= longest + 5 for r in rows)
    assert sum(r["position_ids"].count(0) for r in rows) == len(samples)
    total_targets = sum(sum(1 for x in s["labels"][1:] if x != -100) for s in samples)
    assert sum(sum(1 for x in r["labels"] if x != -100) for r in rows) == total_targets


def test_padding_free_micro_batches_keep_every_sample_whole_and_give_the_same_loss(tiny_overrides):
    from ftune.data.build import build
    from ftune.data.collate import collate, collate_padding_free, row_width
    from ftune.data.packing import pack_group
    from ftune.methods import Setup, apply
    from ftune.models import load as model_load
    from ftune.train import objectives
    from ftune.train.objectives.causal_lm import causal_lm

    cfg = compose([*tiny_overrides, "dataset.packing=false"]).cfg
    assert cfg.dataset.padding_free and objectives.get(cfg.stage, cfg.dataset).collate is collate_padding_free
    model, tok = model_load.load(cfg, torch.device("cpu"))
    data = build(cfg.dataset, "sft", cfg.train.seed, tok)
    samples = data.train[:8]
    lengths = sorted(len(s["input_ids"]) for s in samples)
    width = row_width(lengths)
    assert max(lengths) <= width <= 2 * max(lengths) + 8
    rows = pack_group(samples, width)
    assert len(rows) < len(samples)  # rows are shared
    assert sorted(n for r in rows for n in _sample_lengths(r["position_ids"])) == lengths
    padded, free = collate(samples, tok.pad_token_id), collate_padding_free(samples, tok.pad_token_id)
    assert free["input_ids"].numel() < padded["input_ids"].numel()
    assert int(free["num_tokens"]) == int(padded["num_tokens"])
    model = apply(model, cfg, Setup(total_steps=1, model_path="tiny"))
    model.eval()
    with torch.no_grad():
        a, n_a = causal_lm(model, padded)
        b, n_b = causal_lm(model, free)
    assert n_a == n_b and torch.allclose(a, b, rtol=1e-5)


def _sample_lengths(position_ids: list[int]) -> list[int]:
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return [b - a for a, b in zip(starts, starts[1:])]


def test_padding_free_is_off_where_rows_cannot_be_shared(tiny_overrides):
    assert compose([*tiny_overrides, "method=prefix"]).cfg.dataset.padding_free is False
    assert compose([*tiny_overrides, "stage=dpo", "dataset=smol-prefs"]).cfg.dataset.padding_free is False


def test_flash_attention_gets_each_micro_batch_as_one_row(tiny_overrides):
    """transformers' flash-attention 2 reads packed samples from restarting position ids only in a
    one-row batch: packed and padding-free micro-batches become one row for it, with the loss
    of the multi-row layout (checked here with SDPA, which reads the restarts on any row count)."""
    from ftune.data.build import build
    from ftune.data.collate import collate, collate_padding_free, collate_varlen
    from ftune.models import load as model_load
    from ftune.train import objectives

    def chosen(*overrides, attention="flash_attention_2"):
        cfg = compose([*tiny_overrides, *overrides]).cfg
        model = SimpleNamespace(config=SimpleNamespace(_attn_implementation=attention))
        return objectives.get(cfg.stage, cfg.dataset, model).collate

    assert chosen("dataset.packing=false") is collate_varlen
    assert chosen("dataset.packing=true", "dataset.padding_free=false") is collate_varlen
    assert chosen("dataset.packing=false", attention="sdpa") is collate_padding_free
    # padded rows carry an attention mask, which flash-attention unpads by itself
    assert chosen("dataset.packing=false", "dataset.padding_free=false") is collate
    assert chosen("stage=dpo", "dataset=smol-prefs") is chosen("stage=dpo", "dataset=smol-prefs", attention="sdpa")

    cfg = compose([*tiny_overrides, "dataset.packing=false"]).cfg
    model, tok = model_load.load(cfg, torch.device("cpu"))
    assert objectives.attention_of(model) in ("sdpa", "eager")
    model.eval()
    pad = tok.pad_token_id
    samples = build(cfg.dataset, "sft", cfg.train.seed, tok).train[:8]
    longest = max(len(s["input_ids"]) for s in samples)
    rows = pack(samples, max_len=longest + 8)
    assert len(rows) > 1
    for several, micro in ((collate_padding_free(samples, pad), samples), (collate(rows, pad), rows)):
        one = collate_varlen(micro, pad)
        assert several["input_ids"].shape[0] > 1 and one["input_ids"].shape[0] == 1
        assert "attention_mask" not in one and int(one["num_tokens"]) == int(several["num_tokens"])
        # pack() keeps the sample order, so both layouts list the samples in order
        assert _sample_lengths(one["position_ids"][0].tolist())[:len(samples)] == [len(s["input_ids"]) for s in samples]
        with torch.no_grad():
            a, n_a = causal_lm(model, several)
            b, n_b = causal_lm(model, one)
        assert n_a == n_b and torch.allclose(a, b, rtol=1e-5)
    # run.py asks after the method is applied: the adapter-wrapped model must still answer
    from ftune.methods import Setup, apply

    wrapped = apply(model, cfg, Setup(total_steps=1, model_path="tiny"))
    assert objectives.attention_of(wrapped) == objectives.attention_of(model) is not None
