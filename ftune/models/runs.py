"""A finished run directory as a model: its base, what its method trained, and (rm, ppo) its
scalar head. This is how stages chain: SFT -> DPO and SFT -> RM -> PPO each name the previous
run directory (model.path=outputs/<sft run>, stage.reward_model=outputs/<rm run>).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ftune.config.schema import FtuneConfig
from ftune.errors import FtuneError

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.yaml").is_file() and (path / "command.txt").is_file()


def run_config(run_dir: Path) -> FtuneConfig:
    from ftune.config.compose import load_saved

    try:
        return load_saved(run_dir / "config.yaml")
    except FtuneError:
        raise
    except Exception as exc:  # a hand-edited or foreign config.yaml
        raise FtuneError(f"{run_dir / 'config.yaml'}: not a readable ftune run config ({type(exc).__name__})",
                         [str(exc).splitlines()[0][:200]], "Give the directory of a finished `ftune train` run.") from None


def trained_folder(run_dir: Path, cfg: FtuneConfig) -> Path:
    from ftune.methods.saving import output_name

    folder = run_dir / output_name(cfg.method.name)
    if not folder.is_dir():
        raise FtuneError(f"{run_dir}: the run has no trained output ({folder.name}/ is missing)",
                         hint="Did the run finish? Resume it with resume=<run dir>, or give another run.")
    return folder


def load_run(run_dir: Path, device: torch.device, current: FtuneConfig | None = None, merge: bool = False
             ) -> tuple[Any, Any, FtuneConfig]:
    """(model with the run's training applied, tokenizer, the run's config).

    `current` is the config of the run that loads this one: its hardware and method decide the
    weight dtype (a full fine-tune on top keeps fp32 master weights). merge=True folds the
    method into the weights, giving a plain model to train on."""
    from ftune.methods.merge import merge as merge_method
    from ftune.methods.saving import FULL_MODEL_METHODS, attach_trained
    from ftune.models.load import load, weight_dtype

    run_dir = Path(run_dir)
    saved = run_config(run_dir)
    folder = trained_folder(run_dir, saved)
    loader = current or saved
    model_cfg = dataclasses.replace(saved.model, dtype=DTYPE_NAMES[weight_dtype(loader)])
    if saved.method.name in FULL_MODEL_METHODS:  # the saved folder is a complete model
        model_cfg = dataclasses.replace(model_cfg, path=str(folder))
    model, tokenizer = load(dataclasses.replace(loader, model=model_cfg), device)
    if saved.method.name not in FULL_MODEL_METHODS:
        model = attach_trained(model, folder, loader.model.allow_pickle)
        if merge:
            model = merge_method(model, saved.method.name)
            model.name_or_path = str(run_dir)
    return model, tokenizer, saved
