"""Every method on the tiny model (hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads of 16):
it trains, exactly the intended tensors change, the trainable count matches the method's formula,
and the saved result reloads (in plain peft where peft knows the method) with identical outputs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from ftune.config.compose import compose
from ftune.data.build import build
from ftune.data.collate import collate
from ftune.methods import Setup, count_parameters, hooks_for, is_peft
from ftune.methods import apply as apply_method
from ftune.methods.saving import load_trained, save_trained
from ftune.models import load as model_load
from ftune.train.objectives.causal_lm import CAUSAL_LM
from ftune.train.optim import build_optimizer, build_scheduler
from ftune.train.run import make_accelerator
from ftune.train.trainer import train_step

H, I, L, KV = 64, 128, 2, 32  # hidden, intermediate, layers, key/value width (2 heads x 16)
# in+out of each projection of one layer
Q, K, V, O, GATE, UP, DOWN = H + H, H + KV, H + KV, H + H, H + I, H + I, I + H
ALL = Q + K + V + O + GATE + UP + DOWN

# method -> (overrides, expected trainable parameter count from the method's definition)
METHODS = {
    "lora": (["method.r=4"], L * 4 * ALL),
    "lora-attn": (["method.r=4"], L * 4 * (Q + K + V + O)),
    "bitfit": ([], L * 2 * H + H),  # no biases in Llama: the two RMSNorms per layer + the final one
    "prompt": (["method.num_virtual_tokens=5"], 5 * H),
    "ptuning": (["method.num_virtual_tokens=5", "method.encoder_hidden_size=32"],
                5 * H + (H * 32 + 32) + (32 * 32 + 32) + (32 * H + H)),  # embedding + 3-layer MLP
    "prefix": (["method.num_virtual_tokens=5", "method.encoder_hidden_size=32"],
               5 * KV + (KV * 32 + 32) + (32 * L * 2 * KV + L * 2 * KV)),  # embedding + MLP to all layers' K,V
    "ptuning-v2": (["method.num_virtual_tokens=5"], 5 * L * 2 * KV),
    # two bottlenecks per layer (down H x 8 + bias, up 8 x H + bias) + the RMSNorms (Houlsby trains
    # the norms): two per layer and the final one
    "adapter": (["method.bottleneck=8"], L * 2 * ((H * 8 + 8) + (8 * H + H)) + (L * 2 + 1) * H),
    "ia3": ([], L * (KV + KV + I)),  # k and v outputs, down_proj input
    "loha": (["method.r=4"], L * 2 * 4 * (Q + K + V + O)),
    # LoKr: W ~ w1 (x) w2 with out = a*b, in = c*d split near the square root (64 = 8*8, 32 = 4*8);
    # w1 is a x c; w2 is b x d in full because r=4 is not below max(b, d)/2 = 4.
    "lokr": (["method.r=4"], L * (2 * (8 * 8 + 8 * 8) + 2 * (4 * 8 + 8 * 8))),
    "adalora": (["method.init_r=6", "method.target_r=2"], L * 6 * (ALL + 7)),  # A, B and E (6) per module
    "dylora": (["method.r=8"], L * 8 * ALL),
    "vera": (["method.r=16"], L * ((16 + H) + (16 + KV))),  # d (r) and b (out) vectors for q and v
    "longlora": (["method.r=4"], None),  # checked in test_longlora_trains_lora_embeddings_and_norms
    # A sees in/32 pooled inputs: r * (in / 32 + out) per module
    # MAM: 5 key and 5 value prefixes per layer (KV wide) + the parallel adapter (down H x 8 + bias, up 8 x H + bias)
    "mam": (["method.prefix_length=5", "method.ffn_bottleneck=8"], L * (2 * 5 * KV + (H * 8 + 8) + (8 * H + H))),
    # UniPELT: gated LoRA on q and v (r x (in + out), a gate H + 1 each), gated prefixes (2 x 5 x KV + a gate)
    # and the gated adapter after the feed-forward block (as above + a gate)
    "unipelt": (["method.r=4", "method.prefix_length=5", "method.bottleneck=8"],
                L * (4 * Q + 4 * V + 2 * 5 * KV + (H * 8 + 8) + (8 * H + H) + 4 * (H + 1))),
    "qalora": (["method.r=4", "method.group_size=32"],
               L * 4 * ((H // 32 + H) + (H // 32 + KV) * 2 + (H // 32 + H) + (H // 32 + I) * 2 + (I // 32 + H))),
}


def perturbed_for_eval(model, tok, scale):
    """Stand-in for training: perturb every trainable tensor; returns a test input."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
    model.eval()
    return torch.tensor([tok("What is the capital of France? Paris.")["input_ids"]])


