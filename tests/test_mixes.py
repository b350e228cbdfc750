"""MAM adapter and UniPELT: compositions of prefixes, adapters and LoRA (plus gates), checked by
properties the papers' definitions imply rather than by re-implementing them."""

from __future__ import annotations

import pytest
import torch

from ftune.config.compose import compose
from ftune.methods import Setup
from ftune.methods import apply as apply_method
from ftune.models import load as model_load

EXTRA = {"mam": ["method.prefix_length=4", "method.ffn_bottleneck=8"],
         "unipelt": ["method.r=4", "method.prefix_length=4", "method.bottleneck=8"]}


def _model(tiny_overrides, method):
    cfg = compose([*tiny_overrides, f"method={method}", *EXTRA[method]]).cfg
    torch.manual_seed(0)
    model, tok = model_load.load(cfg, torch.device("cpu"))
    model = apply_method(model, cfg, Setup(total_steps=4, model_path=str(cfg.model.path)))
    with torch.no_grad():  # stand-in for training: every trained tensor matters (B and up start at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval(), tok


@pytest.mark.parametrize("method", ["mam", "unipelt"])
def test_outputs_before_t_do_not_depend_on_tokens_from_t(method, tiny_overrides):
    """Causality, every part included: a gate averaged over the sequence would fail this."""
    model, _ = _model(tiny_overrides, method)
    ids = torch.randint(5, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 10:] = torch.randint(5, 300, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=1e-5, atol=1e-5)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["mam", "unipelt"])
def test_right_padding_changes_no_real_position(method, tiny_overrides):
    model, tok = _model(tiny_overrides, method)
    ids = torch.randint(5, 300, (1, 9), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([ids, torch.full((1, 5), tok.pad_token_id)], dim=1)
    mask = torch.cat([torch.ones(1, 9, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model(input_ids=ids).logits
        with_pad = model(input_ids=padded, attention_mask=mask).logits[:, :9]
    torch.testing.assert_close(with_pad, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["mam", "unipelt"])
def test_prefixes_are_attended_and_generation_with_a_cache_matches(method, tiny_overrides):
    """The prefixes change the outputs (they are read), and cached decoding gives the logits a full
    forward gives (the prefixes are added at every step, never stored in the cache)."""
    model, _ = _model(tiny_overrides, method)
    ids = torch.randint(5, 300, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        for attention in [m for m in model.modules() if hasattr(m, "ftune_prefix")]:
            saved = attention.ftune_prefix
            del attention.ftune_prefix
            attention.saved_prefix = saved
        without = model(input_ids=ids).logits
        for attention in [m for m in model.modules() if hasattr(m, "saved_prefix")]:
            attention.ftune_prefix = attention.saved_prefix
        assert (full - without).abs().max() > 1e-3
        first = model(input_ids=ids[:, :5], use_cache=True)
        step = model(input_ids=ids[:, 5:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits, full[:, 5:], rtol=1e-4, atol=1e-4)


def test_unipelt_gates_close_their_parts(tiny_overrides):
    """A LoRA or adapter gate closed to zero removes its part: with those gates shut and the
    prefixes taken out, the model is the base. (A closed prefix gate zeroes the prefix's logits and
    values, which still takes attention mass, as in the paper's G_P * P_k, G_P * P_v.)"""
    model, _ = _model(tiny_overrides, "unipelt")
    ids = torch.randint(5, 300, (1, 8), generator=torch.Generator().manual_seed(5))
    base, _ = model_load.load(compose([*tiny_overrides]).cfg, torch.device("cpu"))
    with torch.no_grad():
        open_logits = model(input_ids=ids).logits
        for name, p in model.named_parameters():
            if ("lora_gate" in name or "adapter_gate" in name) and name.endswith("weight"):
                p.zero_()
            elif ("lora_gate" in name or "adapter_gate" in name) and name.endswith("bias"):
                p.fill_(-1e4)
        for attention in [m for m in model.modules() if hasattr(m, "ftune_prefix")]:
            del attention.ftune_prefix
        closed = model(input_ids=ids).logits
        expected = base.eval()(input_ids=ids).logits
    assert (open_logits - expected).abs().max() > 1e-2
    torch.testing.assert_close(closed, expected, rtol=1e-5, atol=1e-5)
