"""The target-only, chunked output-head loss (gradients computed in the forward pass) equals the
plain full-logits cross-entropy, in value and in gradients (tiny model: LoRA, a trained head with a
bias, bf16 autocast, no-grad evaluation)."""

from __future__ import annotations

import torch

from ftune.config.compose import compose


def _setup(tiny_overrides, method="lora"):
    from ftune.data.build import build
    from ftune.methods import Setup, apply
    from ftune.models import load as model_load
    from ftune.train import objectives

    cfg = compose([*tiny_overrides, f"method={method}", "dataset.packing=false"]).cfg
    model, tok = model_load.load(cfg, torch.device("cpu"))
    data = build(cfg.dataset, "sft", cfg.train.seed, tok)
    torch.manual_seed(0)
    model = apply(model, cfg, Setup(total_steps=10, model_path="tiny"))
    for _name, p in model.named_parameters():  # LoRA B starts at zero: make the adapter matter
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    batch = objectives.get(cfg.stage).collate(data.train[:6], tok.pad_token_id)
    return model, batch


def _loss_and_grads(model, fn):
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_target_only_chunked_loss_matches_full_logits(tiny_overrides, monkeypatch):
    from ftune.train.objectives import causal_lm as C

    model, batch = _setup(tiny_overrides)
    inputs = {k: batch[k] for k in C.MODEL_INPUTS if k in batch}
    assert C.causal_lm_module(model) is not None
    full, g_full = _loss_and_grads(model, lambda: C._full_logits_loss(model, inputs, batch))
    fast, g_fast = _loss_and_grads(model, lambda: C.causal_lm(model, batch)[0])
    monkeypatch.setattr(C, "CHUNK", 7)  # many chunks
    chunked, g_chunk = _loss_and_grads(model, lambda: C.causal_lm(model, batch)[0])
    assert C.count_targets(batch) > 3 * 7
    assert torch.allclose(full, fast, rtol=1e-5) and torch.allclose(full, chunked, rtol=1e-5)
    for name in g_full:
        assert torch.allclose(g_full[name], g_fast[name], atol=1e-6, rtol=1e-4), name
        assert torch.allclose(g_full[name], g_chunk[name], atol=1e-6, rtol=1e-4), name
    assert C.causal_lm(model, batch)[1] == C.count_targets(batch)


def test_a_trained_head_takes_the_full_logits_path(tiny_overrides):
    from ftune.train.objectives import causal_lm as C

    model, _ = _setup([*tiny_overrides, "method.target_modules=[q_proj,lm_head]"])
    assert C.causal_lm_module(model) is None


def test_adapter_inputs_kept_in_bf16_under_autocast_give_the_same_loss(tiny_overrides):
    from ftune.methods.peft_methods import keep_activation_dtype
    from ftune.train.objectives import causal_lm as C

    model, batch = _setup([*tiny_overrides, "hardware.precision=bf16", "model.dtype=bfloat16"])
    model.to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapter on a bf16 base, as ftune trains it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before, g_before = _loss_and_grads(model, lambda: C.causal_lm(model, batch)[0])
        assert keep_activation_dtype(model) > 0
        after, g_after = _loss_and_grads(model, lambda: C.causal_lm(model, batch)[0])
    assert torch.equal(before, after)
    assert all(torch.equal(g_before[n], g_after[n]) for n in g_before)


def test_head_cross_entropy_trains_weight_and_bias_like_autograd():
    from ftune.train.objectives.causal_lm import head_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    ref = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum") * 0.5
    ref.backward()
    g_ref = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
    for t in (hidden, head.weight, head.bias):
        t.grad = None
    out = head_cross_entropy(head, hidden, targets, chunk=5) * 0.5  # the upstream scale reaches every grad
    out.backward()
    assert torch.allclose(ref, out, rtol=1e-6)
    for a, t in zip(g_ref, (hidden, head.weight, head.bias)):
        assert torch.allclose(a, t.grad, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(head_cross_entropy(head, hidden, targets, chunk=5) * 0.5, ref)


def test_head_cross_entropy_under_bf16_autocast_is_close_to_fp32():
    from ftune.train.objectives.causal_lm import head_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(32, 300, bias=False)
    hidden = torch.randn(40, 32, requires_grad=True)
    targets = torch.randint(0, 300, (40,))
    ref = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    ref.backward()
    g_ref, hidden.grad, head.weight.grad = hidden.grad.clone(), None, None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head_cross_entropy(head, hidden, targets, chunk=16)
    out.backward()
    assert out.dtype == torch.float32 and abs(out.item() - ref.item()) < 0.01 * ref.item()
    assert hidden.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    assert (hidden.grad - g_ref).norm() < 0.02 * g_ref.norm()
