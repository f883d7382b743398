"""A row's own responses_create_params are checked like the config's (the same model:
SamplingConfig), with file:line:field, before anything is sent (issue 22 item 10)."""

from __future__ import annotations

import pytest
from conftest import make_config, read_rows, write_jsonl

from sft_ray.rows import InputError, parse_line, sampling_params


@pytest.mark.parametrize("params, field, words", [
    ({"max_output_tokens": "many"}, "max_output_tokens", "valid integer"),
    ({"temperature": -3}, "temperature", "greater than or equal to 0"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort", "'minimal', 'low', 'medium' or 'high'"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"max_completion_tokens": "lots"}, "max_completion_tokens", "valid integer"),
    ({"stop": 7}, "stop", ""),
    ({"presence_penalty": 9}, "presence_penalty", "less than or equal to 2"),
])
def test_bad_row_sampling_params_name_file_line_and_field(params, field, words):
    line = '{"responses_create_params": {"input": "q", ' + ", ".join(
        f'"{k}": {__import__("json").dumps(v)}' for k, v in params.items()) + "}}"
    with pytest.raises(InputError) as e:
        parse_line(line, "data/in.jsonl:4")
    assert str(e.value).startswith(f"data/in.jsonl:4: field responses_create_params.{field}: "), str(e.value)
    assert words in str(e.value)


def test_good_row_params_pass_and_are_coerced_like_the_configs():
    row = parse_line('{"responses_create_params": {"input": "q", "max_output_tokens": 64.0, "temperature": 0, '
                     '"top_p": null, "tools": []}}', "in.jsonl:1")
    params = sampling_params(row, {"temperature": 1.0, "top_p": 1.0, "max_output_tokens": 100}, "i", 0)
    assert params["max_output_tokens"] == 64 and isinstance(params["max_output_tokens"], int)
    assert params["temperature"] == 0.0 and params["top_p"] == 1.0  # null: the config's default


@pytest.mark.usefixtures("ray_cluster")
def test_a_bad_row_param_stops_the_run_before_it_is_sent(tmp_path, mock_server):
    from sft_ray.job import EXIT_INPUT, RunError, run

    rows = [{"prompt": "a"}, {"responses_create_params": {"input": "b", "temperature": -3}}, {"prompt": "c"}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = make_config(tmp_path, mock_server, inp, "model.api=responses")
    with pytest.raises(RunError) as e:
        run(cfg, say=lambda s: None)
    assert e.value.code == EXIT_INPUT
    assert f"{inp}:2: field responses_create_params.temperature" in str(e.value)
    assert mock_server.state.requests == 0 and not read_rows(tmp_path / "run" / "failed")
