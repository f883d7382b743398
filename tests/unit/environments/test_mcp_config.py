"""`environment.type: mcp`'s config: no credential in `env`, exactly one server, secrets from the
environment named when unset. (MCP servers for real: tests/e2e/test_mcp.py.)"""

from __future__ import annotations

import pytest


def test_config_refuses_credentials_in_env_and_needs_one_server(tmp_path):
    from sft_ray.config import ConfigError
    from sft_ray.configload import load_config

    base = [f"input={tmp_path}", f"output={tmp_path / 'run'}", "model.name=m", "environment.type=mcp"]
    with pytest.raises(ConfigError, match="environment.env.GITHUB_TOKEN: a credential does not belong"):
        load_config(None, base + ["environment.command=x", "environment.env={GITHUB_TOKEN: abc}"])
    with pytest.raises(ConfigError, match="exactly one of environment.command"):
        load_config(None, base)
    with pytest.raises(ConfigError, match="exactly one of environment.command"):
        load_config(None, base + ["environment.command=x", "environment.url=http://h/mcp"])
    cfg = load_config(None, base + ["environment.command=x", "environment.env_from={TOKEN: SFT_RAY_UNSET_VAR_X}"])
    with pytest.raises(ConfigError, match=r"TOKEN \(from SFT_RAY_UNSET_VAR_X\)"):
        cfg.environment.secret_env()
