"""Backend registry: the one seam where generation backends plug in.

Entries are import strings so that choosing ``openai`` never imports vLLM.
"""

from __future__ import annotations

import importlib

from sft_ray.backends.base import Backend

BACKENDS: dict[str, str] = {
    "openai": "sft_ray.backends.openai:OpenAIBackend",
    "vllm": "sft_ray.backends.vllm:VLLMBackend",
}


def get_backend(name: str) -> type[Backend]:
    """The backend class registered under ``name``."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
