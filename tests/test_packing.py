"""Packing leaks no attention across samples: packed loss == unpacked loss on the same samples."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

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
