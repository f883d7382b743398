"""A row's own responses_create_params are checked like the config's (the same model:
SamplingConfig), with file:line:field, before anything is sent (issue 22 item 10)."""

from __future__ import annotations

import pytest
from conftest import make_config, read_rows, write_jsonl


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
