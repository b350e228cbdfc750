"""KTO on unpaired feedback, and the reference options of the DPO family (precomputed log-probs,
a separate reference model for full fine-tuning)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from ftune.config.compose import compose
from ftune.data.formats import to_records
from ftune.errors import FtuneError
from ftune.train.objectives.dpo import kl_estimate, kto_losses
from ftune.train.run import train


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_loss_matches_the_paper():
    """Ethayarajh et al. 2024, eq. 8, with z0 = max(0, mean KL over mismatched rows), on floats."""
    g = torch.Generator().manual_seed(5)
    n = 12
    p, ref = -torch.rand(n, generator=g, dtype=torch.float64) * 30, -torch.rand(n, generator=g, dtype=torch.float64) * 30
    kl_p, kl_r = -torch.rand(n, generator=g, dtype=torch.float64) * 30, -torch.rand(n, generator=g, dtype=torch.float64) * 30
    desirable = torch.rand(n, generator=g) < 0.5
    stage = SimpleNamespace(beta=0.2, kto_desirable_weight=1.3, kto_undesirable_weight=0.7)
    z0 = kl_estimate((kl_p - kl_r).sum(), n)
    ours, _ = kto_losses(stage, p, ref, z0, desirable)
    z = max(0.0, sum(float(a - b) for a, b in zip(kl_p, kl_r)) / n)
    assert float(z0) == pytest.approx(z)
    for i in range(n):
        r = float(p[i] - ref[i])
        want = 1.3 * (1 - sigmoid(0.2 * (r - z))) if desirable[i] else 0.7 * (1 - sigmoid(0.2 * (z - r)))
        assert float(ours[i]) == pytest.approx(want, abs=1e-6)


def test_feedback_rows():
    rows = [{"prompt": "2+2?", "completion": "4", "label": True},
            {"prompt": "2+2?", "completion": "5", "label": "bad"},
            {"completion": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "label": 1}]
    recs = to_records(rows, "feedback", {}, None, "fb")
    assert [r["label"] for r in recs] == [True, False, True]
    assert recs[2]["messages"] == [{"role": "user", "content": "Hi"}] and recs[2]["completion"] == "Hello"
    with pytest.raises(FtuneError, match="row 1: column 'label'"):
        to_records([{"prompt": "x", "completion": "y", "label": "maybe"}], "feedback", {}, None, "fb")


def test_kto_needs_feedback_data_and_feedback_needs_kto():
    with pytest.raises(FtuneError, match="stage.loss=kto takes format=feedback"):
        compose(["recipe=smollm2-dpo", "stage.loss=kto"])
    with pytest.raises(FtuneError, match="stage.loss=kto takes format=feedback"):
        compose(["recipe=smollm2-dpo", "dataset=smol-feedback"])
    assert compose(["recipe=smollm2-dpo", "dataset=smol-feedback", "stage.loss=kto"]).cfg.stage.loss == "kto"


def _tiny(tiny_overrides, dataset="smol-prefs", *extra):
    overrides = [o for o in tiny_overrides if not o.startswith("dataset.")]
    return train(compose(["recipe=smollm2-dpo", f"dataset={dataset}", *overrides, "dataset.max_rows=32",
                          "dataset.max_seq_len=128", "dataset.eval_max_rows=8", *extra]))


def test_kto_trains_on_the_tiny_model(tiny_overrides, tmp_path):
    s = _tiny(tiny_overrides, "smol-feedback", "stage.loss=kto", "train.max_steps=8", "train.lr=2e-3", "train.run_name=kto")
    # At the start policy == reference: every reward is 0, z0 = 0, and each loss is 1 - sigmoid(0).
    assert s["eval_loss_before"] == pytest.approx(0.5, abs=1e-6)
    # Held-out KTO loss moves with z0 (the policy's drift), so judge by the implicit rewards:
    # more held-out answers get a reward whose sign matches their label.
    assert s["eval_metrics_after"]["accuracy"] > s["eval_metrics_before"]["accuracy"]
    records = [json.loads(x) for x in (tmp_path / "outputs" / "kto" / "metrics.jsonl").read_text().splitlines()]
    assert all("kl" in r and "accuracy" in r for r in records if "loss" in r)


@pytest.mark.parametrize("loss,dataset", [("sigmoid", "smol-prefs"), ("kto", "smol-feedback")])
def test_precomputed_reference_gives_the_same_training(tiny_overrides, loss, dataset):
    common = ["train.max_steps=3", "train.lr=5e-3", f"stage.loss={loss}"]
    live = _tiny(tiny_overrides, dataset, *common, "train.run_name=live")
    pre = _tiny(tiny_overrides, dataset, *common, "train.run_name=pre", "stage.precompute_reference=true")
    assert pre["eval_loss_before"] == pytest.approx(live["eval_loss_before"], abs=1e-6)
    assert pre["eval_loss_after"] == pytest.approx(live["eval_loss_after"], abs=1e-4)


def test_full_fine_tuning_with_a_separate_reference_model(tiny_overrides, tiny_model_dir):
    s = _tiny(tiny_overrides, "smol-prefs", "method=full", f"stage.reference={tiny_model_dir}", "train.max_steps=3",
              "train.lr=1e-3", "train.run_name=full-ref")
    assert s["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as the reference
    assert s["eval_loss_after"] < s["eval_loss_before"]
    with pytest.raises(FtuneError, match="stage.reference"):
        compose(["recipe=smollm2-dpo", "method=full"])


def test_kto_z0_is_shared_by_the_whole_step(tiny_overrides, tmp_path):
    """Four micro-batches of one answer accumulate exactly like one micro-batch of four: z0 is the
    KL estimate of the whole step, not of each micro-batch (Ethayarajh et al.: one reference
    point per batch; the reference implementation gathers it over the processes)."""
    common = ["stage.loss=kto", "train.max_steps=3", "train.lr=5e-3", "train.log_every=1",
              "train.sample_max_new_tokens=0"]
    _tiny(tiny_overrides, "smol-feedback", *common, "train.run_name=big", "train.micro_batch_size=4", "train.grad_accum=1")
    _tiny(tiny_overrides, "smol-feedback", *common, "train.run_name=acc", "train.micro_batch_size=1", "train.grad_accum=4")
    rows = {name: [json.loads(x) for x in (tmp_path / "outputs" / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("big", "acc")}
    big, acc = ([r for r in rows[n] if "loss" in r] for n in ("big", "acc"))
    assert len(big) == len(acc) == 3
    for a, b in zip(big, acc):
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-6)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
    assert big[-1]["kl"] > 0  # the policy moved away from the reference: z0 is not trivially 0
