"""Scale-out: every hardware profile composes and gives the right launch command; two CPU
processes (DDP, and FSDP2 over gloo) train exactly like one process at the same global batch,
and save a complete adapter."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from ftune.config.compose import compose
from ftune.errors import FtuneError
from ftune.runtime import world_size
from ftune.train import distributed
from ftune.train.run import train

PROFILES = ["cpu", "single-gpu", "multi-gpu", "fsdp", "fsdp-offload", "deepspeed-zero2", "deepspeed-zero3",
            "deepspeed-zero3-offload", "multi-node", "cpu-ddp", "cpu-fsdp"]


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_composes_with_its_launch_command(profile, monkeypatch):
    for var in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    extra = ["hardware.num_processes=8"] if profile not in ("cpu", "single-gpu", "cpu-ddp", "cpu-fsdp") else []
    if profile == "multi-node":
        extra += ["hardware.node_rank=1", "hardware.master_addr=10.0.0.1"]
    cfg = compose([f"hardware={profile}", "train.run_name=r", *extra]).cfg
    assert cfg.hardware.name == profile
    overrides = [f"hardware={profile}", *extra]
    cmd, env = distributed.launch_command(cfg, overrides)
    world = world_size(cfg)
    i = cmd.index("ftune.cli")
    assert cmd[i - 1] == "-m" and cmd[i + 1] == "train" and cmd[i + 2:i + 2 + len(overrides)] == overrides
    assert f"--nproc-per-node={world // cfg.hardware.num_nodes}" in cmd
    if profile == "multi-node":
        assert world == 16 and {"--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29500"} <= set(cmd)
    else:
        assert "--standalone" in cmd
    # Every process writes to one run directory: the name is fixed before launching.
    assert any(a.startswith("train.run_name=") for a in cmd)
    if cfg.hardware.device == "cpu" and world > 1:
        assert int(env["OMP_NUM_THREADS"]) >= 1
    # Several processes split every step: grad_accum is a multiple of the process count.
    assert cfg.train.grad_accum % world == 0


def test_multi_node_rendezvous_from_slurm_and_clear_errors(monkeypatch):
    for var in ("MASTER_ADDR", "NODE_RANK", "SLURM_NODEID", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    cfg = compose(["hardware=multi-node", "hardware.num_processes=4"]).cfg
    with pytest.raises(FtuneError) as err:
        distributed.launch_command(cfg, [])
    assert len(err.value.problems) == 2 and "hardware.node_rank" in err.value.hint
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[03-04]")
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the list is read directly
    cmd, _ = distributed.launch_command(cfg, [])
    assert {"--node-rank=1", "--master-addr=gpu03", "--nnodes=2"} <= set(cmd)


def test_global_batch_is_kept_when_processes_split_it():
    composed = compose(["hardware=cpu-ddp", "train.micro_batch_size=4", "train.grad_accum=1"])
    assert (composed.cfg.train.micro_batch_size, composed.cfg.train.grad_accum) == (2, 2)
    assert any("same global batch of 4" in n for n in composed.notes)
    grown = compose(["hardware=cpu-ddp", "hardware.num_processes=8", "train.micro_batch_size=4", "train.grad_accum=1"])
    assert grown.cfg.train.grad_accum == 8 and any("grows from 4 to 32" in n for n in grown.notes)


def test_impossible_scale_out_combinations_are_refused():
    with pytest.raises(FtuneError) as err:
        compose(["hardware=cpu-ddp", "hardware.strategy=deepspeed", "hardware.zero_stage=1"])
    assert any("zero_stage must be 2 or 3" in p for p in err.value.problems)
    assert any("needs CUDA GPUs" in p for p in err.value.problems)
    with pytest.raises(FtuneError, match="stage=ppo runs in one process"):
        compose(["recipe=smollm2-ppo", "stage.reward=length", "hardware=cpu-ddp"])
    with pytest.raises(FtuneError, match="cpu_offload applies to strategy=fsdp"):
        compose(["hardware=cpu-ddp", "hardware.cpu_offload=true"])


def _train_cli(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftune.cli", "train", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)


def _losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("profile", ["cpu-ddp", "cpu-fsdp"])
def test_two_processes_train_like_one(profile, tiny_overrides, tmp_path):
    from safetensors.torch import load_file

    common = [*tiny_overrides, "train.max_steps=4", "train.lr=1e-2", "train.log_every=1", "train.micro_batch_size=4",
              "train.grad_accum=1", "train.sample_max_new_tokens=0"]
    one = train(compose([*common, "train.run_name=one"]))
    two_args = [*common, f"hardware={profile}", "hardware.precision=fp32", "train.run_name=two", "train.save_every=2"]
    result = _train_cli(two_args, tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "launching 2 processes" in result.stdout
    assert result.stdout.count("held-out loss before training") == 1  # only rank 0 prints
    out = tmp_path / "outputs"
    two = json.loads((out / "two" / "summary.json").read_text())
    assert _losses(out / "two") == pytest.approx(_losses(out / "one"), rel=1e-4, abs=1e-5)
    assert two["eval_loss_after"] == pytest.approx(one["eval_loss_after"], rel=1e-4)
    # The saved adapter is complete (gathered, not one process's shard) and matches.
    a = load_file(str(out / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "two" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(a[k].shape == b[k].shape for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert not list((out / "two").glob("*.tmp*"))
    # The checkpoint of step 2 holds whole tensors; resuming from it ends where one process ended.
    ckpt = load_file(str(out / "two" / "checkpoints" / "step-0000002" / "trainable.safetensors"))
    assert len(ckpt) == len(a) and all(t.dim() == 2 for t in ckpt.values())
    (out / "two" / "adapter" / "adapter_model.safetensors").unlink()
    resumed = _train_cli([*two_args, "train.resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    c = load_file(str(out / "two" / "adapter" / "adapter_model.safetensors"))
    assert max(float((a[k] - c[k]).abs().max()) for k in a) < 1e-4
    assert _losses(out / "two") == pytest.approx(_losses(out / "one"), rel=1e-4, abs=1e-5)


def test_print_launch_shows_the_torchrun_command(tiny_overrides, tmp_path):
    result = _train_cli([*tiny_overrides, "hardware=cpu-fsdp", "--print-launch"], tmp_path)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert "torch.distributed.run" in line and "--nproc-per-node=2" in line and "hardware=cpu-fsdp" in line
    assert not (tmp_path / "outputs").exists()  # printing launches nothing


def test_profile_attention_setting_reaches_the_model(tiny_overrides):
    import torch

    from ftune.models.load import load

    cfg = compose([*tiny_overrides, "hardware.attn_implementation=eager"]).cfg
    model, _ = load(cfg, torch.device("cpu"))
    assert model.config._attn_implementation == "eager"
    with pytest.raises(FtuneError, match="liger=true needs CUDA"):
        compose(["hardware.liger=true"])


def _one_process_group():
    import os

    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)


@pytest.mark.parametrize("loss,dataset", [("sigmoid", "smol-prefs"), ("kto", "smol-feedback")])
def test_reference_through_the_ddp_wrapper(loss, dataset, tiny_overrides):
    """What reaches objective.loss under strategy=ddp is the DDP wrapper, which forwards only
    forward(): the adapter-disabled reference must still be found, and the loss equal the
    unwrapped model's."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ftune.data.build import build
    from ftune.methods import Setup, apply
    from ftune.models.load import load
    from ftune.train import objectives

    overrides = [o for o in tiny_overrides if not o.startswith("dataset.")]
    cfg = compose(["recipe=smollm2-dpo", f"dataset={dataset}", f"stage.loss={loss}", *overrides,
                   "dataset.max_rows=8", "dataset.max_seq_len=64", "dataset.eval_max_rows=4"]).cfg
    torch.manual_seed(0)
    model, tokenizer = load(cfg, torch.device("cpu"))
    model = apply(model, cfg, Setup(total_steps=1, model_path=cfg.model.path))
    for name, p in model.named_parameters():  # a trained adapter: policy != reference
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    data = build(cfg.dataset, cfg.stage.name, cfg.train.seed, tokenizer)
    objective = objectives.get(cfg.stage, cfg.dataset, model)
    batch = objective.collate(data.train[:4], tokenizer.pad_token_id)
    want, _, _ = objective.loss(model, batch)
    _one_process_group()
    try:
        wrapped = DistributedDataParallel(model)
        got, _, _ = objective.loss(wrapped, batch)
    finally:
        dist.destroy_process_group()
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert abs(float(want) - objective.count(batch) * (0.5 if loss == "kto" else math.log(2))) > 1e-3


