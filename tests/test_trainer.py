"""The trainer on the tiny model: outputs, gradient accumulation, resume, adapter format, methods."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ftune.config.compose import compose
from ftune.data.collate import collate
from ftune.methods import Setup, count_parameters
from ftune.methods import apply as apply_method
from ftune.methods.saving import save_trained
from ftune.models import load as model_load
from ftune.train.objectives.causal_lm import CAUSAL_LM, causal_lm
from ftune.train.run import make_accelerator, train
from ftune.train.trainer import train_step


def test_train_writes_a_complete_run_dir(tiny_overrides, tmp_path):
    summary = train(compose([*tiny_overrides, "train.max_steps=4", "train.run_name=r1", "train.save_every=2",
                             "train.tensorboard=true"]))
    run = tmp_path / "outputs" / "r1"
    for name in ("config.yaml", "command.txt", "metrics.jsonl", "loss.png", "summary.json", "data_stats.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "checkpoints/step-0000002"):
        assert (run / name).exists(), name
    assert list((run / "tb").iterdir()), "tensorboard events"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3, 4]
    assert summary["steps"] == 4 and summary["eval_loss_after"] < summary["eval_loss_before"]
    assert "sample_answer" in summary
    timed = [r for r in steps if "loss" in r]
    assert all(r["step_seconds"] > 0 for r in timed)
    later = sum(r["tokens"] for r in timed[1:]) / sum(r["step_seconds"] for r in timed[1:])
    assert abs(summary["tokens_per_s_steady"] - later) <= 0.01 * later + 0.1  # steps 2-4 only


def _tiny_batches(tiny_overrides, n):
    from ftune.data.build import build

    cfg = compose(tiny_overrides).cfg
    model, tok = model_load.load(cfg, torch.device("cpu"))
    data = build(cfg.dataset, "sft", 0, tok)
    return cfg, model, tok, data.train[:n]


def _one_sgd_step(model, batches, cfg):
    accelerator = make_accelerator(cfg, torch.device("cpu"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    metrics = train_step(model, CAUSAL_LM, batches, accelerator, opt, sched, max_grad_norm=0)
    return metrics, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_grad_accumulation_equals_one_big_batch(tiny_overrides):
    """2 micro-batches of 4 give the same loss and update as 1 batch of 8 (token-weighted)."""
    cfg, model, tok, samples = _tiny_batches([*tiny_overrides, "method=full"], 8)
    lengths = {len(s["input_ids"]) for s in samples}
    assert len(lengths) > 1, "samples of different lengths make the test meaningful"
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    pad = tok.pad_token_id
    big_metrics, big = _one_sgd_step(model, [collate(samples, pad)], cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(initial[n])
    small_metrics, small = _one_sgd_step(model, [collate(samples[:4], pad), collate(samples[4:], pad)], cfg)
    assert small_metrics["loss"] == pytest.approx(big_metrics["loss"], rel=1e-5)
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(big[n], initial[n]) for n in big), "the step changed the weights"


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_overrides, tmp_path):
    common = [*tiny_overrides, "train.max_steps=6", "train.save_every=2", "method.dropout=0.1",
              "train.grad_accum=2"]
    train(compose([*common, "train.run_name=straight"]))
    stopped = train(compose([*common, "train.run_name=broken"]), stop_after=3)
    assert stopped["stopped_at"] == 3
    assert not (tmp_path / "outputs" / "broken" / "adapter").exists()
    train(compose([*common, "train.run_name=broken", "train.resume=true"]))
    a, b = _adapter(tmp_path / "outputs" / "straight"), _adapter(tmp_path / "outputs" / "broken")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    metrics = [json.loads(x) for x in (tmp_path / "outputs" / "broken" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_lora_adapter_reloads_in_plain_peft(tiny_overrides, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = compose(tiny_overrides).cfg
    model, tok = model_load.load(cfg, torch.device("cpu"))
    model = apply_method(model, cfg, Setup(1, str(cfg.model.path)))
    torch.manual_seed(1)
    with torch.no_grad():  # stand-in for training: non-zero B matrices change the output
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    model.eval()
    ids = torch.tensor([tok("What is the capital of France?")["input_ids"]])
    expected = model(input_ids=ids).logits
    save_trained(model, tok, cfg.method, str(tiny_model_dir), tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert not torch.allclose(plain(input_ids=ids).logits, expected), "the adapter changes the logits"


def test_full_and_freeze_train_what_they_say(tiny_overrides):
    def trainable(overrides):
        cfg = compose([*tiny_overrides, *overrides]).cfg
        model, _ = model_load.load(cfg, torch.device("cpu"))
        model = apply_method(model, cfg, Setup(1, str(cfg.model.path)))
        return model, count_parameters(model)

    _, (full_t, full_n) = trainable(["method=full"])
    assert full_t == full_n
    model, (freeze_t, _) = trainable(["method=freeze", "method.trainable_layers=1"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("model.layers.1.") for n in names)
    _, (lora_t, lora_n) = trainable(["method=lora", "method.r=4"])
    assert 0 < lora_t < lora_n * 0.5


def test_gradient_checkpointing_and_packing_train(tiny_overrides):
    summary = train(compose([*tiny_overrides, "train.max_steps=2", "train.gradient_checkpointing=true",
                             "dataset.packing=true", "train.run_name=gc"]))
    assert summary["steps"] == 2


@pytest.mark.skipif(pytest.importorskip("importlib").util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes not installed")
def test_qlora_trains_on_cpu_through_bitsandbytes(tiny_overrides):
    summary = train(compose([*tiny_overrides, "method=qlora", "method.r=4", "train.max_steps=2",
                             "train.run_name=q", "hardware.precision=bf16"]))
    assert summary["steps"] == 2
    assert math.isfinite(summary["eval_loss_after"])


@pytest.mark.skipif(pytest.importorskip("importlib").util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes not installed")
def test_qlora_gradients_survive_a_held_out_evaluation(tiny_overrides):
    """An eval pass must not switch the 4-bit layers to bitsandbytes' CPU kernel without a backward."""
    from ftune.train.trainer import evaluate_all

    cfg = compose([*tiny_overrides, "method=qlora", "method.r=4", "method.dropout=0", "hardware.precision=bf16"]).cfg
    samples = None

    def lora_grads(run_eval_first):
        nonlocal samples
        torch.manual_seed(0)
        model, tok = model_load.load(cfg, torch.device("cpu"))
        model = apply_method(model, cfg, Setup(1, str(cfg.model.path)))
        if samples is None:
            from ftune.data.build import build

            samples = build(cfg.dataset, "sft", 0, tok).train[:4]
        accelerator = make_accelerator(cfg, torch.device("cpu"))
        batch = collate(samples, tok.pad_token_id)
        if run_eval_first:
            evaluate_all(model, CAUSAL_LM, samples, 4, tok.pad_token_id, accelerator)
        model.train()
        with accelerator.autocast():
            loss, n = causal_lm(model, batch)
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None and "layers.0." in k}

    fresh, after_eval = lora_grads(False), lora_grads(True)
    assert fresh and fresh.keys() == after_eval.keys()
    for key in fresh:
        torch.testing.assert_close(after_eval[key], fresh[key], rtol=1e-3, atol=1e-5)


def test_adamw_takes_the_fused_kernel_on_cpu_with_the_same_update():
    """train.optim=adamw uses torch's fused kernel where every parameter allows it (CPU here);
    its update equals the per-tensor implementation's up to rounding."""
    from ftune.config.schema import TrainConfig
    from ftune.train.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
    reference = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(model, cfg)
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW([{"params": reference[:1], "weight_decay": 0.1}, {"params": reference[1:], "weight_decay": 0.0}],
                              lr=1e-2, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, foreach=False)
    for _step in range(3):
        grads = [torch.randn_like(p) for p in reference]
        for p, q, g in zip(model.parameters(), reference, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for p, q in zip(model.parameters(), reference):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
