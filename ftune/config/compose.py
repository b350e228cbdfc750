"""Build one validated FtuneConfig from a recipe name and Hydra overrides.

Hydra's compose API does the merging (never @hydra.main): configs/ is the primary config dir and
the folder holding recipes/ is added to the search path, so `recipe=NAME` becomes the Hydra
override `+recipes=NAME` (the "experiment" pattern: a `# @package _global_` file whose defaults
list overrides group choices). Overrides typed by the user are applied after the recipe and win.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftune import resources
from ftune.config.checks import derive, validate
from ftune.config.schema import FtuneConfig, all_schemas
from ftune.errors import FtuneError
from ftune.registry import unknown_name_error
from ftune.yamlfile import read_mapping

DEFAULT_RECIPE = "smollm2-lora-sft"
GROUPS = ("model", "method", "dataset", "stage", "hardware")
# Groups whose schema depends on the file's `name` (a method's or stage's own knobs); the others
# have one schema each.
NAMED_SCHEMA_GROUPS = ("method", "stage")
# Keys holding free maps (the user's own column and role names): an override may add a key there.
FREE_MAPS = ("columns", "roles", "message_keys", "placeholders")


_stored = False


def _store_schemas() -> None:
    """Every schema in Hydra's ConfigStore, once (the methods' after they have registered)."""
    global _stored
    if _stored:
        return
    cs = ConfigStore.instance()
    cs.store(name="ftune_schema", node=FtuneConfig)
    for group, choices in all_schemas().items():
        for name, node in choices.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
    _stored = True


def group_choices(group: str) -> list[str]:
    """The YAML files of one config group, by name."""
    return sorted(p.stem for p in (resources.configs_dir() / group).glob("*.yaml"))


def recipe_names() -> list[str]:
    return sorted(p.stem for p in resources.recipes_dir().glob("*.yaml"))


def recipe_description(name: str) -> str:
    data = yaml.safe_load((resources.recipes_dir() / f"{name}.yaml").read_text()) or {}
    return str(data.get("description", ""))


@dataclass
class Composed:
    """The validated config and the overrides that produced it (kept for resume messages)."""

    cfg: FtuneConfig
    overrides: list[str]
    notes: list[str] = field(default_factory=list)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self.cfg))


def split_overrides(overrides: list[str]) -> tuple[str, list[str]]:
    """Pull `recipe=NAME` out of the overrides and map the `resume=PATH` shorthand."""
    recipe, rest = DEFAULT_RECIPE, []
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise FtuneError(f"'{item}' is not an override", hint="Overrides look like key=value, e.g. train.lr=1e-4.")
        if key.startswith(("+", "~")):
            raise FtuneError(f"'{item}': adding (+) or deleting (~) keys is not supported",
                             hint="Every setting already exists in the typed schema: write key=value "
                                  "(see `ftune config show` for the keys).")
        if key == "recipe":
            recipe = value
        elif key == "resume":
            rest.append(f"train.resume={value}")
        else:
            rest.append(item)
    return recipe, rest


def _check_names(recipe: str | None, overrides: list[str]) -> None:
    """Unknown recipe or group choices: list the valid names before Hydra sees them."""
    if recipe is not None and recipe not in recipe_names():
        raise unknown_name_error("recipe", recipe, recipe_names(), key="recipe")
    for item in overrides:
        key, _, value = item.partition("=")
        if key in GROUPS and not is_config_file(value) and value not in group_choices(key):
            raise unknown_name_error(key, value, group_choices(key), key=key)


def _user_group_file(group: str, path_text: str, folder: Path) -> str:
    """Copy a group file of the user's (dataset=/path/my-data.yaml) into folder/<group>/ on the
    second search path, with the group's schema as its first default when the file names none, so
    it is checked exactly like a shipped file; returns its name there."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise FtuneError(f"{group}={path_text}: file does not exist",
                         hint=f"Give a {group} file (.yaml) or a shipped name (ls configs/{group}/; `ftune config show`).")
    data = read_mapping(path, f"a {group} config")
    schema = group
    if group in NAMED_SCHEMA_GROUPS:
        schema = str(data.get("name") or "")
        known = all_schemas()[group]
        if schema not in known:
            raise (unknown_name_error(group, schema, known, key=f"{path}: name") if schema else
                   FtuneError(f"{path}: no 'name' key", [f"a {group} file says which {group} it configures"],
                              f"Add e.g. name: {sorted(known)[0]} (one of: {', '.join(sorted(known))})."))
    text = path.read_text(encoding="utf-8")
    if "defaults" not in data:
        text = f"defaults:\n  - /schema/{group}/{schema}@_here_\n  - _self_\n" + text
    stem = f"user-{path.stem}"
    (folder / group).mkdir(exist_ok=True)
    (folder / group / f"{stem}.yaml").write_text(text)
    return stem


def _free_map_override(item: str) -> str:
    """`dataset.sources.0.columns.prompt=question` adds a key to a free map, which Hydra's struct
    mode refuses unless the override says so (`++`: add or replace)."""
    key = item.partition("=")[0]
    parts = key.split(".")
    return f"++{item}" if len(parts) >= 2 and parts[-2] in FREE_MAPS else item


