"""A rollout, prepared, built and stamped the one way, for every path that makes one: the online
generation actors (:mod:`sft_ray.stages.generate`), the Batch API's loop (:mod:`sft_ray.batch`) and
journal recovery.

- :func:`model_wiring`: the generation model's settings as its backend takes them, the API key and
  secret headers read on the driver and wrapped in :class:`~sft_ray.backends.base.Secret`;
- :func:`prepare`: a sample's prompt, tools and sampling parameters from its input row;
- :func:`build_rollout` / :func:`episode_rollout` / :func:`run_agent_sample`: the rollout row of one
  model call, or of an agent episode;
- :func:`stamp_source`: where its prompt came from (the report's per-file counts).

What happens to a rollout next (scored, written, counted in the session, the failure budget) is
:class:`sft_ray.driver.Recorder`'s.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from sft_ray import errors
from sft_ray.agent import ERROR, EpisodeState, run_episode
from sft_ray.backends.base import GenerationRequest, GenerationResult, Secret
from sft_ray.environments.base import EnvironmentFailure, Episode, cancelled_from_outside
from sft_ray.rows import drop_params, prompt_messages, prompt_tools, sampling_params, split_input
from sft_ray.runfolder.layout import episode_id, request_id

log = logging.getLogger(__name__)


def model_wiring(model_cfg: Any) -> dict[str, Any]:
    """The generation model's settings (``cfg.model``) for its backend, with the key and the secret
    headers (``extra_headers_env`` values) read here, on the driver, never in run.json or a repr."""
    from sft_ray.config import flat_dump  # on the driver only: actors never import the config models

    model = flat_dump(model_cfg)  # every backend's keys, as the backends read them
    model["api_key"] = Secret(model_cfg.api_key())
    model["secret_headers"] = Secret(model_cfg.secret_headers())
    return model


@dataclass
class Prepared:
    """A sample ready to send: its prompt, the tools its row offers, its sampling parameters."""

    prompt: list[dict[str, Any]]
    tools: dict[str, Any]
    params: dict[str, Any]

    def request(self, rid: str, k: int) -> GenerationRequest:
        return GenerationRequest(self.prompt, self.params, request_id((rid, k)))


def prepare(row: dict[str, Any], rid: str, k: int, source: str, sampling: dict[str, Any],
            omit_params: list[str] | None) -> Prepared:
    """A sample's prompt, tools and sampling parameters (``sampling``: the config's
    ``responses_create_params``, under the row's own; ``omit_params``: keys the server refuses).
    Raises :class:`~sft_ray.rows.InputError` naming ``source`` for a row that has none."""
    prompt, tools = prompt_messages(row, source), prompt_tools(row, source)
    return Prepared(prompt, tools, drop_params(sampling_params(row, sampling, rid, k), omit_params))


def stamp_source(rollout: dict[str, Any], source: str) -> None:
    """Where the prompt came from (``file:line``), in the rollout: the report's per-file counts."""
    path, _, line = source.rpartition(":")
    rollout["source_file"], rollout["source_line"] = path, int(line) if line.isdigit() else None


_NO_USAGE = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}


def build_rollout(row: dict[str, Any], rid: str, sample_index: int, messages: list[dict[str, Any]],
                  params: dict[str, Any], model_name: str | None, result: GenerationResult,
                  node_id: str | None = None) -> dict[str, Any]:
    """A rollout row: the input row's fields plus what generation produced.

    Input fields that a generated field would shadow (a reference ``response`` or
    ``messages``, a ``reward`` column...) move to ``input_fields``, where
    :func:`sft_ray.rows.input_row` finds them.
    """
    out, shadowed = split_input(row)
    ok = result.error is None
    out.update(
        id=rid,
        sample_index=sample_index,
        messages=messages + ([{"role": "assistant", "content": result.text or ""}] if ok else []),
        response=result.text if ok else None,
        reward=None,
        finish_reason=result.finish_reason,
        usage=result.usage or dict(_NO_USAGE),
        model=model_name,
        sampling_params=params,
        attempts=result.attempts,
        error=result.error,
        node_id=node_id,
    )
    if result.reasoning:
        out["reasoning"] = result.reasoning
    shadowed = {k: v for k, v in shadowed.items() if out.get(k) != v}  # e.g. the row's own id
    if shadowed:
        out["input_fields"] = shadowed
    return out


