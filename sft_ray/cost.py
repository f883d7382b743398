"""Tokens and money: the cost arithmetic and the `spend` section of stats.json."""

from __future__ import annotations

from typing import Any

DEFAULT_OUTPUT_TOKENS = 1024  # a request's output estimate when it sets no max_output_tokens


def estimate_tokens(request_size: float, max_output_tokens: Any = None) -> tuple[float, float]:
    """(input, output) tokens a request is taken to use before it is sent, the one estimate of the
    rate limiter, the spending budgets, the Batch API's loop and the dry-run plans: its size in bytes
    (or characters) / 4, and its ``max_output_tokens`` (:data:`DEFAULT_OUTPUT_TOKENS` when unset).
    A finished request's reported usage replaces it."""
    return request_size / 4, float(max_output_tokens or DEFAULT_OUTPUT_TOKENS)


# Prompt caching (Anthropic): what writing and reading a cached prefix cost, as shares of the input price.
CACHE_WRITE_SHARE = 1.25
CACHE_READ_SHARE = 0.1
CACHE_WRITE, CACHE_READ = "cache_creation_input_tokens", "cache_read_input_tokens"  # the usage keys


def cache_prices(pricing: dict[str, Any] | None) -> tuple[float, float]:
    """USD per million tokens written to and read from the prompt cache: `pricing.cache_write_per_mtok` and
    `cache_read_per_mtok`, by default 1.25x and 0.1x `input_per_mtok`."""
    p = pricing or {}
    inp = float(p.get("input_per_mtok") or 0)
    write, read = p.get("cache_write_per_mtok"), p.get("cache_read_per_mtok")
    return (float(write) if write is not None else inp * CACHE_WRITE_SHARE,
            float(read) if read is not None else inp * CACHE_READ_SHARE)


def cost_usd(input_tokens: float, output_tokens: float, pricing: dict[str, float] | None,
             cache_write_tokens: float = 0.0, cache_read_tokens: float = 0.0) -> float:
    """USD for these tokens at ``pricing`` (`input_per_mtok`, `output_per_mtok`: USD per million; cached
    prompt tokens at :func:`cache_prices`). ``input_tokens`` are the uncached ones."""
    p = pricing or {}
    usd = (input_tokens * float(p.get("input_per_mtok") or 0) + output_tokens * float(p.get("output_per_mtok") or 0))
    if cache_write_tokens or cache_read_tokens:
        write, read = cache_prices(p)
        usd += cache_write_tokens * write + cache_read_tokens * read
    return usd / 1e6


def cache_saved_usd(cache_write_tokens: float, cache_read_tokens: float, pricing: dict[str, Any] | None) -> float:
    """What prompt caching saved against sending the same tokens uncached (negative: writes that no
    read paid back)."""
    inp = float((pricing or {}).get("input_per_mtok") or 0)
    write, read = cache_prices(pricing)
    return (cache_read_tokens * (inp - read) - cache_write_tokens * (write - inp)) / 1e6


def priced(pricing: dict[str, Any] | None) -> bool:
    """Whether ``pricing`` sets a price (``batch_discount`` alone is no price)."""
    p = pricing or {}
    return bool(float(p.get("input_per_mtok") or 0) or float(p.get("output_per_mtok") or 0))


def batch_prices(pricing: dict[str, Any]) -> dict[str, Any]:
    """``pricing`` as a Batch API bills it: every price times ``batch_discount`` (default 0.5); the
    prompt cache's prices too (Anthropic's batch discount applies to them as well)."""
    d = float(pricing.get("batch_discount", 0.5))
    # cache prices left unset follow the discounted input price by themselves (cache_prices' shares)
    cached = {k: float(pricing[k]) * d for k in ("cache_write_per_mtok", "cache_read_per_mtok")
              if pricing.get(k) is not None}
    return {**pricing, "input_per_mtok": float(pricing.get("input_per_mtok") or 0) * d,
            "output_per_mtok": float(pricing.get("output_per_mtok") or 0) * d, **cached}


def spend_summary(stats: dict[str, Any], manifest: dict[str, Any] | None) -> dict[str, Any]:
    """stats.json's ``spend``: the tokens of every rollout (failed ones too) at the run's prices,
    what each run sent (HTTP requests with retries, 429s, reasoning tokens) from the run records,
    the judge's tokens and, with ``verifier.judge.pricing``, its cost (summed from the rows'
    ``judge_cost_usd``), their total, and, while samples are pending, the total projected to
    the whole input. ``billed_usd`` and the budget cover the generation model only. With
    ``model.batch.enabled`` the prices are the Batch API's (:func:`batch_prices`)."""
    config = (manifest or {}).get("config") or {}
    pricing = config.get("pricing") or {}
    if (((config.get("model") or {}).get("batch")) or {}).get("enabled"):
        pricing = batch_prices(pricing)
    tok = stats.get("tokens") or {}
    inp, out = int(tok.get("input_tokens") or 0), int(tok.get("output_tokens") or 0)
    write, read = int(tok.get(CACHE_WRITE) or 0), int(tok.get(CACHE_READ) or 0)
    spend: dict[str, Any] = {"input_tokens": inp, "output_tokens": out,
                             "cost_usd": round(cost_usd(inp, out, pricing, write, read), 6), "pricing": pricing}
    if write or read:  # prompt caching: the cached tokens, and what caching saved at these prices
        spend[CACHE_WRITE], spend[CACHE_READ] = write, read
        spend["cache_saved_usd"] = round(cache_saved_usd(write, read, pricing), 6)
    sessions = [s.get("spend") for s in (manifest or {}).get("sessions", []) if s.get("spend")]
    for k in ("requests", "rate_limited", "timeouts", "reasoning_tokens"):
        if sessions:
            spend[k] = int(sum(s.get(k, 0) for s in sessions))
    if sessions:
        # What the runs paid for, including requests that failed or whose samples were redone.
        spend["billed_usd"] = round(sum(s.get("cost_usd", 0.0) for s in sessions), 6)
    judge = stats.get("judge_tokens") or {}
    if judge:
        spend["judge_input_tokens"] = int(judge.get("input_tokens") or 0)
        spend["judge_output_tokens"] = int(judge.get("output_tokens") or 0)
    total = spend["cost_usd"]
    if "judge_cost_usd" in stats:
        spend["judge_cost_usd"] = round(float(stats["judge_cost_usd"]), 6)
        total += spend["judge_cost_usd"]
    spend["total_cost_usd"] = round(total, 6)
    expected, samples = stats.get("expected"), stats.get("samples") or 0
    if expected and samples and samples < expected:
        spend["projected_cost_usd"] = round(total * expected / samples, 4)
    return spend
