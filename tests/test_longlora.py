"""LongLoRA: S²-Attn against plain attention, and a tiny model trained at 2x its native context."""

from __future__ import annotations

import json
import math

import pytest
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


# (n, group): shifted groups of even and odd size; heads 0-1 keep their groups, heads 2-3 shift
SHAPES = [(16, 4), (16, 8), (15, 5)]


@pytest.mark.parametrize("n,group", SHAPES)
def test_a_plain_causal_mask_gives_the_unmasked_result(n, group):
    q, k, v = _qkv(n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(shifted_group_attention(q, k, v, group=group, scaling=None, allowed=causal),
                               shifted_group_attention(q, k, v, group=group, scaling=None))


def _perturbed(x, positions):
    x = x.clone()
    x[:, :, positions] += torch.randn_like(x[:, :, positions])
    return x


def _depends(q, k, v, group, positions):
    """(heads, length): which outputs move when q, k and v change at `positions`."""
    base = shifted_group_attention(q, k, v, group=group, scaling=None)
    moved = shifted_group_attention(*(_perturbed(x, positions) for x in (q, k, v)), group=group, scaling=None)
    return ((moved - base).abs() > 1e-6).any(dim=-1).any(dim=0)


@pytest.mark.parametrize("n,group", SHAPES)
def test_no_output_depends_on_a_later_token(n, group):
    q, k, v = _qkv(n)
    for t in range(1, n):
        moved = _depends(q, k, v, group, list(range(t, n)))
        assert not moved[:, :t].any(), f"tokens >= {t} changed outputs before it (heads, positions): " \
                                       f"{moved[:, :t].nonzero().tolist()}"


def _groups(n, group, shift):
    """The spec's groups: [0, g), [g, 2g), ...; shifted: [0, s), [s, s+g), [s+g, s+2g), ..., [.., n)."""
    starts = [0, *range(shift, n, group)] if shift else list(range(0, n, group))
    return [range(a, b) for a, b in zip(starts, [*starts[1:], n])]


@pytest.mark.parametrize("n,group", SHAPES)
def test_each_output_depends_exactly_on_its_own_group_up_to_itself(n, group):
    q, k, v = _qkv(n)
    moved = [_depends(q, k, v, group, [j]) for j in range(n)]  # moved[j][head, p]
    for head in range(4):
        for members in _groups(n, group, group // 2 if head >= 2 else 0):
            for p in members:
                got = [j for j in range(n) if moved[j][head, p]]
                assert got == [j for j in members if j <= p], f"head {head}, position {p}"


def _tiny_s2_model():
    from ftune.methods.longlora import ATTENTION_NAME, register_attention

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    register_attention()
    model.config.s2_group_fraction = 0.25
    model.set_attn_implementation(ATTENTION_NAME)
    model.config.use_cache = False  # as ftune trains; transformers reads packed rows only without a cache
    return model.train()


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_tokens_do_not_reach_real_tokens_in_training(side):
    model = _tiny_s2_model()
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    pad = slice(10, 16) if side == "right" else slice(0, 6)
    mask[1, pad] = 0
    other = ids.clone()
    other[1, pad] = (ids[1, pad] + 7) % 50
    logits = model(input_ids=ids, attention_mask=mask).logits
    real = mask[1].bool()
    torch.testing.assert_close(model(input_ids=other, attention_mask=mask).logits[1, real], logits[1, real])
    logits[mask.bool()].sum().backward()  # a padded row's fully masked queries give no NaN gradients
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_packed_samples_do_not_see_each_other_in_training():
    model = _tiny_s2_model()
    ids = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([[*range(7), *range(9)]])  # two samples of 7 and 9 tokens, one row
    other = ids.clone()
    other[0, :7] = (ids[0, :7] + 7) % 50
    logits = model(input_ids=ids, position_ids=positions).logits
    torch.testing.assert_close(model(input_ids=other, position_ids=positions).logits[0, 7:], logits[0, 7:])


def _train_at_twice_the_context(tiny_model_dir, tiny_overrides, tmp_path):
    """A copy of the tiny model whose native context is 64 tokens, trained on 128-token rows."""
    short = tmp_path / "short-ctx"
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.max_position_embeddings = 64
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, config=config)
    model.save_pretrained(short)
    for f in [*tiny_model_dir.glob("tokenizer*"), *tiny_model_dir.glob("chat_template.jinja")]:
        (short / f.name).write_bytes(f.read_bytes())
    overrides = [o for o in tiny_overrides if not o.startswith(("model.path", "dataset.max_seq_len"))]
    summary = train(compose([*overrides, f"model.path={short}", "method=longlora", "method.context_factor=2",
                             "dataset.packing=false", "dataset.max_seq_len=128", "train.max_steps=3",
                             "train.run_name=long", "train.lr=1e-3", "dataset=smol-corpus", "stage=pt"]))
    return short, tmp_path / "outputs" / "long", summary


def _plain_peft_logits(base_dir, adapter, ids, **config):
    """Base + adapter with transformers and peft alone, the way the adapter's README says."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **config)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits


def test_tiny_model_trained_at_twice_its_context_reloads_with_its_rope_scaling(tiny_model_dir, tiny_overrides,
                                                                               tmp_path):
    from transformers import AutoModelForCausalLM

    from ftune.export.merge import merge_run
    from ftune.methods.runs import load_run

    short, run_dir, summary = _train_at_twice_the_context(tiny_model_dir, tiny_overrides, tmp_path)
    assert summary["steps"] == 3 and math.isfinite(summary["eval_loss_after"])
    adapter = run_dir / "adapter"
    assert {"embed_tokens", "norm"} <= set(json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"])
    note = json.loads((adapter / "ftune_longlora.json").read_text())
    assert note["rope_parameters"]["rope_type"] == "linear" and note["rope_parameters"]["factor"] == 2.0
    assert note["max_position_embeddings"] == 128 and "ftune_longlora.json" in (adapter / "README.md").read_text()

    ids = torch.randint(0, 300, (1, 128), generator=torch.Generator().manual_seed(0))
    plain = _plain_peft_logits(short, adapter, ids, rope_parameters=note["rope_parameters"],
                               max_position_embeddings=note["max_position_embeddings"])
    model, _, _ = load_run(run_dir, torch.device("cpu"))
    with torch.no_grad():
        reloaded = model.eval()(input_ids=ids).logits
    torch.testing.assert_close(reloaded, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_plain_peft_logits(short, adapter, ids), plain, atol=1e-3), "the scaling matters"

    merged = merge_run(run_dir, tmp_path / "merged", dtype="float32")
    config = json.loads((merged / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 2.0
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-4)


def test_a_base_that_cannot_take_the_saved_scaling_is_refused(tiny_model_dir, tmp_path):
    from ftune.errors import FtuneError
    from ftune.methods.longlora import restore_rope

    base = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    note = {"context_factor": 2.0, "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}}
    (tmp_path / "ftune_longlora.json").write_text(json.dumps(note))
    with pytest.raises(FtuneError, match="cannot reproduce the RoPE scaling"):
        restore_rope(base, tmp_path)


def test_rope_scaling_composes_with_linear_and_refuses_other_variants():
    from ftune.errors import FtuneError
    from ftune.methods.longlora import scale_rope

    def tiny(kind):
        return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, max_position_embeddings=64,
                                            rope_parameters={"rope_type": kind, "factor": 2.0, "rope_theta": 1e4}))

    linear = tiny("linear")
    scale_rope(linear, 2.0)
    assert linear.config.rope_parameters["factor"] == 4.0 and linear.config.max_position_embeddings == 128
    with pytest.raises(FtuneError, match="cannot take linear position interpolation"):
        scale_rope(tiny("dynamic"), 2.0)