def _setup(tiny_overrides, method, extra):
    cfg = compose([*tiny_overrides, f"method={method}", *extra, "dataset.packing=false"]).cfg
    torch.manual_seed(0)
    model, tok = model_load.load(cfg, torch.device("cpu"))
    model = apply_method(model, cfg, Setup(total_steps=4, model_path=str(cfg.model.path)))
    return cfg, model, tok


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_exactly_its_parameters(method, tiny_overrides):
    extra, expected = METHODS[method]
    cfg, model, tok = _setup(tiny_overrides, method, [*extra, "train.lr=1e-2", "train.max_steps=4"])
    trainable, total = count_parameters(model)
    if expected is not None:
        assert trainable == expected
    assert 0 < trainable < total
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    samples = build(cfg.dataset, "sft", 0, tok).train[:8]
    accelerator = make_accelerator(cfg, torch.device("cpu"))
    hooks = hooks_for(cfg)
    optimizer = build_optimizer(model, cfg.train, hooks.lr_scale)
    scheduler = build_scheduler(optimizer, cfg.train, 4)
    losses = []
    for step in range(4):
        batch = collate(samples[(step % 2) * 4:(step % 2) * 4 + 4], tok.pad_token_id)
        losses.append(train_step(model, CAUSAL_LM, [batch], accelerator, optimizer, scheduler, 1.0, hooks, step)["loss"])
    assert all(math.isfinite(x) for x in losses)
    params = dict(model.named_parameters())
    changed = {n for n, p in params.items() if not torch.equal(p.detach(), before[n])}
    if method == "adalora":  # a matrix whose whole rank budget was pruned keeps E at its zero init
        changed |= {n for n in wanted - changed if "lora_E" in n and not params[n].any()}
    assert changed == wanted, (sorted(wanted - changed)[:3], sorted(changed - wanted)[:3])


