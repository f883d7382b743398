"""Backend registry: the one seam where generation backends plug in.

Entries are import strings so that choosing ``openai`` never imports vLLM.
"""

from __future__ import annotations

from sft_ray.backends.base import Backend
from sft_ray.plugins import registered

BACKENDS: dict[str, str] = {
    "openai": "sft_ray.backends.openai:OpenAIBackend",
    "anthropic": "sft_ray.backends.anthropic:AnthropicBackend",
    "vllm": "sft_ray.backends.vllm:VLLMBackend",
}


def get_backend(name: str) -> type[Backend]:
    """The backend class registered under ``name``."""
    return registered(BACKENDS, name, "backend")
