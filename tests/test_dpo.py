"""DPO family: loss parity with the papers' formulas, preference data, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from ftune.config.compose import compose
from ftune.data.formats import to_records
from ftune.errors import FtuneError
from ftune.train.objectives.dpo import pair_losses
from ftune.train.run import train


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


# The papers' formulas, written independently on plain floats.
def dpo(pc, pr, rc, rr, lc, lr, beta, eps):  # Rafailov et al. 2023; eps: conservative DPO
    h = beta * ((pc - rc) - (pr - rr))
    return -(1 - eps) * logsig(h) - eps * logsig(-h)


def ipo(pc, pr, rc, rr, lc, lr, beta, eps):  # Azar et al. 2023, on per-token averaged log-ratios
    return (((pc - rc) / lc - (pr - rr) / lr) - 1 / (2 * beta)) ** 2


def simpo(pc, pr, rc, rr, lc, lr, beta, eps):  # Meng et al. 2024, gamma = 0.5 beta
    return -logsig(beta / lc * pc - beta / lr * pr - 0.5 * beta)


def orpo(pc, pr, rc, rr, lc, lr, beta, eps):  # Hong et al. 2024, lambda = 0.1
    def odds(avg):
        p = math.exp(avg)
        return p / (1 - p)
    return -pc / lc - 0.1 * logsig(math.log(odds(pc / lc) / odds(pr / lr)))


FORMULAS = {"sigmoid": (dpo, 0.0), "cdpo": (dpo, 0.2), "ipo": (ipo, 0.0), "simpo": (simpo, 0.0), "orpo": (orpo, 0.0)}


@pytest.mark.parametrize("loss", list(FORMULAS))
def test_losses_match_the_papers(loss):
    formula, eps = FORMULAS[loss]
    g = torch.Generator().manual_seed(3)
    n = 16
    lc, lr = torch.randint(3, 40, (n,), generator=g).double(), torch.randint(3, 40, (n,), generator=g).double()
    pc, pr = -lc * torch.rand(n, generator=g, dtype=torch.float64) * 3, -lr * torch.rand(n, generator=g, dtype=torch.float64) * 3
    rc, rr = pc + torch.randn(n, generator=g, dtype=torch.float64), pr + torch.randn(n, generator=g, dtype=torch.float64)
    stage = SimpleNamespace(loss=loss, beta=0.3, label_smoothing=eps, simpo_gamma_ratio=0.5, orpo_lambda=0.1)
    ours, _, _ = pair_losses(stage, pc, pr, lc, lr, rc, rr)
    for i in range(n):
        ref = formula(*(float(t[i]) for t in (pc, pr, rc, rr, lc, lr)), 0.3, eps)
        assert float(ours[i]) == pytest.approx(ref, abs=1e-6)


def test_preference_rows_in_the_shapes_people_bring():
    rows = [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."},
        {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
         "chosen": "4.", "rejected": "5."},
    ]
    recs = to_records(rows, "preference", {}, None, "prefs")
    assert recs[0] == {"messages": [{"role": "user", "content": "Capital of France?"}], "chosen": "Paris.", "rejected": "Rome."}
    assert recs[1]["messages"] == [{"role": "user", "content": "Hi"}] and recs[1]["rejected"] == "Go away."
    assert recs[2]["messages"][0]["role"] == "system" and recs[2]["chosen"] == "4."
    with pytest.raises(FtuneError, match="row 1"):
        to_records([{"prompt": "x", "chosen": "a"}], "preference", {}, None, "prefs")


def test_dpo_needs_preference_data_and_a_reference():
    with pytest.raises(FtuneError, match="format=preference"):
        compose(["stage=dpo"])
    with pytest.raises(FtuneError, match="reference"):
        compose(["recipe=smollm2-dpo", "method=full"])
    assert compose(["recipe=smollm2-dpo", "method=full", "stage.loss=simpo"]).cfg.stage.loss == "simpo"


def _tiny_dpo(tiny_overrides, *extra):
    overrides = [o for o in tiny_overrides if not o.startswith("dataset.")]
    return train(compose(["recipe=smollm2-dpo", *overrides, "dataset.max_rows=32", "dataset.max_seq_len=128",
                          "train.max_steps=3", "dataset.eval_max_rows=8", *extra]))


@pytest.mark.parametrize("loss,method", [("sigmoid", "lora"), ("ipo", "lora"), ("simpo", "full"), ("orpo", "lora")])
def test_tiny_dpo_runs_and_reports_preference_metrics(loss, method, tiny_overrides, tmp_path):
    summary = _tiny_dpo(tiny_overrides, f"stage.loss={loss}", f"method={method}", f"train.run_name={loss}")
    after = summary["eval_metrics_after"]
    assert set(after) >= {"accuracy", "margin", "rewards_chosen", "rewards_rejected"}
    assert 0 <= after["accuracy"] <= 1
    rows = [json.loads(x) for x in (tmp_path / "outputs" / loss / "metrics.jsonl").read_text().splitlines()]
    assert "accuracy" in rows[1] and "margin" in rows[1]


def test_dpo_starts_at_log_two_with_the_adapter_as_reference(tiny_overrides):
    """At step 0 policy == reference, so every pair's DPO loss is log 2 and margins are 0."""
    summary = _tiny_dpo(tiny_overrides, "train.run_name=l2", "train.max_steps=1")
    assert summary["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["eval_metrics_before"]["margin"] == pytest.approx(0, abs=1e-6)
