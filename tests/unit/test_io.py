"""Storage URIs: gs:// maps to pyarrow's GCS filesystem, joined and displayed as the user wrote it.
(s3:// through moto: tests/e2e/test_s3.py.)"""

from __future__ import annotations

from sft_ray import io


def test_gs_uris_map_to_pyarrow_gcs():
    fs, path = io.filesystem("gs://some-bucket/prompts/a.jsonl")
    assert fs.type_name == "gcs" and path == "some-bucket/prompts/a.jsonl"
    assert io.display(fs, path) == "gs://some-bucket/prompts/a.jsonl"
    assert io.join("gs://some-bucket/run/", "rollouts") == "gs://some-bucket/run/rollouts"
    assert io.filesystem("gs://some-bucket/run/", fs) == (fs, "some-bucket/run")
