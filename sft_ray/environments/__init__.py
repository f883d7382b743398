"""Environment registry: where an agent episode's tool calls are executed.

Entries are import strings, like the backends and verifiers: choosing ``python``
never imports what ``nemo_gym`` needs. See :mod:`sft_ray.environments.base` for the
interface.
"""

from __future__ import annotations

from typing import Any

from sft_ray.environments.base import Environment
from sft_ray.plugins import registered

ENVIRONMENTS: dict[str, str] = {
    "python": "sft_ray.environments.python:PythonEnvironment",
    "nemo_gym": "sft_ray.environments.nemo_gym:NemoGymEnvironment",
    "mcp": "sft_ray.environments.mcp:McpEnvironment",
}


def build_environment(cfg: dict[str, Any]) -> Environment | None:
    """The environment ``cfg["type"]`` names, or None for ``none``."""
    kind = cfg.get("type", "none")
    if kind == "none":
        return None
    return registered(ENVIRONMENTS, kind, "environment")(cfg)
