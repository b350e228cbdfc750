"""Gradient checkpointing on all, some or none of the decoder layers: the chosen layers really
recompute (and only they), training gives the same losses either way, and `auto` recomputes the
fewest layers that make the memory estimate fit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ftune.config.compose import compose
from ftune.errors import FtuneError
from ftune.plan import AUTO_HEADROOM, GIB, estimate, knobs, model_shape, resolve_checkpointing
from ftune.train import checkpointing
from ftune.train.run import train


def _tiny_llama(layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2))


def _mlp_calls_in_one_step(model) -> list[int]:
    """How often each layer's MLP ran in one forward + backward: 2 where the layer was recomputed."""
    calls = [0] * len(model.model.layers)

    def counted(i, forward):
        def run(*args, **kwargs):
            calls[i] += 1
            return forward(*args, **kwargs)
        return run

    for i, layer in enumerate(model.model.layers):  # forward itself: hooks do not fire in the recompute
        layer.mlp.forward = counted(i, layer.mlp.forward)
    model.train()
    ids = torch.randint(0, 64, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    return calls


@pytest.mark.parametrize("layers, expected", [(0, [1, 1, 1]), (2, [2, 2, 1]), (checkpointing.EVERY, [2, 2, 2]), (7, [2, 2, 2])])
def test_only_the_chosen_layers_recompute(layers, expected):
    model = _tiny_llama()
    checkpointing.enable(model, layers)
    assert checkpointing.restrict(model, layers) == sum(c == 2 for c in expected)
    assert _mlp_calls_in_one_step(model) == expected


def test_values_are_read_and_bad_ones_named(tiny_overrides):
    assert compose([*tiny_overrides]).cfg.train.gradient_checkpointing == "auto"
    assert compose([*tiny_overrides, "train.gradient_checkpointing=True"]).cfg.train.gradient_checkpointing == "true"
    assert compose([*tiny_overrides, "train.gradient_checkpointing=3"]).cfg.train.gradient_checkpointing == "3"
    assert checkpointing.layers_for_run(compose([*tiny_overrides, "train.gradient_checkpointing=3"]).cfg) == (3, None)
    with pytest.raises(FtuneError) as err:
        compose([*tiny_overrides, "train.gradient_checkpointing=sometimes"])
    assert any("train.gradient_checkpointing" in p and "sometimes" in p for p in err.value.problems)


def _memory_for(cfg, layers: int) -> float:
    """hardware.memory_gib at which `auto` must recompute exactly `layers` layers."""
    return estimate(cfg, checkpointed=layers).total / AUTO_HEADROOM / GIB * 1.0001


def test_auto_recomputes_the_fewest_layers_that_fit(tiny_overrides):
    cfg = compose([*tiny_overrides, "train.micro_batch_size=16", "dataset.max_seq_len=512"]).cfg
    shape = model_shape(cfg)
    totals = [estimate(cfg, checkpointed=k).total for k in range(shape.layers + 1)]
    assert all(a > b for a, b in zip(totals, totals[1:]))  # each recomputed layer saves memory
    for layers in range(shape.layers + 1):
        cfg.hardware.memory_gib = _memory_for(cfg, layers)
        got, est = resolve_checkpointing(cfg, shape)
        assert got == layers and est.fits
    cfg.hardware.memory_gib = totals[-1] / GIB * 0.5  # nothing fits: every layer, and the preflight refuses
    got, est = resolve_checkpointing(cfg, shape)
    assert got == shape.layers and not est.fits
    cfg.train.gradient_checkpointing = "false"  # a fixed choice is kept, fit or not
    assert resolve_checkpointing(cfg, shape)[0] == 0


def test_knobs_offer_checkpointing_only_when_auto_has_not_tried_it(tiny_overrides):
    over = [*tiny_overrides, "train.micro_batch_size=16", "dataset.max_seq_len=512"]
    cfg = compose([*over, "train.gradient_checkpointing=false"]).cfg
    cfg.hardware.memory_gib = _memory_for(cfg, 1)
    found = knobs(cfg, model_shape(cfg))
    assert any(f.startswith("train.gradient_checkpointing=auto") and "(checkpointing 1 layer)" in f for f in found)
    cfg.train.gradient_checkpointing = "auto"
    assert resolve_checkpointing(cfg)[1].fits  # auto fits by itself: nothing to suggest about it
    assert not any("gradient_checkpointing" in f for f in knobs(cfg, model_shape(cfg)))


def test_auto_run_recomputes_what_the_estimate_needs_and_learns_the_same(tiny_overrides):
    over = [*tiny_overrides, "train.max_steps=3", "dataset.max_seq_len=512", "train.micro_batch_size=8"]
    plain = train(compose([*over, "train.gradient_checkpointing=false", "train.run_name=plain"]))
    cfg_auto = compose([*over, "train.run_name=auto"])
    cfg_auto.cfg.hardware.memory_gib = _memory_for(cfg_auto.cfg, 1)
    auto = train(cfg_auto)
    assert plain["checkpointed_layers"] == 0 and auto["checkpointed_layers"] == 1
    losses = [[json.loads(line)["loss"] for line in open(f"{s['run_dir']}/metrics.jsonl") if '"loss"' in line]
              for s in (plain, auto)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert auto["eval_loss_after"] == pytest.approx(plain["eval_loss_after"], rel=1e-5)


def test_plan_shows_what_auto_chose(tiny_overrides, tmp_path):
    over = [*tiny_overrides, "train.micro_batch_size=16", "dataset.max_seq_len=512"]
    memory = _memory_for(compose(over).cfg, 1)
    out = subprocess.run([sys.executable, "-m", "ftune.cli", "plan", *over, f"hardware.memory_gib={memory}"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "gradient checkpointing on 1 of 2 decoder layers" in out.stdout and "does not fit" not in out.stdout


def test_every_layer_recomputed_peaks_at_the_larger_of_one_layer_and_the_logits(tiny_overrides):
    """With every layer recomputed, the layer rebuilt in the backward pass and the head's logits
    (end of the forward pass) are never alive together: the peak holds the larger of the two."""
    cfg = compose([*tiny_overrides, "train.micro_batch_size=16", "dataset.max_seq_len=512"]).cfg
    layers = model_shape(cfg).layers
    some, every = estimate(cfg, checkpointed=layers - 1).parts, estimate(cfg, checkpointed=layers).parts
    inputs_per_layer = every["activations"] / layers  # all a recomputed layer keeps
    one_layer = some["activations"] - (layers - 1) * inputs_per_layer + some["attention scores"]
    assert some["recomputed layer"] == 0 and every["attention scores"] == 0
    assert every["recomputed layer"] > 0  # the tiny model's vocabulary is small: its logits weigh less than a layer
    assert every["logits"] + every["recomputed layer"] == pytest.approx(max(one_layer, every["logits"]))
