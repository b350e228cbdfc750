"""A finished run directory: how to recognise one, its config and the folder of what it trained.
Loading it as a model (its base with its method applied) is ftune.methods.runs: that needs the
methods, which sit above the models layer.
"""

from __future__ import annotations

from pathlib import Path

from ftune.config.compose import load_saved
from ftune.config.schema import FtuneConfig
from ftune.errors import FtuneError


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.yaml").is_file() and (path / "command.txt").is_file()


def run_config(run_dir: Path) -> FtuneConfig:
    try:
        return load_saved(run_dir / "config.yaml")
    except FtuneError:
        raise
    except Exception as exc:  # a hand-edited or foreign config.yaml
        raise FtuneError(f"{run_dir / 'config.yaml'}: not a readable ftune run config ({type(exc).__name__})",
                         [str(exc).splitlines()[0][:200]], "Give the directory of a finished `ftune train` run.") from None


def trained_folder(run_dir: Path, cfg: FtuneConfig) -> Path:
    folder = run_dir / cfg.method.output_name()
    if not folder.is_dir():
        raise FtuneError(f"{run_dir}: the run has no trained output ({folder.name}/ is missing)",
                         hint="Did the run finish? Resume it with resume=<run dir>, or give another run.")
    return folder
