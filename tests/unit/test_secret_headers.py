"""Secrets in config and text: a credential in extra_headers is refused without echoing it, an
unset header variable is named, and the redactor hides whole, cut and partial keys.
(Secrets through real runs and servers: tests/e2e/test_secrets.py.)"""

from __future__ import annotations

import pytest

from sft_ray.config import ConfigError
from sft_ray.configload import load_config

AZURE_KEY = "azk-DO-NOT-LEAK-7f3e9a"


def test_a_credential_in_extra_headers_is_refused_without_echoing_it():
    for name in ("api-key", "x-api-key", "Authorization", "X-Auth-Token", "Ocp-Apim-Subscription-Key"):
        with pytest.raises(ConfigError) as e:
            load_config(None, ["input=x", "output=y", "model.name=m", f"model.extra_headers.{name}={AZURE_KEY}"])
        assert "extra_headers_env" in str(e.value) and AZURE_KEY not in str(e.value), str(e.value)
    with pytest.raises(ConfigError) as e:  # a type error on a header value: the value is not shown
        load_config(None, ["input=x", "output=y", "model.name=m", "model.extra_headers.x-trace=[1234567]"])
    assert "model.extra_headers.x-trace" in str(e.value) and "1234567" not in str(e.value)
    # Plain headers stay allowed.
    cfg = load_config(None, ["input=x", "output=y", "model.name=m", "model.extra_headers.x-team=research"])
    assert cfg.model.extra_headers == {"x-team": "research"}


def test_unset_header_variable_names_the_variable(monkeypatch):
    monkeypatch.delenv("SFT_NO_SUCH_VAR", raising=False)
    cfg = load_config(None, ["input=x", "output=y", "model.name=m", "model.extra_headers_env.api-key=SFT_NO_SUCH_VAR"])
    with pytest.raises(ConfigError, match="api-key \\(from SFT_NO_SUCH_VAR\\)"):
        cfg.model.secret_headers()
    monkeypatch.setenv("SFT_NO_SUCH_VAR", AZURE_KEY)
    assert cfg.model.secret_headers() == {"api-key": AZURE_KEY}


def test_redactor_whole_cut_and_partial_secrets():
    from sft_ray.backends.base import Redactor

    key = "k" * 3 + "0123456789abcdefghijklmnopqrstuvwxyz" * 3
    r = Redactor([key, None, "short"])
    assert r(f"a {key} b") == "a *** b"
    assert r(f"a {key[:40]}") == "a ***"  # a cut key
    assert r(f"x{key[10:60]}y") == "x***y"  # a piece from the middle
    assert r("a short one") == "a *** one"  # a short secret: whole matches only
    assert r(f"{key[:15]} kept") == f"{key[:15]} kept"  # fewer than 16 characters: too short to mean a key
    assert r("nothing here") == "nothing here"