@pytest.mark.parametrize("method", [m for m in METHODS if m != "longlora"])
def test_saved_method_reloads_with_identical_outputs(method, tiny_overrides, tiny_model_dir, tmp_path):
    from peft import PeftModel

    extra, _ = METHODS[method]
    cfg, model, tok = _setup(tiny_overrides, method, extra)
    ids = perturbed_for_eval(model, tok, 0.05)
    mask = torch.ones_like(ids)
    expected = model(input_ids=ids, attention_mask=mask).logits
    out = save_trained(model, tok, cfg.method, str(tiny_model_dir), tmp_path / "saved")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, out) if is_peft(model) else load_trained(base, out)
    got = reloaded.eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_adapter_trains_the_norms_unless_told_not_to(tiny_overrides, tiny_model_dir):
    """Houlsby et al. train the layer norms with the bottlenecks; method.train_norms=false does not."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    h, layers = config.hidden_size, config.num_hidden_layers
    bottlenecks = layers * 2 * ((h * 8 + 8) + (8 * h + h))  # after attention and after the MLP
    norms = (2 * layers + 1) * h  # RMSNorm weights: before attention, before the MLP, and the final norm
    for train_norms, expected in (("true", bottlenecks + norms), ("false", bottlenecks)):
        _, model, _ = _setup(tiny_overrides, "adapter", ["method.bottleneck=8", f"method.train_norms={train_norms}"])
        assert count_parameters(model)[0] == expected
        trained = [n for n, p in model.named_parameters() if p.requires_grad and "norm" in n]
        assert len(trained) == (2 * layers + 1 if train_norms == "true" else 0)


def test_lora_plus_gives_b_a_larger_learning_rate(tiny_overrides):
    cfg, model, _ = _setup(tiny_overrides, "lora", ["method.loraplus_lr_ratio=16", "train.lr=1e-3"])
    optimizer = build_optimizer(model, cfg.train, hooks_for(cfg).lr_scale)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        kinds = {("lora_B" in names[id(p)]) for p in group["params"]}
        assert len(kinds) == 1
        assert group["lr"] == pytest.approx(1.6e-2 if kinds.pop() else 1e-3)


def test_pissa_moves_the_principal_part_into_the_adapter(tiny_overrides, tiny_model_dir):
    cfg, model, tok = _setup(tiny_overrides, "lora", ["method.init=pissa", "method.r=4"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok("hello world")["input_ids"]])
    # PiSSA: base residual + adapter = original weight, so the output starts unchanged...
    torch.testing.assert_close(model.eval()(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # ...and B is not zero (unlike default LoRA init).
    b = [p for n, p in model.named_parameters() if "lora_B" in n][0]
    assert b.abs().sum() > 0


def test_bitfit_refuses_a_bias_free_model_when_norms_are_off(tiny_overrides):
    from ftune.errors import FtuneError

    with pytest.raises(FtuneError, match="no bias terms"):
        _setup(tiny_overrides, "bitfit", ["method.norms=never"])


def test_soft_prompts_turn_packing_off_with_a_note(tiny_overrides):
    composed = compose([*tiny_overrides, "method=prompt", "dataset.packing=true"])
    assert composed.cfg.dataset.packing is False
    assert any("packing" in note for note in composed.notes)


def test_adalora_reallocates_ranks_during_training(tiny_overrides, tmp_path):
    from ftune.train.run import train

    summary = train(compose([*tiny_overrides, "method=adalora", "method.init_r=6", "method.target_r=2",
                             "method.tinit=0.1", "method.tfinal=0.2", "train.max_steps=20", "train.run_name=ada",
                             "train.lr=1e-2"]))
    import json

    adapter_cfg = json.loads((tmp_path / "outputs" / "ada" / "adapter" / "adapter_config.json").read_text())
    ranks = list(adapter_cfg["rank_pattern"].values())
    assert ranks, "the budget update wrote a rank pattern"
    kept = {sum(mask) for mask in ranks}
    assert len(kept) > 1, "final ranks differ per matrix"
    assert all(r <= 6 for r in kept) and summary["steps"] == 20


def test_dylora_reports_every_rank_and_saves_a_cut_adapter(tiny_overrides, tmp_path, tiny_model_dir):
    from ftune.train.run import train

    summary = train(compose([*tiny_overrides, "method=dylora", "method.r=8", "method.save_rank=4",
                             "train.max_steps=6", "train.run_name=dy", "train.lr=1e-2"]))
    by_rank = summary["eval_loss_by_rank"]
    assert set(by_rank) == {"1", "2", "4", "8"}
    assert len(set(by_rank.values())) > 1, "ranks give different models"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cut = load_trained(base, tmp_path / "outputs" / "dy" / "adapter")
    a = [p for n, p in cut.named_parameters() if n.endswith("lora_A")][0]
    assert a.shape[0] == 4


MERGEABLE = ["lora", "lora-attn", "loha", "lokr", "ia3", "vera", "adalora", "dylora", "bitfit", "qalora"]


@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_equals_the_adapter(method, tiny_overrides):
    from ftune.methods.merge import merge

    extra, _ = METHODS[method]
    cfg, model, tok = _setup(tiny_overrides, method, extra)
    ids = perturbed_for_eval(model, tok, 0.05)
    expected = model(input_ids=ids).logits
    if method == "dylora":  # merge at a chosen rank: compare with the adapter at that rank
        from ftune.methods.dylora import set_rank

        set_rank(model, 4)
        expected = model(input_ids=ids).logits
    merged = merge(model, cfg.method)
    assert not is_peft(merged)
    assert not [n for n, p in merged.named_parameters() if "lora" in n or "adapter" in n]
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["prompt", "prefix", "adapter", "mam", "unipelt"])
def test_merge_refuses_with_the_reason(method, tiny_overrides):
    from ftune.errors import FtuneError
    from ftune.methods.merge import merge

    extra, _ = METHODS[method]
    cfg, model, _ = _setup(tiny_overrides, method, extra)
    with pytest.raises(FtuneError, match="cannot be merged"):
        merge(model, cfg.method)


def test_qalora_merge_is_exact_and_stays_group_quantised(tiny_overrides):
    """Merged quantised model == quantised base + adapter; codes and scales unchanged, zeros moved."""
    from ftune.methods.merge import merge
    from ftune.methods.qalora import GroupQuantLinear, QALoraLinear

    cfg, model, tok = _setup(tiny_overrides, "qalora", ["method.r=4", "method.group_size=32"])
    ids = perturbed_for_eval(model, tok, 0.1)
    adapted = model(input_ids=ids).logits
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QALoraLinear)
    codes, scale, zero = layer.base.codes.clone(), layer.base.scale.clone(), layer.base.zero.clone()
    # the base really is INT4: 16 levels, dequantised close to the original weights
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    merged = merge(model, "qalora")
    q = merged.model.layers[0].self_attn.q_proj
    assert isinstance(q, GroupQuantLinear)
    assert torch.equal(q.codes, codes) and torch.equal(q.scale, scale) and not torch.equal(q.zero, zero)
    torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_longlora_trains_lora_embeddings_and_norms_with_s2_attention(tiny_overrides, tiny_model_dir, tmp_path):
    from peft import PeftModel

    from ftune.methods.longlora import ATTENTION_NAME, scale_rope

    cfg, model, tok = _setup(tiny_overrides, "longlora", ["method.r=4", "method.context_factor=2"])
    trainable, _ = count_parameters(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    assert trainable == L * 4 * (Q + K + V + O) + vocab * H + (L * 2 * H + H)
    assert model.config._attn_implementation == ATTENTION_NAME
    assert model.config.rope_parameters["rope_type"] == "linear" and model.config.rope_parameters["factor"] == 2.0
    ids = perturbed_for_eval(model, tok, 0.05)
    expected = model(input_ids=ids).logits
    out = save_trained(model, tok, cfg.method, str(tiny_model_dir), tmp_path / "saved")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    scale_rope(base, 2.0)  # a user reloading in plain peft sets the same RoPE scaling
    got = PeftModel.from_pretrained(base, out).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", ["pt", "sft"])
@pytest.mark.parametrize("method", sorted(set(METHODS) | {"full", "freeze", "qlora"}))
def test_every_method_runs_both_stages_end_to_end(method, stage, tiny_overrides):
    import importlib.util

    from ftune.train.run import train

    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed")
    extra, _ = METHODS.get(method, ([], None))
    data = ["dataset=smol-corpus", "stage=pt"] if stage == "pt" else []
    packing = ["dataset.packing=false"] if method == "longlora" else []
    summary = train(compose([*tiny_overrides, f"method={method}", *extra, *data, *packing, "train.max_steps=2",
                             f"train.run_name={method}-{stage}", "dataset.eval_max_rows=8"]))
    assert summary["steps"] == 2 and math.isfinite(summary["eval_loss_after"])
