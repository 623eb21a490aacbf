"""Model families, one file each, found here by their `name`: the family's line in serve/families.py.

Adding a family is a new file in this package (a Family subclass whose `name` has a line in serve.families.FAMILIES)
plus that one line; nothing here changes.
"""
from __future__ import annotations

import importlib
import pkgutil

from serve.families import FAMILIES
from trainer.models.base import ConfigError, DataInfo, ExportGraph, Family, FamilyConfig, TensorSpec

__all__ = ["FAMILY_NAMES", "get_family", "ConfigError", "DataInfo", "ExportGraph", "Family", "FamilyConfig",
           "TensorSpec"]

FAMILY_NAMES = tuple(name for name, spec in FAMILIES.items() if not spec.imported)  # the trained ones


def _registry() -> dict[str, type[Family]]:
    """Every Family subclass defined in this package's modules, by name (imports torch: called on first use)."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
    found = {cls.name: cls for cls in Family.__subclasses__()}
    missing = [name for name, spec in FAMILIES.items() if not spec.imported and name not in found]
    if missing:
        raise RuntimeError(f"serve/families.py declares {missing} but trainer/models/ has no Family with that name")
    return found


def get_family(name: str) -> type[Family]:
    if name not in FAMILIES or FAMILIES[name].imported:
        raise ConfigError(f"unknown family {name!r}: use one of {', '.join(FAMILY_NAMES)}")
    return _registry()[name]