def _hydra_error(exc: Exception, recipe: str = "") -> FtuneError:
    """Hydra/OmegaConf composition errors as one short message naming the key."""
    texts, cause = [str(exc)], exc.__cause__ or exc.__context__
    while cause is not None and len(texts) < 4:
        texts.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    lines, seen = [], set()
    for line in "\n".join(texts).splitlines():
        line = line.strip()
        if line.startswith("full_key:") and line != "full_key:":
            line = "key: " + line.removeprefix("full_key:").strip()  # the key the user must fix
        if line and line not in seen and not line.startswith(
                ("full_key", "object_type", "To append", "reference_type", "Value '$VALUE'")):
            seen.add(line)
            lines.append(line)
    hint = "Check the key's spelling with `ftune config show`; new keys are not allowed."
    if any("could not be converted" in line or "is not a valid" in line for line in lines):
        hint = "Give the key a value of its type; `ftune config show` prints every key with its current value."
    if is_config_file(recipe):
        lines = [line.replace(f"In 'recipes/{Path(recipe).stem}'", f"In {recipe}") for line in lines]
        hint = f"Fix the key in {recipe}; `ftune config show` lists every key and its type."
    elif any(line.startswith("In 'recipes/") for line in lines):
        hint = ("The recipe sets a key that the group choice you picked does not have: override that key "
                "away (~key) or pick a recipe made for this choice.")
    return FtuneError(f"config error: {lines[0]}", lines[1:6], hint)


def is_config_file(value: str) -> bool:
    """A recipe or group value naming a YAML file of the user's rather than a shipped name."""
    return value.endswith((".yaml", ".yml"))


def _user_recipe(path_text: str, folder: Path) -> str:
    """Copy a recipe file of the user's into folder/recipes/ (a second Hydra search path) after
    checking it is readable YAML; returns its name there."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise FtuneError(f"recipe={path_text}: file does not exist",
                         hint="Give a recipe file (.yaml) or a shipped recipe name (see `ftune recipes`).")
    read_mapping(path, "a recipe")
    text = path.read_text(encoding="utf-8")
    if "@package _global_" not in text.split("\n", 1)[0]:
        text = "# @package _global_\n" + text  # recipes set keys of the whole config
    (folder / "recipes").mkdir()
    (folder / "recipes" / f"{path.stem}.yaml").write_text(text)
    return path.stem


def compose(overrides: list[str] | None = None) -> Composed:
    """Compose, derive and validate. Raises FtuneError listing every problem found."""
    recipe, rest = split_overrides(list(overrides or []))
    _store_schemas()
    with tempfile.TemporaryDirectory(prefix="ftune-recipe-") as extra:
        name, search = recipe, [resources.data_root()]
        if is_config_file(recipe):
            name = _user_recipe(recipe, Path(extra))
            search.append(Path(extra))
        _check_names(name if not is_config_file(recipe) else None, rest)
        hydra_rest = []
        for item in rest:
            key, _, value = item.partition("=")
            if key in GROUPS and is_config_file(value):
                item = f"{key}={_user_group_file(key, value, Path(extra))}"
                if Path(extra) not in search:
                    search.append(Path(extra))
            hydra_rest.append(_free_map_override(item))
        hydra_overrides = [f"hydra.searchpath=[{','.join(f'file://{p}' for p in search)}]", f"+recipes={name}",
                           *hydra_rest]
        try:
            with initialize_config_dir(config_dir=str(resources.configs_dir()), version_base=None):
                raw = hydra_compose(config_name="config", overrides=hydra_overrides)
            cfg = OmegaConf.to_object(raw)
        except (HydraException, OmegaConfBaseException) as exc:
            raise _hydra_error(exc, recipe) from None
    assert isinstance(cfg, FtuneConfig)
    cfg.recipe = name
    notes = derive(cfg)
    problems = validate(cfg)
    if problems:
        raise FtuneError(f"the config of recipe '{recipe}' has {len(problems)} problem(s):", problems,
                         "Fix them in the YAML or override on the command line, e.g. method.r=16.")
    return Composed(cfg, [f"recipe={recipe}", *rest], notes)


def load_saved(path: Path) -> FtuneConfig:
    """Read a run directory's config.yaml back into a typed config (no recipe lookup)."""
    schema = OmegaConf.structured(FtuneConfig)
    data = OmegaConf.load(path)
    if "objective" in data.get("stage", {}):  # written by ftune before stages named their own objective
        del data.stage["objective"]
    known = all_schemas()
    method_schema = known["method"].get(str(data.method.name))
    if method_schema is None:
        raise unknown_name_error("method", str(data.method.name), known["method"], key=f"{path}: method.name")
    schema.method = OmegaConf.structured(method_schema)
    stage_schema = known["stage"].get(str(data.stage.name))
    if stage_schema is None:
        raise unknown_name_error("stage", str(data.stage.name), known["stage"], key=f"{path}: stage.name")
    schema.stage = OmegaConf.structured(stage_schema)
    return OmegaConf.to_object(OmegaConf.merge(schema, data))
