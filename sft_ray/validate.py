"""`sft-ray validate`: check the input of a config before spending anything on it."""

from __future__ import annotations

from itertools import islice

from sft_ray import tabular
from sft_ray.config import HostedModelConfig, RunConfig, flat_dump
from sft_ray.rows import InputError, load_object, parse_line, prompt_tools
from sft_ray.toolschema import SchemaProblem, validator


def mcp_tools(cfg: RunConfig) -> tuple[list[dict], list[str]]:
    """The tools the configured MCP server offers (connecting once), and lines describing each."""
    import asyncio

    import orjson

    from sft_ray.environments.mcp import list_tools

    tools = asyncio.run(list_tools(cfg.environment.model_dump()))
    lines = [f"  {t['function']['name']}: {orjson.dumps(t['function']['parameters']).decode()}" for t in tools]
    return tools, lines


def check_input(cfg: RunConfig, rows_per_file: int = 100) -> tuple[list[str], str]:
    """Parse the first rows of every input file; return (problems, summary)."""
    problems: list[str] = []
    try:
        files = tabular.list_files(cfg.input)
    except (FileNotFoundError, InputError) as e:
        return [str(e)], f"input: {cfg.input}"
    checked, cut = 0, False
    offered: set[str] | None = None  # an MCP server's tools: what rows may declare
    tool_lines: list[str] = []
    if cfg.environment.type == "mcp":
        try:
            tools, lines = mcp_tools(cfg)
        except Exception as e:
            problems.append(f"environment: {e}")
        else:
            offered = {t["function"]["name"] for t in tools}
            tool_lines = [f"MCP server offers {len(tools)} tool(s):", *lines]
            for t in tools:
                try:
                    validator(t["function"]["parameters"], f"environment: MCP tool {t['function']['name']!r}")
                except SchemaProblem as e:
                    problems.append(str(e))
    seen_columns: set[str] = set()  # the read.rename columns some checked row has
    for path in files:
        read = 0
        rows = islice(tabular.iter_rows(path), rows_per_file)
        while True:
            try:
                lineno, line = next(rows)
            except StopIteration:
                break
            except InputError as e:  # the file as a whole: not Parquet, a column of no JSON value
                problems.append(str(e))
                break
            read += 1
            checked += 1
            try:
                given = load_object(line, f"{path}:{lineno}")
                seen_columns.update(c for c in cfg.read.rename if c in given)
                row = parse_line(line, f"{path}:{lineno}", cfg.read.rename)
            except InputError as e:
                problems.append(tabular.located(e))
                continue
            where = tabular.at(path, lineno)
            declared = (prompt_tools(row, where).get("tools") or [])
            for t in declared:
                try:
                    validator((t.get("function") or {}).get("parameters", True),
                              f"{where}: tool {(t.get('function') or {}).get('name')!r}")
                except SchemaProblem as e:
                    problems.append(str(e))
            missing = sorted({(t.get("function") or {}).get("name") for t in declared} - offered, key=str) \
                if offered is not None else []
            if missing:
                problems.append(f"{where}: field tools: the MCP server does not offer {', '.join(map(str, missing))} "
                                f"(it offers: {', '.join(sorted(offered or ())) or 'none'})")
            answer = cfg.verifier.answer_field
            if cfg.verifier.type in ("exact_match", "math", "mcq") and answer not in row:
                problems.append(f"{where}: field {answer}: missing (verifier {cfg.verifier.type} needs it)")
        cut = cut or read >= rows_per_file  # rows beyond were not looked at
    if not checked and not cut and not cfg.read.allow_empty:  # every file read to its end: `sft-ray run` refuses it
        problems.append(f"input has no rows (empty or blank lines only): {', '.join(files[:5])}"
                        + (f" and {len(files) - 5} more" if len(files) > 5 else "")
                        + " (set read.allow_empty=true to accept that)")
    unseen = [c for c in cfg.read.rename if c not in seen_columns]
    if unseen and checked:
        problems.append(f"read.rename: no input row checked has {', '.join(unseen)} (a typo? the columns are the "
                        "input's top-level fields)")
    problems += plugin_problems(cfg)
    if cfg.decontaminate.active:  # every benchmark read and indexed, as `sft-ray run` will
        from sft_ray.decontaminate import BenchmarkError, build_index

        d = cfg.decontaminate
        try:
            index = build_index(d.against, d.ngram, d.min_matches, d.min_words)
            tool_lines.append(f"decontaminate: {len(index.benchmarks)} benchmark(s), "
                              f"{sum(b.items for b in index.benchmarks)} items indexed")
        except BenchmarkError as e:
            problems.append(f"decontaminate.against: {e}")
    if isinstance(cfg.model, HostedModelConfig) and cfg.model.api_key_env and cfg.model.api_key() is None:
        host = cfg.model.base_url.split("//", 1)[-1].split("/", 1)[0]
        if not host.startswith(("127.", "localhost", "[::1]")):
            problems.append(f"model.api_key_env: environment variable {cfg.model.api_key_env} is not set")
    try:
        cfg.model.secret_headers()
    except ValueError as e:  # ConfigError: names the variables, never a value
        problems.append(str(e))
    summary = (f"config ok: model {cfg.model.backend}:{cfg.model.name or '(default)'}, verifier {cfg.verifier.type}; "
               f"input {len(files)} file(s), first {checked} row(s) parsed")
    return problems, "\n".join([summary, *tool_lines])


def plugin_problems(cfg: RunConfig) -> list[str]:
    """Build the user's code (tool module, verifier) once, here: a module that does not import is
    one clear problem before anything runs, not an actor that fails to start."""
    from sft_ray.environments import build_environment
    from sft_ray.verifiers import build_verifier

    problems = []
    for what, build, section in (("environment", build_environment, cfg.environment.model_dump()),
                                 ("verifier", build_verifier, flat_dump(cfg.verifier))):
        try:
            build(section)
        except Exception as e:
            problems.append(f"{what}: {e}")
    return problems
