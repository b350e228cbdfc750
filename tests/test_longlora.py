"""LongLoRA: S²-Attn against plain attention, and a tiny model trained at 2x its native context."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from ftune.config.compose import compose
from ftune.methods.longlora import shifted_group_attention
from ftune.train.run import train


def _qkv(n=16, heads=4, d=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, heads, n, d, generator=g) for _ in range(3)]


def test_one_group_is_standard_causal_attention():
    q, k, v = _qkv()
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(shifted_group_attention(q, k, v, group=16, scaling=None), expected)


def test_groups_attend_only_inside_and_half_the_heads_are_shifted():
    q, k, v = _qkv()
    out = shifted_group_attention(q, k, v, group=8, scaling=None)
    # unshifted heads: each group of 8 is an independent causal sequence
    for start in (0, 8):
        sl = slice(start, start + 8)
        ref = F.scaled_dot_product_attention(q[:, :2, sl], k[:, :2, sl], v[:, :2, sl], is_causal=True)
        torch.testing.assert_close(out[:, :2, sl], ref)
    # shifted heads: groups start half a group later (the sequence rolled by 4)
    rq, rk, rv = (x[:, 2:].roll(-4, dims=2) for x in (q, k, v))
    ref = torch.cat([F.scaled_dot_product_attention(rq[:, :, s:s + 8], rk[:, :, s:s + 8], rv[:, :, s:s + 8],
                                                    is_causal=True) for s in (0, 8)], dim=2).roll(4, dims=2)
    torch.testing.assert_close(out[:, 2:], ref)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(out, full), "sparse attention differs from full attention"


def test_tiny_model_trained_at_twice_its_context_runs(tiny_model_dir, tiny_overrides, tmp_path):
    # A copy of the tiny model whose native context is 64 tokens; train on 128-token rows.
    short = tmp_path / "short-ctx"
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.max_position_embeddings = 64
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, config=config)
    model.save_pretrained(short)
    for f in tiny_model_dir.glob("tokenizer*"):
        (short / f.name).write_bytes(f.read_bytes())
    (short / "chat_template.jinja").write_bytes((tiny_model_dir / "chat_template.jinja").read_bytes()) \
        if (tiny_model_dir / "chat_template.jinja").exists() else None
    overrides = [o for o in tiny_overrides if not o.startswith(("model.path", "dataset.max_seq_len"))]
    summary = train(compose([*overrides, f"model.path={short}", "method=longlora", "method.context_factor=2",
                             "dataset.packing=false", "dataset.max_seq_len=128", "train.max_steps=3",
                             "train.run_name=long", "train.lr=1e-3", "dataset=smol-corpus", "stage=pt"]))
    assert summary["steps"] == 3 and summary["eval_loss_after"] == summary["eval_loss_after"]
    import json

    cfg = json.loads((tmp_path / "outputs" / "long" / "adapter" / "adapter_config.json").read_text())
    assert {"embed_tokens", "norm"} <= set(cfg["modules_to_save"])