def test_a_failure_inside_the_relaunch_ends_in_one_panel(tiny_overrides, tmp_path):
    """An input error found only once the processes run (a bad data row) ends in ftune's panel,
    printed once, with the process's exit code and no launcher traceback."""
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    args = [*tiny_overrides, "hardware=cpu-ddp", "train.max_steps=1", "dataset.sources=[{path: bad.jsonl, format: alpaca}]"]
    result = _train_cli(args, tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert out.count("ftune: error") == 1 and "bad.jsonl" in out and "row 2" in out, out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]


def _parity(tiny_overrides, tmp_path, stage_args: list[str], profile: str = "cpu-ddp") -> tuple[dict, dict]:
    """The same run in one process and in two, at micro-batch 1 x grad_accum 4: each process
    accumulates two micro-batches (the no-sync path) before the gradients are averaged."""
    common = [*stage_args, "train.max_steps=3", "train.lr=5e-3", "train.log_every=1", "train.micro_batch_size=1",
              "train.grad_accum=4", "train.sample_max_new_tokens=0", "train.eval_every=2"]
    train(compose([*common, "train.run_name=one"]))
    result = _train_cli([*common, f"hardware={profile}", "hardware.precision=fp32", "train.run_name=two"], tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = tmp_path / "outputs"
    rows = {}
    for name in ("one", "two"):
        rows[name] = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        rows[name] = {"train": [r for r in rows[name] if "loss" in r],
                      "summary": json.loads((out / name / "summary.json").read_text())}
    return rows["one"], rows["two"]


def _assert_same(one: dict, two: dict, keys: tuple[str, ...]) -> None:
    assert len(one["train"]) == len(two["train"]) == 3
    for a, b in zip(one["train"], two["train"]):
        for key in ("loss", "grad_norm", *keys):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a, b)
    for key in ("eval_loss_before", "eval_loss_after"):
        assert two["summary"][key] == pytest.approx(one["summary"][key], rel=1e-4, abs=1e-6)


