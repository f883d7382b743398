"""Any verifier output becomes a clean reward and metrics, or a ValueError. (Through the pipeline:
tests/e2e/test_score.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from sft_ray.scoring import clean_result


def test_clean_result_rules():
    assert clean_result(np.float64(0.25)) == (0.25, {})
    reward, metrics = clean_result({"reward": np.bool_(True), "a": np.int32(2), "b": float("nan"), "c": [np.int64(1)],
                                    "d": {1: float("nan")}, "e": {1, 2}, "f": "x"})
    assert reward == 1.0 and metrics == {"a": 2.0, "c": [1], "d": {"1": None}, "f": "x"}
    assert type(metrics["a"]) is float
    for bad in (float("nan"), float("-inf"), "1", None, {"accuracy": 1.0}, [1.0], {"reward": [1]}):
        with pytest.raises(ValueError):
            clean_result(bad)
