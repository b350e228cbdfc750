"""What the plugin groups define, registered by the modules that implement them.

A method registers its schema (a MethodConfig subclass) from its own module in ftune.methods, so
that module is the one place of the method; a data format registers its name and canonical fields
from ftune.data.formats; a stage registers its schema from its module in
ftune.train.objectives. The config layer sits below the methods and never
imports them by name: `discover()` imports the plugin packages, whose modules register themselves
as they load (the way installed plugins are found by name through entry points).
"""

from __future__ import annotations

import importlib
from typing import Any, TypeVar

from ftune.registry import Registry

T = TypeVar("T")

# Packages whose modules register schemas when imported.
PLUGIN_PACKAGES = ("ftune.methods", "ftune.train.objectives", "ftune.data.formats")
_SCHEMAS: dict[str, dict[str, Any]] = {"method": {}, "stage": {}, "format": {}}
_discovered = False


def register_schema(group: str, name: str, schema: Any) -> None:
    known = _SCHEMAS.setdefault(group, {})
    if name in known and known[name] is not schema:
        raise ValueError(f"{group} '{name}' is registered twice")
    known[name] = schema


def discover() -> None:
    """Import the plugin packages once, so every schema is registered."""
    global _discovered
    if not _discovered:
        _discovered = True
        for package in PLUGIN_PACKAGES:
            importlib.import_module(package)


def schemas(group: str) -> dict[str, Any]:
    """name -> what one plugin group registered (a method's schema, a format's fields), every
    plugin loaded."""
    discover()
    return dict(_SCHEMAS.get(group, {}))


class Plugins(Registry[T]):
    """The specs of one plugin group (methods, stages): each spec has a `name` and a `schema`.

    `add` registers a spec and its schema in one call, so the group's code and its config cannot
    drift apart; `of` finds the spec of a config section (or of a bare name)."""

    def add(self, spec: T) -> T:
        name = spec.name  # type: ignore[attr-defined]
        self.register(name)(spec)
        register_schema(self.kind, name, spec.schema)  # type: ignore[attr-defined]
        return spec

    def of(self, section: Any) -> T:
        return self.get(section if isinstance(section, str) else section.name, key=self.kind)
