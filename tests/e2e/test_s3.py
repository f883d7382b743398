"""`s3://` input and output for real, against a local moto S3 server on 127.0.0.1.

The endpoint and credentials reach pyarrow through the standard AWS environment
variables (``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``...), as they would on a
cluster. ``gs://`` is covered at the level of URI handling only: there is no GCS
emulator here, and reads and writes go through the same pyarrow calls as S3.
"""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
import sys
import time
import uuid

import boto3
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import make_config
from moto.server import ThreadedMotoServer

from sft_ray import io, tabular
from sft_ray.job import EXIT_OK, run
from sft_ray.stages.read import read_samples


@pytest.fixture(scope="module")
def moto_url():
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_url, monkeypatch):
    """A fresh bucket; the environment points pyarrow (and CLI subprocesses) at moto."""
    for k, v in {"AWS_ENDPOINT_URL_S3": moto_url, "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
    bucket = f"sft-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    client.bucket = bucket
    return client


def put_jsonl(s3, key: str, rows: list, gz: bool = False) -> None:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    s3.put_object(Bucket=s3.bucket, Key=key, Body=gzip.compress(body) if gz else body)


def get_jsonl(s3, prefix: str) -> dict[str, list[dict]]:
    """{key: rows} of every object under a prefix."""
    out = {}
    for obj in s3.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", []):
        if obj["Key"].endswith(".jsonl"):
            body = s3.get_object(Bucket=s3.bucket, Key=obj["Key"])["Body"].read().decode()
            out[obj["Key"]] = [json.loads(line) for line in body.splitlines() if line.strip()]
    return out


def test_input_folder_and_glob_on_s3(s3, monkeypatch):
    put_jsonl(s3, "in/a.jsonl", [{"prompt": "a1"}, {"prompt": "a2"}])
    put_jsonl(s3, "in/sub/b.jsonl.gz", [{"prompt": "b1", "expected_answer": "007"}], gz=True)
    put_jsonl(s3, "in/c.json", [{"prompt": "c1"}])
    put_jsonl(s3, "in/sub/d.jsonl", [{"prompt": "d1"}])
    s3.put_object(Bucket=s3.bucket, Key="in/README.txt", Body=b"not rows")
    s3.put_object(Bucket=s3.bucket, Key="in/dataset_info.json", Body=b'{"features": {}}')
    root = f"s3://{s3.bucket}/in"
    # A folder gives its JSONL (Parquet, Arrow) files only (issue 9.20: dataset_info.json stopped the run).
    assert tabular.list_files(root + "/") == [f"{root}/a.jsonl", f"{root}/sub/b.jsonl.gz", f"{root}/sub/d.jsonl"]
    assert tabular.list_files(root + "/*.jsonl") == [f"{root}/a.jsonl"]  # `*` does not cross `/`
    assert tabular.list_files(root + "/*/*.jsonl") == [f"{root}/sub/d.jsonl"]
    assert tabular.list_files(root + "/**/*.gz") == [f"{root}/sub/b.jsonl.gz"]
    assert tabular.list_files(root + "/**/*.jsonl") == [f"{root}/a.jsonl", f"{root}/sub/d.jsonl"]
    with pytest.raises(FileNotFoundError):
        tabular.list_files(f"s3://{s3.bucket}/nothing-here/")
    # pyarrow also honours the service-independent variable.
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.meta.endpoint_url)
    assert tabular.list_files(root + "/c*.json") == [f"{root}/c.json"]  # a glob names any file
    [cols] = list(read_samples(f"{root}/sub/b.jsonl.gz", num_repeats=2))
    assert cols["sample_index"] == [0, 1]
    assert json.loads(cols["row"][0])["expected_answer"] == "007"  # text kept, never coerced
    assert cols["source"][0] == f"{root}/sub/b.jsonl.gz:1"


# The mock server echoes the prompt: even rows carry their own answer (reward 1), odd ones do not.
ROWS = [{"prompt": f"\\boxed{{{i}}}", "expected_answer": str(i) if i % 2 == 0 else "-1"} for i in range(20)]


