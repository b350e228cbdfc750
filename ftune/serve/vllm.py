"""`ftune serve --engine vllm`: the same adapters handed to vLLM's multi-LoRA OpenAI server.

ftune checks the runs (peft LoRA adapters on one shared base; vLLM serves plain LoRA, not DoRA,
VeRA, IA3 or ftune's own adapters), resolves the base to a Hugging Face folder (the default GGUF
model becomes its converted folder), writes the training format as a Jinja chat template, and
starts `vllm serve` with one `--lora-modules name=folder` per run. The request's `model` field
picks the adapter, exactly as with ftune's own engine. Needs CUDA and the vllm package;
`--print-command` shows the command anywhere (for SLURM scripts or another machine).
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import torch

from ftune.data import templates
from ftune.data.jinja import to_jinja
from ftune.errors import FtuneError
from ftune.models.load import resolve_model_path
from ftune.models.runs import is_run_dir, run_config, trained_folder

# vLLM accepts these maximum LoRA ranks (--max-lora-rank).
RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def adapters(runs: list[str]) -> tuple[object, list[tuple[str, Path, int]]]:
    """(the shared base config, [(name, adapter folder, rank)]) — refusing what vLLM cannot serve."""
    if not runs:
        raise FtuneError("give at least one run directory to serve")
    first, out = None, []
    for run in map(Path, runs):
        if not is_run_dir(run):
            raise FtuneError(f"{run} is not a run directory", hint="Serve directories of finished ftune train runs.")
        cfg = run_config(run)
        folder = trained_folder(run, cfg)
        config_file = folder / "adapter_config.json"
        peft = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if peft.get("peft_type") != "LORA" or peft.get("use_dora") or not cfg.stage.answers:
            raise FtuneError(f"{run}: method={cfg.method.name} (stage={cfg.stage.name}) is not a plain LoRA adapter, "
                             "which is what vLLM serves",
                             hint="Use --engine ftune for other peft methods, or merge the run (ftune merge) and "
                                  "serve the merged folder with vLLM as a model.")
        first = first or cfg
        if cfg.model.path != first.model.path:
            raise FtuneError(f"{run}: its base {cfg.model.path} differs from {first.model.path}",
                             hint="All served adapters must share one base model.")
        if cfg.dataset.template != first.dataset.template:
            raise FtuneError(f"{run}: trained with template {cfg.dataset.template}, the first run with "
                             f"{first.dataset.template}", hint="vLLM serves one chat template per server.")
        out.append((run.name, folder.resolve(), int(peft.get("r", 8))))
    return first, out


def command(runs: list[str], host: str, port: int, max_loaded: int, template_dir: Path) -> list[str]:
    """The `vllm serve` command line (writes the chat template into template_dir when needed)."""
    from transformers import AutoTokenizer


    cfg, found = adapters(runs)
    base = resolve_model_path(cfg.model)
    rank = max(r for _, _, r in found)
    max_rank = next((r for r in RANKS if r >= rank), None)
    if max_rank is None:
        raise FtuneError(f"LoRA rank {rank} is above vLLM's largest ({RANKS[-1]})")
    script = Path(sys.executable).with_name("vllm")  # the vllm CLI installed beside this Python
    cmd = [str(script) if script.is_file() else "vllm", "serve", base, "--host", host, "--port", str(port),
           "--enable-lora", "--max-loras", str(max(1, min(max_loaded, len(found)))), "--max-lora-rank", str(max_rank),
           "--lora-modules", *(f"{name}={folder}" for name, folder, _ in found)]
    template = templates.load_template(cfg.dataset.template)
    if template is not None:  # the adapters were trained on ftune's format, not the base's own template
        tokenizer = AutoTokenizer.from_pretrained(base)
        path = template_dir / f"{template.name}.jinja"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_jinja(template, tokenizer))
        cmd += ["--chat-template", str(path.resolve())]
    return cmd


def check_available() -> None:


    problems = []
    if not torch.cuda.is_available():
        problems.append("no CUDA device is visible (vLLM serves on GPUs)")
    if importlib.util.find_spec("vllm") is None:
        problems.append("the vllm package is not installed")
    if problems:
        raise FtuneError("--engine vllm cannot start here", problems,
                         "Use --engine ftune (CPU or GPU), or --print-command to get the command for a CUDA machine "
                         "with vllm installed (pip install vllm).")


def shell(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