def _pref_overrides(tiny_overrides, dataset, recipe="smollm2-dpo"):
    return [f"recipe={recipe}", f"dataset={dataset}", *(o for o in tiny_overrides if not o.startswith("dataset.")),
            "dataset.max_rows=24", "dataset.max_seq_len=96", "dataset.eval_max_rows=4"]


@pytest.mark.parametrize("loss,dataset", [("sigmoid", "smol-prefs"), ("kto", "smol-feedback")])
def test_two_processes_train_dpo_and_kto_like_one(loss, dataset, tiny_overrides, tmp_path):
    one, two = _parity(tiny_overrides, tmp_path, [*_pref_overrides(tiny_overrides, dataset), f"stage.loss={loss}"])
    _assert_same(one, two, ("accuracy", "kl") if loss == "kto" else ("accuracy", "margin"))
    assert two["train"][-1]["loss"] != pytest.approx(one["train"][0]["loss"], abs=1e-6)  # it trained


def test_two_processes_train_a_reward_model_like_one(tiny_overrides, tmp_path):
    one, two = _parity(tiny_overrides, tmp_path, _pref_overrides(tiny_overrides, "smol-prefs", "smollm2-rm"))
    _assert_same(one, two, ("accuracy",))


def test_two_processes_accumulate_sft_like_one(tiny_overrides, tmp_path):
    one, two = _parity(tiny_overrides, tmp_path, list(tiny_overrides))
    _assert_same(one, two, ())
