"""The fused LoRA layer gives peft's numbers: loss and gradients equal to peft's forward (fp32 and
bf16 autocast, with and without dropout), and every case it does not cover runs peft's forward."""

from __future__ import annotations

import pytest
import torch

from ftune.config.compose import compose


def _setup(tiny_overrides, extra=()):
    from ftune.data.build import build
    from ftune.methods import Setup, apply
    from ftune.models import load as model_load
    from ftune.train import objectives

    cfg = compose([*tiny_overrides, "method=lora", "dataset.packing=false", *extra]).cfg
    model, tok = model_load.load(cfg, torch.device("cpu"))
    data = build(cfg.dataset, "sft", cfg.train.seed, tok)
    torch.manual_seed(0)
    model = apply(model, cfg, Setup(total_steps=10, model_path="tiny"))
    for p in model.parameters():  # LoRA B starts at zero: make the adapter matter
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    batch = objectives.get(cfg.stage).collate(data.train[:6], tok.pad_token_id)
    return model, batch


def _run(model, batch, seed=1):
    from ftune.train.objectives import causal_lm as C

    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks on both paths
    loss = C.causal_lm(model, batch)[0]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _fused_layers(model):
    return [m for m in model.modules() if type(m).__name__ == "FusedLoraLinear"]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_lora_equals_peft_in_fp32(tiny_overrides, dropout):
    from ftune.methods.fused_lora import fuse_lora_layers

    model, batch = _setup(tiny_overrides, [f"method.dropout={dropout}"])
    model.train()
    ref, g_ref = _run(model, batch)
    assert fuse_lora_layers(model) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    calls = []
    from ftune.methods import fused_lora

    real = fused_lora._LoraLinear.apply
    fused_lora._LoraLinear.apply = lambda *a: calls.append(1) or real(*a)
    try:
        out, g_out = _run(model, batch)
    finally:
        fused_lora._LoraLinear.apply = real
    assert len(calls) == 14  # the fused path really ran, once per layer
    assert torch.allclose(ref, out, rtol=1e-5)
    assert g_ref.keys() == g_out.keys() and len(g_ref) == 28
    for name in g_ref:
        assert torch.allclose(g_ref[name], g_out[name], atol=1e-6, rtol=1e-4), name


def test_fused_lora_under_bf16_autocast_matches_peft(tiny_overrides):
    from ftune.methods.fused_lora import fuse_lora_layers
    from ftune.methods.peft_methods import keep_activation_dtype

    model, batch = _setup(tiny_overrides, ["hardware.precision=bf16"])
    model.to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapter on a bf16 base, as ftune trains it
    keep_activation_dtype(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, g_ref = _run(model, batch)
        fuse_lora_layers(model)
        out, g_out = _run(model, batch)
    # bf16 rounds the sum once (accumulated in the matmul) instead of twice: within bf16 noise
    assert abs(ref.item() - out.item()) < 2e-3 * abs(ref.item())
    for name in g_ref:
        assert g_out[name].dtype == torch.float32
        rel = (g_ref[name] - g_out[name]).norm() / g_ref[name].norm()
        assert rel < 0.03, (name, rel.item())


def test_unusual_cases_keep_peft_forward(tiny_overrides, monkeypatch):
    from ftune.methods import fused_lora

    model, batch = _setup(tiny_overrides)
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            ref_off = model(input_ids=batch["input_ids"]).logits
        ref_on = model(input_ids=batch["input_ids"]).logits
    fused_lora.fuse_lora_layers(model)
    calls = []
    real = fused_lora._LoraLinear.apply
    monkeypatch.setattr(fused_lora._LoraLinear, "apply", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        with model.disable_adapter():  # adapters off: peft's path, the base model's numbers
            off = model(input_ids=batch["input_ids"]).logits
        assert calls == []
        on = model(input_ids=batch["input_ids"]).logits
        assert len(calls) == 14
        layer = _fused_layers(model)[0]
        x = torch.randn(3, layer.in_features)
        layer.merge()
        merged = layer(x)  # merged weights: peft's path (the base layer alone)
        assert len(calls) == 14
        layer.unmerge()
        assert torch.allclose(merged, layer(x), atol=1e-5)
    assert torch.allclose(off, ref_off) and torch.allclose(on, ref_on, atol=1e-5)
    assert not torch.allclose(on, off)


def test_dora_and_trainable_bases_are_left_alone(tiny_overrides):
    from ftune.methods.fused_lora import fuse_lora_layers

    model, _ = _setup(tiny_overrides, ["method.use_dora=true"])
    assert fuse_lora_layers(model) == 14  # swapped, but each call goes to peft (a variant is active)
    layer = _fused_layers(model)[0]
    from ftune.methods.fused_lora import _eligible_now

    assert _eligible_now(layer, torch.randn(2, layer.in_features), (), {}) is None


def test_a_run_with_fused_ops_off_learns_the_same(tiny_overrides):
    from ftune.train.run import train

    common = [*tiny_overrides, "train.max_steps=3", "train.lr=1e-2", "dataset.packing=false",
              "train.sample_max_new_tokens=0"]
    fused = train(compose([*common, "train.run_name=fused"]))
    plain = train(compose([*common, "train.run_name=plain", "hardware.fused_ops=false"]))
    assert fused["eval_loss_after"] == pytest.approx(plain["eval_loss_after"], rel=1e-4)
    assert fused["eval_loss_after"] != pytest.approx(fused["eval_loss_before"], rel=1e-3)
