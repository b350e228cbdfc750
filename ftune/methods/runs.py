"""A finished run directory as a model: its base with what its method trained. This is how stages
chain: SFT -> DPO and SFT -> RM -> PPO each name the previous run directory
(model.path=outputs/<sft run>, stage.reward_model=outputs/<rm run>); the scalar head of an rm/ppo
run is loaded by the stage that needs it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ftune.config.schema import FtuneConfig
from ftune.methods.merge import merge as merge_method
from ftune.methods.saving import attach_trained
from ftune.models import load as model_load
from ftune.models.runs import is_run_dir, run_config, trained_folder
from ftune.runtime import DTYPE_NAMES, weight_dtype


def load_model(cfg: FtuneConfig, device: torch.device) -> tuple[Any, Any]:
    """(model, tokenizer) for cfg.model.path, which may also be an earlier run: then its base with
    its training merged in, ready to train on."""
    path = model_load.resolve_model_path(cfg.model)
    if is_run_dir(path):
        model, tokenizer, _ = load_run(Path(path), device, current=cfg, merge=True)
        model.config.use_cache = False
        return model, tokenizer
    return model_load.load(cfg, device)


def load_run(run_dir: Path, device: torch.device, current: FtuneConfig | None = None, merge: bool = False
             ) -> tuple[Any, Any, FtuneConfig]:
    """(model with the run's training applied, tokenizer, the run's config).

    `current` is the config of the run that loads this one: its hardware and method decide the
    weight dtype (a full fine-tune on top keeps fp32 master weights). merge=True folds the
    method into the weights, giving a plain model to train on."""
    run_dir = Path(run_dir)
    saved = run_config(run_dir)
    folder = trained_folder(run_dir, saved)
    loader = current or saved
    model_cfg = dataclasses.replace(saved.model, dtype=DTYPE_NAMES[weight_dtype(loader)])
    if saved.method.saves_full_model:  # the saved folder is a complete model
        model_cfg = dataclasses.replace(model_cfg, path=str(folder))
    model, tokenizer = load_model(dataclasses.replace(loader, model=model_cfg), device)
    if not saved.method.saves_full_model:
        model = attach_trained(model, folder, saved.method, loader.model.allow_pickle)
        if merge:
            model = merge_method(model, saved.method)
            model.name_or_path = str(run_dir)
    return model, tokenizer, saved