@pytest.mark.usefixtures("ray_cluster")
def test_run_on_s3_resumes_without_sending_twice(s3, mock_server, tmp_path):
    # 4 prompts fail on their first attempt (no retries): they land in failed/ and the
    # rerun sends exactly those 4 again, nothing else.
    rows = ROWS[:16] + [{"prompt": f"late {i} [[fail:500:1]]", "expected_answer": "x"} for i in range(4)]
    put_jsonl(s3, "in/part-0.jsonl", rows[:10])
    put_jsonl(s3, "in/part-1.jsonl", rows[10:])
    out = f"s3://{s3.bucket}/runs/r1"
    cfg = make_config(tmp_path, mock_server, f"s3://{s3.bucket}/in/", f"output={out}", "verifier.type=math",
                      "model.max_retries=0", "max_error_fraction=0.5", "filter.min_reward=1",
                      "train.rows_per_shard=3", "train.include_fields=[id,reward]")
    said = []
    assert run(cfg, say=said.append) == EXIT_OK, said
    assert mock_server.state.requests == 20
    first = get_jsonl(s3, "runs/r1/rollouts/")
    assert sum(len(v) for v in first.values()) == 16
    assert len(get_jsonl(s3, "runs/r1/failed/")) == 1

    said = []
    assert run(cfg, say=said.append) == EXIT_OK, said
    assert "16 already done, 4 to generate" in "\n".join(said)
    assert mock_server.state.requests == 24  # only the 4 failed samples were sent again
    rollouts = [r for v in get_jsonl(s3, "runs/r1/rollouts/").values() for r in v]
    assert len(rollouts) == 20 and len({(r["id"], r["sample_index"]) for r in rollouts}) == 20
    assert all(r["node_id"] and r["error"] is None for r in rollouts)
    assert get_jsonl(s3, "runs/r1/failed/") == {}  # superseded by the successful retries
    assert set(get_jsonl(s3, "runs/r1/rollouts/")) > set(first)  # session 1 added parts, kept session 0's

    stats = json.loads(s3.get_object(Bucket=s3.bucket, Key="runs/r1/stats.json")["Body"].read())
    assert stats["samples"] == 20 and stats["failed"] == 0 and stats["kept"] == 8  # rows 0, 2, ... 14
    shards = get_jsonl(s3, "runs/r1/train/")
    assert sorted(shards) == [f"runs/r1/train/part-0000{i}.jsonl" for i in range(3)]
    assert sorted(len(v) for v in shards.values()) == [2, 3, 3]
    train = [t for v in shards.values() for t in v]
    assert all(set(t) == {"messages", "id", "reward"} and t["reward"] == 1.0 for t in train)
    assert all(t["messages"][-1]["role"] == "assistant" for t in train)
    by_key = {r["id"]: r for r in rollouts}
    assert sorted(t["messages"][-1]["content"] for t in train) == sorted(
        by_key[t["id"]]["response"] for t in train)
    assert {t["messages"][-1]["content"] for t in train} == {f"\\boxed{{{i}}}" for i in range(0, 16, 2)}

    # --restart on an s3 run folder: everything is deleted and generated once more.
    said = []
    assert run(cfg, restart=True, say=said.append) == EXIT_OK, said
    assert mock_server.state.requests == 44
    assert sorted(k.rsplit("/", 1)[1] for k in get_jsonl(s3, "runs/r1/rollouts/")) == ["part-000-00000.jsonl"]


@pytest.mark.usefixtures("ray_cluster")
def test_parquet_input_on_s3_with_rename_resumes(s3, mock_server, tmp_path):
    """Issue 27: Parquet (several row groups) beside JSONL in an s3:// folder, columns renamed."""
    import pyarrow as pa

    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"question": [r["prompt"] for r in ROWS[:14]],
                             "answer": [r["expected_answer"] for r in ROWS[:14]]}), buf, row_group_size=4)
    s3.put_object(Bucket=s3.bucket, Key="pin/a.parquet", Body=buf.getvalue().to_pybytes())
    put_jsonl(s3, "pin/b.jsonl", [{"question": r["prompt"], "answer": r["expected_answer"]} for r in ROWS[14:]])
    root = f"s3://{s3.bucket}/pin"
    assert tabular.list_files(root) == [f"{root}/a.parquet", f"{root}/b.jsonl"]
    cfg = make_config(tmp_path, mock_server, root, f"output={tmp_path / 'run'}", "verifier.type=math",
                      "read.rename={question: prompt, answer: expected_answer}")
    said: list = []
    assert run(cfg, say=said.append) == EXIT_OK, said
    assert mock_server.state.requests == 20
    rollouts = [json.loads(line) for f in sorted((tmp_path / "run" / "rollouts").glob("*.jsonl"))
                for line in f.read_text().splitlines()]
    assert sorted(r["reward"] for r in rollouts) == [0.0] * 10 + [1.0] * 10
    assert {r["source_file"] for r in rollouts} == {f"{root}/a.parquet", f"{root}/b.jsonl"}
    assert sorted(r["source_line"] for r in rollouts if r["source_file"].endswith("parquet")) == list(range(1, 15))
    assert run(cfg, say=said.append) == EXIT_OK and mock_server.state.requests == 20  # resumed: nothing resent


