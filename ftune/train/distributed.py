"""Several processes: who am I, how to start them, how to shard, how to save whole tensors.

- `ftune train … hardware=multi-gpu` started as a plain command builds a torchrun command for
  the profile (processes per node, nodes, rendezvous from the config, the usual environment
  variables or SLURM) and re-executes itself under it; `--print-launch` prints that command.
- Every process composes the same config and runs the same loop; each takes its share of every
  step's micro-batches (trainer.train_step). Rank 0 alone prints and writes files.
- strategy=fsdp shards with FSDP2 (`fully_shard` per decoder layer, then the whole model), on
  CUDA (nccl) or CPU (gloo) alike; strategy=ddp goes through Accelerate. strategy=deepspeed
  composes and prints its launch command, but training with it in several processes is refused
  for now (train/run.py make_accelerator).
- Saving gathers full tensors first (FSDP2: DTensor shards; DeepSpeed ZeRO-3: partitioned
  weights), so a saved adapter is complete whatever the strategy.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from ftune.errors import FtuneError
from ftune.runtime import decoder_layers, processes_per_node

LAUNCHED = "FTUNE_LAUNCHED"  # set in the relaunched processes (never relaunch twice)
ERROR_DIR = "FTUNE_ERROR_DIR"  # where relaunched processes leave their error panel for the launching command


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def in_launcher() -> bool:
    """Started by torchrun/accelerate (or a SLURM script that exports their variables)."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def unwrap_parallel(model: Any) -> Any:
    """The model inside a DDP (or DeepSpeed) wrapper. The wrappers forward only forward(): the
    wrapped model's own methods (peft's disable_adapter, generate, a scalar head's scores) are
    reached through this, never by hasattr on what accelerator.prepare returned."""

    while isinstance(model, DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
        model = model.module
    return model


def _slurm_first_host() -> str | None:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return None
    try:  # scontrol expands compressed lists (node[01-04]) exactly as SLURM means them
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^\[,]+)(?:\[(\d+))?", nodes)  # node[01-04,07] -> node01
    return (m.group(1) + (m.group(2) or "")) if m else None


def rendezvous(hw: Any) -> tuple[int, str, int]:
    """(this node's rank, master address, master port) for a multi-node run."""
    node_rank = hw.node_rank if hw.node_rank >= 0 else int(os.environ.get("NODE_RANK", os.environ.get("SLURM_NODEID", -1)))
    addr = hw.master_addr or os.environ.get("MASTER_ADDR") or _slurm_first_host() or ""
    port = int(os.environ.get("MASTER_PORT", hw.master_port))
    problems = []
    if node_rank < 0:
        problems.append("hardware.node_rank is not set and neither NODE_RANK nor SLURM_NODEID is in the environment")
    if not addr:
        problems.append("hardware.master_addr is not set and neither MASTER_ADDR nor SLURM_JOB_NODELIST is in the environment")
    if problems:
        raise FtuneError(f"hardware.num_nodes={hw.num_nodes}: where is node 0 and which node is this?", problems,
                         "Set hardware.node_rank=<0..N-1> hardware.master_addr=<node 0 host>, or run under SLURM.")
    return node_rank, addr, port


def launch_command(cfg: Any, overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """(torchrun command that runs this `ftune train` in every process, extra environment)."""
    hw = cfg.hardware
    nproc = processes_per_node(hw)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if hw.num_nodes > 1:
        node_rank, addr, port = rendezvous(hw)
        cmd += [f"--nnodes={hw.num_nodes}", f"--node-rank={node_rank}", f"--master-addr={addr}", f"--master-port={port}"]
    else:
        cmd += ["--standalone"]  # one machine: torchrun picks a free port
    # Every process must write to the same run directory: fix its name now, not per process.
    if not any(o.startswith("train.run_name=") for o in overrides) and cfg.train.resume.lower() in ("false", "no", "0", ""):

        overrides = [*overrides, f"train.run_name={cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"]
    cmd += ["-m", "ftune.cli", "train", *overrides]
    env = {LAUNCHED: "1"}
    if hw.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # CPU processes share the cores: without this each would start a thread per core.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return cmd, env


def shell(cmd: list[str], env: dict[str, str] | None = None) -> str:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items() if k != LAUNCHED)
    return (prefix + " " if prefix else "") + " ".join(shlex.quote(c) for c in cmd)


def relaunch(cmd: list[str], env: dict[str, str], debug: bool = False) -> tuple[int, dict | None]:
    """Run the launcher in the foreground (Ctrl-C reaches every process); returns its exit code and
    the first error a process reported ({"title", "text"}), to be shown once by the caller.

    With `debug` it is plain torchrun with every traceback; otherwise ftune.train.torchrun, which
    leaves out the launcher's own traceback (the failed process's panel says what happened)."""

    if not debug and cmd[1:3] == ["-m", "torch.distributed.run"]:
        cmd = [cmd[0], "-m", "ftune.train.torchrun", *cmd[3:]]
    with tempfile.TemporaryDirectory(prefix="ftune-errors-") as folder:
        code = subprocess.run(cmd, env={**os.environ, **env, ERROR_DIR: folder}).returncode
        return code, first_error(folder) if code else None


def report_error(title: str, text: str) -> bool:
    """In a relaunched process: leave the error for the launching command instead of printing it
    (every rank would print its own copy). False when there is no launching command to read it."""

    folder = os.environ.get(ERROR_DIR)
    if not folder or not in_launcher() or not os.path.isdir(folder):
        return False
    record = {"title": title, "text": text, "rank": rank(), "time": time.time()}
    path = os.path.join(folder, f"rank-{rank()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)
    return True


def first_error(folder: str) -> dict | None:
    """The error reported first (the cause; later ones are usually the other ranks losing it)."""

    records = [json.loads(p.read_text()) for p in Path(folder).glob("rank-*.json")]
    return min(records, key=lambda r: (r["time"], r["rank"])) if records else None


# ----------------------------------------------------------------------------- FSDP2

def shard_fsdp(model: Any, hw: Any, device: torch.device) -> Any:
    """FSDP2: each decoder layer, then the root, sharded over all processes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world(),))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if hw.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if device.type == "cuda" and hw.precision in ("bf16", "fp16"):
        # Compute in 16 bits, reduce gradients in fp32 (what autocast would give, without its casts).
        dtype = torch.bfloat16 if hw.precision == "bf16" else torch.float16
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    if not layers:
        raise FtuneError("strategy=fsdp: no decoder layers found to shard", hint="Use strategy=ddp for this model.")
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def is_sharded(model: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state(model: Any, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """Complete tensors on the CPU, in rank 0 (other ranks get {}); every process must call it.

    FSDP2 parameters are DTensor shards: they are gathered here; plain parameters are copied."""
    names = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None
    if not is_sharded(model):
        return {n: p.detach().contiguous().cpu() for n, p in model.state_dict().items()
                if names is None or n in names}
    from torch.distributed.tensor import DTensor

    out = {}
    for name, tensor in model.state_dict().items():
        if names is not None and name not in names:
            continue
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # a collective: all ranks
        if is_main():
            out[name] = full.detach().contiguous().cpu()
    return out


def grad_norm_value(norm: Any) -> float:
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def optimizer_state(model: Any, optimizer: Any) -> dict:
    """The optimiser state to checkpoint: as is, or (FSDP2) gathered and keyed by parameter name."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
    return get_optimizer_state_dict(model, inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: Any, optimizer: Any, tensors: dict[str, torch.Tensor], optim: dict) -> None:
    """Restore saved full tensors and optimiser state (each process reads the same files)."""
    if not is_sharded(model):
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor.to(params[name].device))
        optimizer.load_state_dict(optim)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, tensors, options=options)
    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), optim, options=options)
