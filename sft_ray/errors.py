"""Every error class a row can carry in ``error.type``, in one place.

Failures travel as data: a row's ``error`` is ``{"type": <one of these>, "message": str}``.
``stats.json`` counts them by type; :data:`RETRYABLE` says which a backend retries
within a run, :data:`INFRASTRUCTURE` which mean "no verdict" (never a reward of 0).
"""

from __future__ import annotations

# Transport and API (hosted backends).
TIMEOUT = "timeout"
RATE_LIMIT = "rate_limit"
SERVER_ERROR = "server_error"
CONNECTION_ERROR = "connection_error"
BAD_RESPONSE = "bad_response"
CONTEXT_LENGTH = "context_length"
AUTH_ERROR = "auth_error"
CLIENT_ERROR = "client_error"
# Local engines.
INVALID_REQUEST = "invalid_request"
ENGINE_ERROR = "engine_error"
ENGINE_DEAD = "engine_dead"
# The pipeline itself.
BAD_INPUT = "bad_input"
INTERNAL_ERROR = "internal_error"
EPISODE_TIMEOUT = "episode_timeout"
ENVIRONMENT_ERROR = "environment_error"
VERIFIER_ERROR = "verifier_error"
JUDGE_ERROR = "judge_error"
# Not a failure: the run's spending budget refused the request; the sample is not written and stays pending.
BUDGET_EXHAUSTED = "budget_exhausted"

RETRYABLE = frozenset({TIMEOUT, RATE_LIMIT, SERVER_ERROR, CONNECTION_ERROR, BAD_RESPONSE})

# Failures of the machinery, not of the sample: such a row has no reward and is retried by a rerun.
INFRASTRUCTURE = frozenset({TIMEOUT, RATE_LIMIT, SERVER_ERROR, CONNECTION_ERROR, BAD_RESPONSE, AUTH_ERROR,
                            ENGINE_ERROR, ENGINE_DEAD, INTERNAL_ERROR, EPISODE_TIMEOUT, ENVIRONMENT_ERROR,
                            VERIFIER_ERROR, JUDGE_ERROR})


def error(kind: str, message: str) -> dict[str, str]:
    """A row's ``error`` value (messages are capped: they land in every failed row)."""
    return {"type": kind, "message": message[:500]}
