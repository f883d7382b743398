"""Hand-made run folders and rollouts, as phase 1 writes them, for the tests of finalize, its
formats, curation, preference pairs and reports (unit and end-to-end layers alike)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq

FIXTURES = Path(__file__).parent / "fixtures"

QWEN_TEMPLATE = (FIXTURES / "qwen2_5_tool_template.jinja").read_text()
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                      "parameters": {"type": "object", "properties": {"a": {"type": "number"},
                                                                                     "b": {"type": "number"}}}}},
]


def agent_rollout(i: int, sample_index: int = 0, reward: float = 1.0, history: bool = False, **extra):
    """An agent episode as the episode loop writes it: two model calls, two parallel tool calls."""
    city = f"city{i}"
    msgs = [{"role": "system", "content": "You are helpful."}]
    if history:  # an input conversation that already used a tool
        msgs += [{"role": "user", "content": "earlier question"},
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"id": f"h{i}", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
                 {"role": "tool", "tool_call_id": f"h{i}", "name": "add", "content": "3"},
                 {"role": "assistant", "content": "It is 3."}]
    msgs += [
        {"role": "user", "content": f"Weather in {city}, and {i} + 1?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}a", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}},
            {"id": f"c{i}b", "type": "function", "function": {"name": "add", "arguments": json.dumps({"a": i, "b": 1})}},
        ]},
        {"role": "tool", "tool_call_id": f"c{i}a", "name": "get_weather", "content": f"cold in {city}"},
        {"role": "tool", "tool_call_id": f"c{i}b", "name": "add", "content": str(i + 1)},
        {"role": "assistant", "content": f"It is cold in {city}; {i} + 1 = {i + 1}."},
    ]
    row = {"id": f"p{i}", "sample_index": sample_index, "messages": msgs, "tools": TOOLS,
           "parallel_tool_calls": True, "response": msgs[-1]["content"], "reward": reward, "error": None,
           "finish_reason": "stop", "termination": "final", "num_model_calls": 2, "num_tool_calls": 2,
           "num_tool_errors": 0, "num_malformed_tool_calls": 0,
           "usage": {"input_tokens": 50, "output_tokens": 20 + i % 7, "total_tokens": 70 + i % 7},
           "metrics": {"accuracy": reward}}
    row.update(extra)
    return row


def single_rollout(i: int, sample_index: int = 0, reward: float = 1.0, response: str | None = None, **extra):
    text = response if response is not None else f"answer {i}"
    row = {"id": f"s{i}", "sample_index": sample_index,
           "messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": text}],
           "response": text, "reward": reward, "error": None, "finish_reason": "stop",
           "usage": {"input_tokens": 5, "output_tokens": 3 + len(text.split()), "total_tokens": 8},
           "metrics": {}}
    row.update(extra)
    return row


def write_run(path: Path, rows: list[dict], files: int = 2, failed: list[dict] | None = None) -> Path:
    (path / "rollouts").mkdir(parents=True, exist_ok=True)
    for k in range(files):
        (path / "rollouts" / f"part-000-{k:05d}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows[k::files]))
    if failed:
        (path / "failed").mkdir(exist_ok=True)
        (path / "failed" / "part-000-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in failed))
    return path


def read_rows(folder: Path) -> list[dict]:
    out = []
    for f in sorted(folder.glob("part-*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines()]
    for f in sorted(folder.glob("part-*.parquet")):
        out += pq.read_table(f).to_pylist()
    return out


def episodes():
    """Agent episodes of every ending, plus single-turn rows (which have no termination)."""
    rows = [agent_rollout(0), agent_rollout(1),
            agent_rollout(2, termination="max_steps", num_model_calls=6),
            agent_rollout(3, termination="length", finish_reason="length"),
            agent_rollout(4, termination="error"),
            agent_rollout(5, num_malformed_tool_calls=1),
            agent_rollout(6, num_tool_errors=1),
            agent_rollout(7, num_tool_calls=0, num_model_calls=1),
            agent_rollout(8, num_tool_calls=5, num_tool_errors=2, num_model_calls=4),
            single_rollout(0, id="t0"), single_rollout(1, id="t1")]
    return rows


def prompt_samples(n_prompts=20, n=6, seed=0):
    """n samples per prompt; some replies repeat within a prompt, and the same text repeats across prompts."""
    import random

    rng = random.Random(seed)
    rows = []
    for p in range(n_prompts):
        for k in range(n):
            text = ["the same reply", "The  SAME reply", f"reply {k} to {p}", "shared text"][k % 4]
            rows.append(single_rollout(p, sample_index=k, reward=rng.choice([0.0, 0.5, 1.0]), response=text,
                                       task_source="math" if p % 2 else "code"))
    return rows


def make_run_folder(tmp_path, rows):
    from sft_ray.runfolder.manifest import save_manifest

    write_run(tmp_path, rows)
    save_manifest(str(tmp_path), {"config": {"filter": {"min_reward": 0.0}, "train": {"rows_per_shard": 50},
                                             "shuffle": {"seed": 0}}})
    return tmp_path


def make_run(tmp_path, n=1000, files=3, seed=0, failed=7):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        reward = rng.choice([0.0, 0.25, 0.5, 1.0, rng.random()])
        rows.append({"id": f"r{i // 2}", "sample_index": i % 2, "reward": reward, "error": None,
                     "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
                     "metrics": {"accuracy": float(reward == 1.0)}, "finish_reason": "stop",
                     "usage": {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8}})
    (tmp_path / "rollouts").mkdir(parents=True)
    for k in range(files):
        part = rows[k::files]
        (tmp_path / "rollouts" / f"part-000-{k:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "part-000-00000.jsonl").write_text("".join(
        json.dumps({"id": f"f{i}", "sample_index": 0, "reward": None,
                    "error": {"type": "rate_limit" if i % 2 else "timeout", "message": "m"}}) + "\n"
        for i in range(failed)))
    return rows


def train_rows(run):
    out = []
    for f in sorted((run / "train").glob("part-*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines()]
    return out
