"""`ftune import`: another tool's training config -> an ftune recipe file, and what could not be
carried over, by key.

Each importer fills a `Migration`: the group choices (model, method, dataset, stage, hardware) and
the keys to set in each section, plus one note per source key it could not carry. The recipe is
an ordinary recipe file (`ftune train recipe=<file>`), so everything it sets is checked by the
same schema as a hand-written one before anything loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ftune.errors import FtuneError
from ftune.yamlfile import read_mapping

SECTIONS = ("model", "method", "dataset", "stage", "hardware", "train")
# Templates both tools name the same way as ftune's data_templates/.
SHARED_TEMPLATES = {"alpaca", "chatml", "llama2", "llama3", "mistral", "qwen", "vicuna"}


@dataclass
class Migration:
    """What an importer found: group choices, section keys, and notes on what it left out."""

    tool: str
    source: Path
    groups: dict[str, str] = field(default_factory=dict)
    keys: dict[str, dict[str, Any]] = field(default_factory=lambda: {s: {} for s in SECTIONS})
    not_carried: list[tuple[str, str]] = field(default_factory=list)
    assumed: list[str] = field(default_factory=list)

    def set(self, section: str, key: str, value: Any) -> None:
        if value is not None:
            self.keys[section][key] = value

    def skip(self, key: str, why: str) -> None:
        self.not_carried.append((key, why))

    # Steps both importers take (each tool names the keys differently).
    def model(self, path: str, trust_remote_code: bool) -> None:
        self.groups["model"] = "smollm2-135m"  # the group's file is replaced whole by the keys below
        self.set("model", "name", Path(path).name.lower())
        self.set("model", "path", path)
        if trust_remote_code:
            self.set("model", "trust_remote_code", True)

    def eval_fraction(self, key: str, value: Any) -> None:
        if isinstance(value, (int, float)) and 0 <= value < 1:
            self.set("dataset", "eval_fraction", float(value))
        else:
            self.skip(key, f"{value}: ftune holds out a fraction of the rows (dataset.eval_fraction)")

    def scheduler(self, key: str, value: Any, names: dict[str, str]) -> None:
        """The tool's scheduler name through `names` (its name -> ftune's)."""
        self.set("train", "lr_scheduler", names.get(str(value)))
        if str(value) not in names:
            self.skip(key, f"'{value}' is not one of cosine, linear, constant")

    def output_dir(self, value: Any) -> None:
        """The tool's run folder: ftune's output_dir is its parent, run_name its name."""
        out = Path(str(value))
        self.set("train", "output_dir", str(out.parent))
        self.set("train", "run_name", out.name)

    def leftovers(self, cfg: dict, ignored: dict[str, str]) -> None:
        """Every key not yet consumed: `ignored` says why ftune needs it not (a reason starting with
        "carried" means it was read elsewhere); the rest have no equivalent."""
        for key, why in ignored.items():
            if key in cfg and not why.startswith("carried"):
                self.skip(key, why)
            cfg.pop(key, None)
        for key in sorted(cfg):
            self.skip(key, "no ftune equivalent")

    def recipe(self) -> dict[str, Any]:
        defaults = [{f"override /{g}": self.groups[g]} for g in ("model", "method", "dataset", "stage", "hardware")
                    if g in self.groups] + ["_self_"]
        out: dict[str, Any] = {"defaults": defaults, "description": f"imported from {self.tool}: {self.source.name}"}
        out.update({s: v for s, v in self.keys.items() if v})
        return out

    def text(self) -> str:
        head = ["# @package _global_", f"# Imported from {self.tool} ({self.source}) by `ftune import`.",
                "#   ftune train recipe=<this file>"]
        head += [f"# assumed: {a}" for a in self.assumed]
        head += [f"# not carried over: {k}: {why}" for k, why in self.not_carried]
        return "\n".join(head) + "\n" + yaml.safe_dump(self.recipe(), sort_keys=False, allow_unicode=True, width=100)


def read_config(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FtuneError(f"{path}: file does not exist", hint=f"Give the path of a {what}.")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise FtuneError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from None
        if not isinstance(data, dict):
            raise FtuneError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return data
    return read_mapping(path, what)


def template_choice(name: Any, m: Migration, key: str) -> str:
    """Another tool's template name as a dataset.template value ("model": the tokenizer's own)."""
    if name in (None, "", "default", "empty", "tokenizer_default", "tokenizer_default_fallback_chatml"):
        return "model"
    if str(name) in SHARED_TEMPLATES:
        return str(name)
    if str(name).startswith(("qwen", "llama3", "mistral", "llama2", "chatml")):
        base = next(t for t in ("qwen", "llama3", "mistral", "llama2", "chatml") if str(name).startswith(t))
        m.assumed.append(f"{key}={name}: ftune's '{base}' template")
        return base
    m.skip(key, f"no ftune template named '{name}'; the model's own chat template is used (dataset.template=model)")
    return "model"


def hardware_from_deepspeed(path_text: str, base: Path, m: Migration, key: str) -> None:
    """A DeepSpeed JSON config -> the deepspeed-zero2/zero3/zero3-offload profile."""
    path = (base / path_text) if not Path(path_text).is_absolute() else Path(path_text)
    stage, offload = None, False
    if path.is_file():
        try:
            zero = json.loads(path.read_text()).get("zero_optimization", {})
            stage = zero.get("stage")
            offload = bool(zero.get("offload_optimizer") or zero.get("offload_param"))
        except (json.JSONDecodeError, AttributeError):
            stage = None
    if stage is None:  # the file is not here: its name usually says the stage (ds_z3_offload_config.json)
        name = Path(path_text).name.lower()
        stage = 3 if "z3" in name or "zero3" in name else 2 if "z2" in name or "zero2" in name else None
        offload = "offload" in name
    if stage in (2, 3):
        m.groups["hardware"] = "deepspeed-zero3-offload" if stage == 3 and offload else f"deepspeed-zero{stage}"
    else:
        m.skip(key, f"ZeRO stage of {path_text} not found (ftune's profiles: deepspeed-zero2, deepspeed-zero3, "
                    "deepspeed-zero3-offload)")


def reference_for_full(m: Migration) -> None:
    """Full fine-tuning with DPO/IPO/KTO has no adapter to disable: the reference is the base model,
    as in the tools imported from."""
    if m.groups.get("method") == "full" and m.groups.get("stage") == "dpo" and \
            m.keys["stage"].get("loss", "sigmoid") not in ("simpo", "orpo"):
        m.set("stage", "reference", m.keys["model"]["path"])
        m.assumed.append("stage.reference: the base model (full fine-tuning has no adapter to disable)")


def write(m: Migration, out: Path) -> Path:
    reference_for_full(m)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(m.text(), encoding="utf-8")
    return out