@pytest.mark.usefixtures("ray_cluster")
def test_stats_and_filter_commands_on_an_s3_run_folder(s3, mock_server, tmp_path):
    put_jsonl(s3, "in/p.jsonl", ROWS)
    out = f"s3://{s3.bucket}/runs/r2"
    cfg = make_config(tmp_path, mock_server, f"s3://{s3.bucket}/in/p.jsonl", f"output={out}", "verifier.type=math")
    assert run(cfg, say=lambda _: None) == EXIT_OK
    served = mock_server.state.requests
    cli = [sys.executable, "-m", "sft_ray.cli"]
    stats = subprocess.run(cli + ["stats", out], capture_output=True, text=True, timeout=120)
    assert stats.returncode == 0, stats.stderr
    assert "samples: 20" in stats.stdout and '"reward": 0.5' in stats.stdout
    flt = subprocess.run(cli + ["filter", out, "--min-reward", "1", "--rows-per-shard", "4", "--file-format", "parquet"],
                         capture_output=True, text=True, timeout=120)
    assert flt.returncode == 0, flt.stderr
    fs = pafs.S3FileSystem(endpoint_override=s3.meta.endpoint_url, access_key="testing", secret_key="testing",
                           region="us-east-1")
    names = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(f"{s3.bucket}/runs/r2/train")))
    assert names == [f"{s3.bucket}/runs/r2/train/part-0000{i}.parquet" for i in range(3)]  # 10 rows: 4, 3, 3
    table = pq.ParquetDataset(f"{s3.bucket}/runs/r2/train", filesystem=fs).read()
    assert table.num_rows == 10 and table.column_names == ["messages", "tools"]
    saved = json.loads(s3.get_object(Bucket=s3.bucket, Key="runs/r2/stats.json")["Body"].read())
    assert saved["kept"] == 10 and saved["filter"] == {"min_reward": 1.0}
    manifest = json.loads(s3.get_object(Bucket=s3.bucket, Key="runs/r2/run.json")["Body"].read())
    assert manifest["config"]["train"]["file_format"] == "parquet"
    assert mock_server.state.requests == served  # no model was called


def test_s3_parts_are_flushed_on_a_timer_and_at_a_byte_limit(s3):
    """Rows must not sit in the driver's memory while no batch arrives (issue 9.11)."""
    from sft_ray.runfolder.parts import PartWriter

    w = PartWriter(f"s3://{s3.bucket}/runs/w/rollouts", 0, part_seconds=0.5, part_bytes=1000)
    try:
        w.write([b'{"a": 1}'])
        deadline = time.time() + 10
        while not get_jsonl(s3, "runs/w/rollouts/") and time.time() < deadline:
            time.sleep(0.1)
        assert get_jsonl(s3, "runs/w/rollouts/") == {"runs/w/rollouts/part-000-00000.jsonl": [{"a": 1}]}
        w.part_seconds = 3600
        w.write([b'{"b": "' + b"x" * 2000 + b'"}'])  # over the byte bound: uploaded at once
        assert len(get_jsonl(s3, "runs/w/rollouts/")) == 2
    finally:
        w.close()


def test_byte_ranges_of_an_s3_object_read_every_line_once(s3):
    """Finalize cuts large rollout files into byte ranges read by several processes; on S3 they are
    ranged reads through pyarrow (not Python's line reader, as for local files)."""
    import random

    rng = random.Random(3)
    data = b"".join(f'{{"n": {i}, "pad": "{"x" * rng.randint(0, 60)}"}}\n'.encode() for i in range(400)) + b'{"n": "end"}'
    s3.put_object(Bucket=s3.bucket, Key="r/part.jsonl", Body=data)
    uri = f"s3://{s3.bucket}/r/part.jsonl"
    want = data.split(b"\n")
    for _ in range(10):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 8)))
        bounds = [0, *cuts, None]
        assert [line for a, b in zip(bounds, bounds[1:]) for line in io.iter_range(uri, a, b)] == want, cuts
