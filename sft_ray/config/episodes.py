"""``agent`` and ``environment``: the episode loop of rows with tools, and where tool calls run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sft_ray.config.base import Strict, looks_secret, read_env_mapping


class AgentConfig(Strict):
    """The episode loop, for rows with tools (or any row when an environment is set)."""

    max_steps: int = Field(8, ge=1, description="Most model calls per episode; an episode still calling "
                           "tools after that ends with termination `max_steps`.")
    timeout_s: float = Field(600.0, gt=0, description="Wall-clock bound of one whole episode (model calls, "
                             "tools, verify); past it the sample fails as `episode_timeout` and a rerun retries it.")


class EnvironmentConfig(Strict):
    """Where tool calls run (see README, Agent rollouts)."""

    type: Literal["none", "python", "nemo_gym", "mcp"] = Field(
        "none", description="`python`: functions of a Python module; `nemo_gym`: a running NeMo Gym resources "
        "server; `mcp`: a Model Context Protocol server's tools (docs/mcp.md); `none`: no tools (rows that "
        "bring tools fail with `environment_error`).")
    module: str | None = Field(None, description="python: `package.module` or `path/to/tools.py`; its public "
                               "functions are the tools.")
    episode_class: str | None = Field(None, description="python: a class of the module made per episode (with the "
                                      "row if its constructor takes one); its public methods are the tools and its "
                                      "`close()` runs after the episode.")
    isolation: Literal["thread", "process"] = Field(
        "thread", description="python: where sync tools run. `thread`: a thread per call, off the event loop (a "
        "tool that never returns is abandoned when `agent.timeout_s` ends its episode); `process`: a worker "
        "process per episode runs every tool, killed when the episode ends or times out (for tools that may "
        "hang, crash or `os._exit`).")
    base_url: str | None = Field(None, description="nemo_gym: the resources server, e.g. http://127.0.0.1:8001.")
    timeout_s: float = Field(60.0, gt=0, description="nemo_gym: per-request timeout.")
    max_retries: int = Field(4, ge=0, description="nemo_gym: retries of a request that got no answer (and of 5xx "
                             "answers to seed_session and verify).")
    base_retry_wait_s: float = Field(0.5, ge=0, description="nemo_gym: first backoff wait; doubles each retry.")
    max_retry_wait_s: float = Field(10.0, ge=0, description="nemo_gym: cap on one backoff wait.")
    command: str | None = Field(None, description="mcp: the program that starts a stdio server (e.g. `python`, "
                                "`uvx`, `mcp-server-time`), found on PATH.")
    args: list[str] = Field(default_factory=list, description="mcp: the stdio server's arguments; relative paths are "
                            "relative to `cwd`.")
    env: dict[str, str] = Field(default_factory=dict, description="mcp: environment variables of the stdio server, "
                                "stored in run.json as written (a credential-like name is refused: use `env_from`). "
                                "The server inherits only HOME, PATH, USER, SHELL, TERM, LOGNAME besides.")
    env_from: dict[str, str] = Field(default_factory=dict, description="mcp: `{NAME: ENV_VAR}`: variables of the stdio "
                                     "server whose values are read from the driver's environment; never stored, "
                                     "logged or shown.")
    cwd: str | None = Field(None, description="mcp: the stdio server's working directory. Empty: the directory "
                            "`sft-ray run` was started in.")
    url: str | None = Field(None, description="mcp: a Streamable HTTP server's endpoint, e.g. "
                            "http://127.0.0.1:8000/mcp (instead of `command`).")
    headers_env: dict[str, str] = Field(default_factory=dict, description="mcp: `{header: ENV_VAR}`: HTTP headers "
                                        "sent to `url`, values read from the driver's environment; never stored, "
                                        "logged or shown (as `model.extra_headers_env`).")
    session: Literal["actor", "episode"] = Field("actor", description="mcp: `actor`: one server connection per "
                                                 "generation actor, shared by its episodes (stateless servers); "
                                                 "`episode`: a fresh server process (or HTTP session) per episode, "
                                                 "closed after it (stateful servers).")
    max_concurrent_calls: int = Field(16, ge=1, description="mcp: tool calls in flight at once per server "
                                      "connection.")
    call_timeout_s: float = Field(60.0, gt=0, description="mcp: bound on one tool call; a server that does not "
                                  "answer in time is taken as hung: restarted, and the episode ends as "
                                  "`environment_error`.")
    connect_timeout_s: float = Field(60.0, gt=0, description="mcp: bound on starting and initializing a server.")

    @model_validator(mode="after")
    def _mcp(self) -> "EnvironmentConfig":
        if self.type != "mcp":
            return self
        if bool(self.command) == bool(self.url):
            raise ValueError("environment.type 'mcp' needs exactly one of environment.command (a stdio server) and "
                             "environment.url (a Streamable HTTP server)")
        for name in self.env:
            if looks_secret(name):
                raise ValueError(f"environment.env.{name}: a credential does not belong in the config (run.json "
                                 f"keeps it); put it in an environment variable and name that in "
                                 f"environment.env_from, e.g. env_from: {{{name}: {name}}}")
        for name in set(self.env) & set(self.env_from):
            raise ValueError(f"environment.env.{name}: set in both env and env_from")
        return self

    def secret_env(self) -> dict[str, str]:
        """`env_from` with the values read from the environment now (ConfigError naming unset variables)."""
        return read_env_mapping(self.env_from, "environment.env_from")

    def secret_headers(self) -> dict[str, str]:
        """`headers_env` with the values read from the environment now (ConfigError naming unset variables)."""
        return read_env_mapping(self.headers_env, "environment.headers_env")

    @model_validator(mode="after")
    def _needs(self) -> "EnvironmentConfig":
        if self.type == "python" and not self.module:
            raise ValueError("environment.module is required when environment.type is 'python'")
        if self.type == "nemo_gym" and not self.base_url:
            raise ValueError("environment.base_url is required when environment.type is 'nemo_gym'")
        return self
