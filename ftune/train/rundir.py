"""A run's directory: a fresh one's name, or the run and checkpoint a resume continues, and the
command that resumes it. Decided once, by rank 0, before anything loads."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from ftune.config.compose import Composed
from ftune.config.schema import FtuneConfig
from ftune.errors import FtuneError
from ftune.train import checkpoint


def resolve_run_dir(cfg: FtuneConfig) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from or None)."""
    resume = cfg.train.resume
    if resume.lower() in ("false", "no", "0", ""):
        return fresh_run_dir(cfg), None
    base = Path(cfg.train.output_dir) / cfg.train.run_name if resume.lower() == "true" else Path(resume)
    if not base.exists():
        raise FtuneError(f"train.resume: {base} does not exist", hint="Give the run directory of an earlier run.")
    ckpt = checkpoint.find(base)
    same_recipe(cfg, ckpt.parent.parent)
    return ckpt.parent.parent, ckpt


def fresh_run_dir(cfg: FtuneConfig) -> Path:
    """A new run's directory. An existing one is never written into unless train.overwrite
    (then it is replaced once the model and data have loaded); an automatic name that collides
    gets a -2, -3 ... suffix."""
    root = Path(cfg.train.output_dir)
    if not cfg.train.run_name:
        name = f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, n = root / name, 1
        while path.exists():
            n += 1
            path = root / f"{name}-{n}"
        return path
    path = root / cfg.train.run_name
    if path.exists() and any(path.iterdir()) and not cfg.train.overwrite:
        raise FtuneError(f"train.run_name={cfg.train.run_name}: {path} already holds a run",
                         hint="Resume it with train.resume=true, pick another train.run_name, or replace it "
                              "with `ftune train --overwrite ...`.")
    return path


# What must match for a checkpoint to continue under the current config.
RESUME_KEYS = ("model.path", "method.name", "stage.name")


def same_recipe(cfg: FtuneConfig, run_dir: Path) -> None:
    """Refuse to resume a run directory written by another recipe (other model, method or stage)."""
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return
    # Plain YAML, not the typed loader of models/runs: only a few keys are compared, and a
    # config.yaml written by an older ftune (keys since renamed or added) must still resume.
    try:
        saved = yaml.safe_load(saved_file.read_text()) or {}
    except yaml.YAMLError:
        raise FtuneError(f"train.resume: {saved_file} is not readable YAML",
                         hint="Restore the run's config.yaml, or start a new run.") from None
    current = OmegaConf.to_container(OmegaConf.structured(cfg))
    differ = []
    for key in RESUME_KEYS:
        group, field_name = key.split(".")
        was, now = (saved.get(group) or {}).get(field_name), current[group][field_name]
        if was is not None and was != now:
            differ.append(f"{key}: the run has {was}, this command {now}")
    if differ:
        raise FtuneError(f"train.resume: {run_dir} was written by another recipe", differ,
                         f"Resume with the run's own command (see {run_dir / 'command.txt'}), or start a new run.")


def resume_command(composed: Composed, run_dir: Path) -> str:
    """The command that continues this run from its newest checkpoint."""
    kept = [o for o in composed.overrides
            if not o.startswith(("train.resume=", "train.run_name=", "resume=", "train.overwrite="))]
    return " ".join(["ftune train", *map(shlex.quote, kept), f"train.run_name={shlex.quote(run_dir.name)}",
                     "train.resume=true"])
