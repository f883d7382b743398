"""Loading a user's Python module by import name or file path (tool environments, verifiers)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


def load_module(spec: str, what: str) -> ModuleType:
    """``package.module`` or ``path/to/file.py``; ``what`` names the config key in errors."""
    if spec.endswith(".py") or "/" in spec:
        path = Path(spec).resolve()
        if not path.is_file():
            raise ValueError(f"{what}: file not found: {path}")
        name = f"sft_ray_user_{path.stem}"
        if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
            return sys.modules[name]
        mod_spec = importlib.util.spec_from_file_location(name, path)
        assert mod_spec and mod_spec.loader
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up by name
        mod_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(spec)
    except ImportError as e:
        raise ValueError(f"{what}: cannot import {spec!r}: {e}") from None


def registered(registry: dict[str, str], name: str, what: str) -> Any:
    """The object a registry entry (``"package.module:attr"``) names; imported on first use so
    that choosing one entry never imports another's dependencies."""
    try:
        target = registry[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(sorted(registry))}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
