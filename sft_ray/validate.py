"""`sft-ray validate`: check the input of a config before spending anything on it."""

from __future__ import annotations

from itertools import islice

from sft_ray import io
from sft_ray.config import RunConfig
from sft_ray.rows import InputError, parse_line


def check_input(cfg: RunConfig, rows_per_file: int = 100) -> tuple[list[str], str]:
    """Parse the first rows of every input file; return (problems, summary)."""
    problems: list[str] = []
    try:
        files = io.list_input_files(cfg.input)
    except FileNotFoundError as e:
        return [str(e)], f"input: {cfg.input}"
    checked, cut = 0, False
    for path in files:
        lineno = 0
        for lineno, line in islice(enumerate(io.iter_lines(path), start=1), rows_per_file):
            if not line.strip():
                continue
            checked += 1
            try:
                row = parse_line(line, f"{path}:{lineno}")
            except InputError as e:
                problems.append(str(e))
                continue
            answer = cfg.verifier.answer_field
            if cfg.verifier.type in ("exact_match", "math", "mcq") and answer not in row:
                problems.append(f"{path}:{lineno}: field {answer}: missing (verifier {cfg.verifier.type} needs it)")
        cut = cut or lineno >= rows_per_file  # lines beyond were not looked at
    if not checked and not cut and not cfg.read.allow_empty:  # every file read to its end: `sft-ray run` refuses it
        problems.append(f"input has no rows (empty or blank lines only): {', '.join(files[:5])}"
                        + (f" and {len(files) - 5} more" if len(files) > 5 else "")
                        + " (set read.allow_empty=true to accept that)")
    try:  # a python verifier that does not import fails here, not after the first batch
        from sft_ray.verifiers import build_verifier

        build_verifier(cfg.verifier.model_dump())
    except Exception as e:
        problems.append(f"verifier: {e}")
    try:  # likewise a tool module
        from sft_ray.environments import build_environment

        build_environment(cfg.environment.model_dump())
    except Exception as e:
        problems.append(f"environment: {e}")
    if cfg.model.backend == "openai" and cfg.model.api_key_env and cfg.model.api_key() is None:
        host = cfg.model.base_url.split("//", 1)[-1].split("/", 1)[0]
        if not host.startswith(("127.", "localhost", "[::1]")):
            problems.append(f"model.api_key_env: environment variable {cfg.model.api_key_env} is not set")
    try:
        cfg.model.secret_headers()
    except ValueError as e:  # ConfigError: names the variables, never a value
        problems.append(str(e))
    summary = (f"config ok: model {cfg.model.backend}:{cfg.model.name or '(default)'}, verifier {cfg.verifier.type}; "
               f"input {len(files)} file(s), first {checked} row(s) parsed")
    return problems, summary