def episode_rollout(row: dict[str, Any], rid: str, sample_index: int, state: EpisodeState,
                    tools: dict[str, Any], params: dict[str, Any], model_name: str | None,
                    node_id: str | None) -> dict[str, Any]:
    """A rollout row for an agent episode: the whole transcript plus the episode's counters."""
    # attempts: 1 + every retry of every model call of the episode (1: nothing was retried)
    result = GenerationResult(text=state.final_text(), finish_reason=state.finish_reason, usage=state.usage,
                              error=state.error, attempts=1 + state.attempts - state.num_model_calls,
                              reasoning="\n".join(state.reasoning) or None)
    out = build_rollout(row, rid, sample_index, [], params, model_name, result, node_id)
    out["messages"] = state.messages
    out["response"] = result.text
    out.update(tools)
    out.update(state.counters())
    return out


async def run_agent_sample(call_model: Callable[[GenerationRequest], Awaitable[GenerationResult]],
                           environment: Any, max_steps: int, timeout_s: float | None, verify_in_episode: bool,
                           model_name: str | None, node_id: str | None, row: dict[str, Any], rid: str, k: int,
                           prompt: list[dict[str, Any]], tools: dict[str, Any], params: dict[str, Any],
                           source: str = "<row>",
                           wrap: Callable[[Episode], Episode] | None = None) -> dict[str, Any]:
    """One agent episode's rollout: the environment's episode opened for the row (``wrap``: e.g. a
    :class:`TrackedEpisode` around it), model and tool calls until the model answers (at most
    ``max_steps`` model calls, within ``timeout_s``: None for no bound), verified in the episode
    when asked, closed whatever happens. Every failure is the rollout's ``error`` (a row whose
    declared tools the environment lacks is bad input naming ``source``); an online actor and the
    Batch API's rounds both run it."""
    state = EpisodeState(messages=list(prompt))
    if environment is None:
        state.termination = ERROR
        state.error = errors.error(errors.ENVIRONMENT_ERROR, "the row offers tools but no environment runs "
                                   "them: set environment.type (python, nemo_gym or mcp)")
        return episode_rollout(row, rid, k, state, tools, params, model_name, node_id)
    if not tools.get("tools") and environment.default_tools():
        tools = {**tools, "tools": environment.default_tools()}
    elif tools.get("tools") and (problem := environment.check_tools(tools["tools"])) is not None:
        state.termination = ERROR
        state.error = errors.error(errors.BAD_INPUT, f"{source}: row {row.get('id', rid)!r} {problem}")
        return episode_rollout(row, rid, k, state, tools, params, model_name, node_id)
    episode = None
    try:
        async with asyncio.timeout(timeout_s):
            episode = await environment.open(row, episode_id((rid, k)))
            if wrap is not None:
                episode = wrap(episode)
            await run_episode(call_model, episode, state, params, tools, max_steps, request_id((rid, k)))
            if verify_in_episode and state.error is None:
                state.verify = await episode.verify(row, state.messages, tools.get("tools"))
    except TimeoutError:
        state.termination = ERROR
        state.error = errors.error(errors.EPISODE_TIMEOUT, f"episode not done within agent.timeout_s="
                                   f"{timeout_s:g} s ({state.num_model_calls} model calls)")
    except EnvironmentFailure as e:
        state.termination = ERROR
        state.error = errors.error(errors.ENVIRONMENT_ERROR, str(e))
    except BaseException as e:  # an environment bug (e.g. a state class that raises) fails the sample only
        if cancelled_from_outside():
            raise  # the batch is being torn down
        state.termination = ERROR
        state.error = errors.error(errors.ENVIRONMENT_ERROR, f"{type(e).__name__}: {e}")
    finally:
        if episode is not None:
            try:
                await asyncio.wait_for(episode.close(), 30)
            except BaseException as e:  # the episode is done; a failed close is logged, not fatal
                if cancelled_from_outside():
                    raise
                log.warning("closing an episode failed: %s: %s", type(e).__name__, e)
    if state.error is not None and state.error["type"] == errors.BAD_INPUT:  # the row's tools: name its line
        state.error = errors.error(errors.BAD_INPUT, f"{source}: row {row.get('id', rid)!r}: {state.error['message']}")
    rollout = episode_rollout(row, rid, k, state, tools, params, model_name, node_id)
    if state.verify is not None:
        rollout["verify_result"] = state.verify
    return rollout
