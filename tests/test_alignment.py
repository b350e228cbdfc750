"""Reward model and PPO: the formulas against independent writings, rewards, configs, and tiny runs
(RM -> PPO by run directory, SFT -> DPO by run directory)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ftune.config.compose import compose
from ftune.errors import FtuneError
from ftune.train import rewards
from ftune.train.objectives.ppo import adapt_kl_coef, gae, kl_rewards, policy_loss, value_loss
from ftune.train.objectives.reward import pairwise_loss
from ftune.train.run import train


# ----------------------------------------------------------------------------- formulas
def test_pairwise_loss_matches_the_formula():
    g = torch.Generator().manual_seed(1)
    c, r = torch.randn(32, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    ours = pairwise_loss(c, r, margin=0.5, center_coef=0.01)
    for i in range(32):
        # -log sigmoid(x) = log(1 + e^-x), plus the centring term.
        x = float(c[i] - r[i] - 0.5)
        ref = math.log1p(math.exp(-x)) + 0.01 * float(c[i] + r[i]) ** 2
        assert float(ours[i]) == pytest.approx(ref, abs=1e-6)
    assert float(pairwise_loss(torch.zeros(1), torch.zeros(1))) == pytest.approx(math.log(2))


def reference_gae(rewards, values, length, gamma, lam):
    """GAE written as the definition: A_t = sum_k (gamma lam)^k delta_{t+k}, V after the end = 0."""
    out = []
    for t in range(length):
        total = 0.0
        for k in range(t, length):
            next_v = values[k + 1] if k + 1 < length else 0.0
            delta = rewards[k] + gamma * next_v - values[k]
            total += (gamma * lam) ** (k - t) * delta
        out.append(total)
    return out


def test_gae_matches_the_definition_and_stops_at_each_answers_end():
    g = torch.Generator().manual_seed(2)
    rew, val = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    lengths = [7, 4, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths], dtype=torch.float64)
    adv, ret = gae(rew, val, mask, gamma=0.99, lam=0.9)
    for b, n in enumerate(lengths):
        ref = reference_gae(rew[b].tolist(), val[b].tolist(), n, 0.99, 0.9)
        assert adv[b, :n].tolist() == pytest.approx(ref, abs=1e-9)
        assert adv[b, n:].abs().sum() == 0 and ret[b, n:].abs().sum() == 0
        assert ret[b, :n].tolist() == pytest.approx([a + v for a, v in zip(ref, val[b, :n].tolist())], abs=1e-9)


def test_kl_penalty_on_every_token_and_the_score_on_the_last():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = kl_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    assert out.flatten().tolist() == pytest.approx([-0.05, 0.0, 0.1 + 2.0, -0.1, -1.0, 0.0])


def test_clipped_policy_and_value_losses_match_the_formulas():
    g = torch.Generator().manual_seed(3)
    logp, old = torch.randn(50, generator=g) * 0.3 - 2, torch.randn(50, generator=g) * 0.3 - 2
    adv = torch.randn(50, generator=g)
    loss, clipped = policy_loss(logp, old, adv, clip=0.2)
    for i in range(50):
        ratio = math.exp(float(logp[i] - old[i]))
        a = float(adv[i])
        ref = max(-a * ratio, -a * min(max(ratio, 0.8), 1.2))  # Schulman et al. 2017, eq. 7 (negated)
        assert float(loss[i]) == pytest.approx(ref, rel=1e-5, abs=1e-6)
        assert bool(clipped[i]) == (-a * min(max(ratio, 0.8), 1.2) > -a * ratio)
    v, old_v, ret = torch.randn(50, generator=g), torch.randn(50, generator=g), torch.randn(50, generator=g)
    vl = value_loss(v, old_v, ret, clip=0.2)
    for i in range(50):
        vc = float(old_v[i]) + min(max(float(v[i] - old_v[i]), -0.2), 0.2)
        assert float(vl[i]) == pytest.approx(0.5 * max((float(v[i]) - float(ret[i])) ** 2, (vc - float(ret[i])) ** 2), rel=1e-5)


def test_adaptive_kl_moves_towards_the_target_and_is_bounded():
    assert adapt_kl_coef(0.1, kl=12.0, target=6.0, n=100, horizon=1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adapt_kl_coef(0.1, kl=3.0, target=6.0, n=100, horizon=1000) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert adapt_kl_coef(0.1, kl=6.6, target=6.0, n=1000, horizon=1000) == pytest.approx(0.1 * 1.1)


# ----------------------------------------------------------------------------- rewards
def test_rule_rewards(tmp_path):
    msgs = [[{"role": "user", "content": "What is 2+2?"}]]
    assert rewards.rule_scores(rewards.reference_reward, "reference")(msgs, ["The answer is 4."], ["4"]) == [1.0]
    assert rewards.rule_scores(rewards.reference_reward, "reference")(msgs, ["It is 5."], ["4"]) == [0.0]
    assert rewards.rule_scores(rewards.regex_reward(r"\d+"), "regex")(msgs, ["no digits"], [None]) == [0.0]
    assert rewards.length_reward(4)("q", "one two three four", None) == 1.0
    assert rewards.length_reward(4)("q", "one two", None) == 0.5
    user = tmp_path / "my_rewards.py"
    user.write_text("def score(prompt, response, reference):\n    return float(len(response))\n"
                    "def bad(prompt, response, reference):\n    return 'high'\n")
    assert rewards.rule_scores(rewards.python_reward(f"python:{user}:score"), "x")(msgs, ["abc"], [None]) == [3.0]
    with pytest.raises(FtuneError, match="finite number"):
        rewards.rule_scores(rewards.python_reward(f"python:{user}:bad"), "x")(msgs, ["abc"], [None])
    with pytest.raises(FtuneError, match="has no function 'nope'"):
        rewards.python_reward(f"python:{user}:nope")
    with pytest.raises(FtuneError, match="could not load"):
        rewards.python_reward(f"python:{tmp_path}/missing.py:score")


# ----------------------------------------------------------------------------- configs
def test_ppo_needs_a_reward_and_an_adapter(tmp_path):
    with pytest.raises(FtuneError, match="not a run directory"):
        compose(["recipe=smollm2-ppo", f"stage.reward_model={tmp_path}"])
    with pytest.raises(FtuneError, match="needs stage.reward_model"):
        compose(["recipe=ppo-llama2-7b-qlora"])
    with pytest.raises(FtuneError, match="no adapter to disable"):
        compose(["recipe=smollm2-ppo", "stage.reward=length", "method=full"])
    with pytest.raises(FtuneError, match="stage.reward must be one of"):
        compose(["recipe=smollm2-ppo", "stage.reward=lenght"])
    with pytest.raises(FtuneError, match="reward_pattern is not a valid"):
        compose(["recipe=smollm2-ppo", "stage.reward=regex", "stage.reward_pattern='(('"])
    with pytest.raises(FtuneError, match="does not fit stage=rm"):
        compose(["recipe=smollm2-rm", "dataset=smol-instruct"])
    cfg = compose(["recipe=smollm2-ppo", "stage.reward=reference"]).cfg
    assert cfg.stage.name == "ppo" and cfg.dataset.packing is False


# ----------------------------------------------------------------------------- tiny runs
def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_reward_model_trains_saves_and_scores_by_run_path(tiny_overrides, tmp_path):
    s = train(compose(["recipe=smollm2-rm", *tiny_overrides, "train.max_steps=6", "train.run_name=rm",
                       "train.lr=5e-3", "dataset.eval_max_rows=16"]))
    run = tmp_path / "outputs" / "rm"
    assert s["eval_metrics_before"]["accuracy"] == 0.5  # a zero head scores every answer 0: chance
    assert s["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-6)
    assert s["eval_loss_after"] < s["eval_loss_before"]
    assert (run / "adapter" / "scalar_head.safetensors").is_file() and (run / "adapter" / "adapter_config.json").is_file()
    # Loaded back by run path, the reward model gives different scores to different answers.
    scorer = rewards.RewardModelScores(str(run), torch.device("cpu"), "fp32")
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    a, b = scorer([prompt, prompt], ["Paris.", "The capital of France is Rome, of course."], [None, None])
    assert a != b and all(math.isfinite(x) for x in (a, b))


def test_ppo_with_a_rule_reward_trains_policy_and_value_head(tiny_overrides, tmp_path):
    s = train(compose(["recipe=smollm2-ppo", *tiny_overrides, "stage.reward=length", "stage.reward_target_length=3",
                       "stage.max_new_tokens=6", "train.max_steps=4", "train.run_name=ppo", "dataset.eval_max_rows=4",
                       "train.micro_batch_size=4", "train.grad_accum=2", "stage.mini_batches=2", "stage.ppo_epochs=2",
                       "stage.adaptive_kl=true", "stage.kl_horizon=10"]))
    run = tmp_path / "outputs" / "ppo"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4
    for key in ("rollout_reward", "rollout_kl", "entropy", "clip_fraction", "value_loss", "rollout_response_length",
                "kl_coef", "policy_loss", "value_grad_norm"):
        assert all(math.isfinite(r[key]) for r in steps), key
    # One rollout (4 x 2 x 2 answers) serves ppo_epochs x mini_batches = 4 steps; the KL coefficient
    # adapts once per rollout.
    assert len({r["rollout_reward"] for r in steps}) == 1
    assert steps[0]["approx_kl"] == 0.0 and steps[-1]["approx_kl"] > 0.0  # the first step is on-policy
    assert "reward" in s["eval_metrics_after"] and s["eval_metrics_after"]["logratio"] != 0.0
    assert (run / "adapter" / "scalar_head.json").is_file()


def test_rm_then_ppo_by_run_directory(tiny_overrides, tmp_path):
    train(compose(["recipe=smollm2-rm", *tiny_overrides, "train.max_steps=2", "train.run_name=rm"]))
    s = train(compose(["recipe=smollm2-ppo", *tiny_overrides, f"stage.reward_model={tmp_path / 'outputs' / 'rm'}",
                       "stage.max_new_tokens=6", "train.max_steps=2", "train.run_name=ppo", "dataset.eval_max_rows=4"]))
    assert s["steps"] == 2 and math.isfinite(s["eval_metrics_after"]["reward"])
    with pytest.raises(FtuneError, match="not a reward model"):
        rewards.RewardModelScores(str(tmp_path / "outputs" / "ppo"), torch.device("cpu"), "fp32")


def test_a_run_directory_is_a_model_path_with_its_training_merged(tiny_overrides, tmp_path):
    """SFT -> DPO: model.path=<sft run> loads the base with the SFT adapter folded in."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftune.config.compose import compose as compose_cfg
    from ftune.methods.runs import load_model as load

    train(compose(["recipe=smollm2-lora-sft", *tiny_overrides, "train.max_steps=3", "train.run_name=sft",
                   "train.lr=1e-2"]))
    sft = tmp_path / "outputs" / "sft"
    cfg = compose_cfg([*tiny_overrides, f"model.path={sft}"]).cfg
    merged, _ = load(cfg, torch.device("cpu"))
    base = AutoModelForCausalLM.from_pretrained(tiny_overrides[0].split("=", 1)[1], dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, sft / "adapter")
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.no_grad():
        expected = with_adapter(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    s = train(compose(["recipe=smollm2-dpo", *tiny_overrides, f"model.path={sft}", "train.max_steps=2",
                       "train.run_name=dpo"]))
    assert s["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-5)  # the reference is the SFT model


@pytest.mark.parametrize("overrides,expect", [
    (["recipe=smollm2-dpo"], "rejected"),
    (["recipe=smollm2-dpo", "dataset=smol-feedback", "stage.loss=kto"], "desirable"),
    (["recipe=smollm2-ppo", "stage.reward=reference"], "reference:"),
])
def test_data_preview_shows_every_stage_kind(tiny_model_dir, overrides, expect):
    from rich.console import Console

    from ftune.data.preview import preview

    console = Console(record=True, width=120)
    preview(compose([*overrides, f"model.path={tiny_model_dir}"]).cfg, 2, console)
    assert expect in console.export_text()


@pytest.mark.parametrize("method", ["full", "prompt", "ia3"])
def test_reward_model_with_other_methods(tiny_overrides, method):
    """The head reads the body's hidden states (full, ia3) or the full forward's (soft prompts)."""
    s = train(compose(["recipe=smollm2-rm", *tiny_overrides, f"method={method}", "train.max_steps=3",
                       f"train.run_name=rm-{method}", "train.lr=1e-2", "dataset.eval_max_rows=8"]))
    assert s["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-6)
    assert s["eval_loss_after"] != s["eval_loss_before"] and math.isfinite(s["eval_loss_after"])


@pytest.mark.parametrize("shares", [False, True])
def test_value_loss_reaches_the_adapter_only_with_a_shared_trunk(tiny_model_dir, shares):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftune.train.heads import WithScalarHead

    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"],
                                                                                            init_lora_weights=False))
    model = WithScalarHead(lm, init_std=0.1, trunk_grad=shares)
    ids = torch.tensor([[5, 6, 7, 8]])
    _, values = model(ids, torch.ones_like(ids), head="with_logits")
    values.sum().backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert model.head.weight.grad is not None
    assert any(g is not None and g.abs().sum() > 0 for g in lora_grads) == shares


def test_critic_warmup_trains_only_the_value_head(tiny_overrides, tmp_path):
    from safetensors.torch import load_file

    train(compose(["recipe=smollm2-ppo", *tiny_overrides, "stage.reward=length", "stage.max_new_tokens=6",
                   "stage.critic_warmup=5", "train.max_steps=4", "train.run_name=warm", "dataset.eval_max_rows=2"]))
    adapter = load_file(str(tmp_path / "outputs" / "warm" / "adapter" / "adapter_model.safetensors"))
    head = load_file(str(tmp_path / "outputs" / "warm" / "adapter" / "scalar_head.safetensors"))
    assert all(float(t.abs().sum()) == 0.0 for n, t in adapter.items() if "lora_B" in n)  # the policy did not move
    assert float(head["weight"].abs().sum()) > 0  # the critic did
