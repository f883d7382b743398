"""sft_ray.tabular, the one reader of JSONL, Parquet and `datasets` folders, on real files written by
pyarrow and by `datasets`' save_to_disk (no Ray)."""

from __future__ import annotations

import datetime
import decimal
import json
import re

import datasets
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from sft_ray import tabular
from sft_ray.rows import InputError, rename_fields

# Rows of different shapes, as a chat export has them: in one Parquet file every message has every
# key any message has (tool_calls, name), null where a row lacks it.
CHAT = [
    {"id": "a", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi", "name": "bo"}],
     "expected_answer": "1"},
    {"id": "b", "messages": [{"role": "user", "content": "2+2"},
                             {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                                   "function": {"name": "add", "arguments": "{}"}}]},
                             {"role": "tool", "content": "4", "tool_call_id": "c1"}]},
    {"id": "c", "prompt": "plain", "system": "sys", "meta": {"tags": ["x", None], "n": 3}},
]


def table_of(rows: list[dict]) -> pa.Table:
    """Rows as one Arrow table with the union of their keys (as pandas or datasets would write them)."""
    return pa.Table.from_pylist(rows, schema=pa.Table.from_pylist([_union(rows)]).schema)


def _union(rows: list[dict]) -> dict:
    """A row holding every key of every row, nested ones merged (to infer one schema from)."""
    out: dict = {}
    for r in rows:
        for k, v in r.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = _union([out[k], v])
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                out[k] = [_union((out.get(k) or []) + v)]
            elif k not in out or out[k] is None:
                out[k] = v
    return out


def test_parquet_rows_are_what_json_gives_over_several_row_groups(tmp_path, monkeypatch):
    rows = [dict(r, id=f"{r['id']}{i}") for i in range(40) for r in CHAT]
    pq.write_table(table_of(rows), tmp_path / "chat.parquet", row_group_size=7)
    assert pq.ParquetFile(tmp_path / "chat.parquet").num_row_groups == 18
    monkeypatch.setattr(tabular, "BATCH_ROWS", 5)  # batches smaller than a row group, too
    got = list(tabular.iter_records(str(tmp_path / "chat.parquet")))
    assert [r.value for r in got] == rows  # no `tool_calls: None`, `name: None`... a JSON round trip gives
    assert [r.row for r in got] == list(range(1, 121))
    assert got[0].file == str(tmp_path / "chat.parquet")
    # iter_rows gives JSON text; loading it gives the same values
    assert [orjson.loads(t) for _, t in tabular.iter_rows(str(tmp_path / "chat.parquet"))] == rows


def test_reading_is_bounded_by_a_batch_not_the_file(tmp_path):
    """200k rows of 200 bytes: the whole file decoded is ~40 MB; reading keeps a row group at a time."""
    n = 200_000
    text = pa.array([f"{i:06d}" + "x" * 194 for i in range(n)])
    pq.write_table(pa.table({"prompt": text}), tmp_path / "big.parquet", row_group_size=10_000)
    del text
    peak, start = 0, pa.total_allocated_bytes()
    count = 0
    for _, _t in tabular.iter_rows(str(tmp_path / "big.parquet")):
        count += 1
        if count % 1000 == 0:
            peak = max(peak, pa.total_allocated_bytes() - start)
    assert count == n
    assert peak < 8_000_000, peak  # a row group (2 MB) and its buffers, never the file's 40 MB


def test_a_datasets_folder_and_a_dataset_dict(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i), "messages": [{"role": "user", "content": f"m{i}"}]}
            for i in range(2500)]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    (tmp_path / "saved" / "cache-0123.arrow").write_bytes(b"a cache file, not a shard")
    files = tabular.list_files(str(tmp_path / "saved"))
    assert [f.rsplit("/", 1)[1] for f in files] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    got = list(tabular.iter_records(str(tmp_path / "saved")))
    assert [r.value for r in got] == rows
    assert (got[1250].file, got[1250].row) == (files[1], 1)
    datasets.DatasetDict({"train": ds.select(range(10)), "test": ds.select(range(3))}).save_to_disk(
        str(tmp_path / "dd"))
    assert [f.split("/")[-2] for f in tabular.list_files(str(tmp_path / "dd"))] == ["test", "train"]
    only = list(tabular.iter_records(str(tmp_path / "dd"), columns=["question"]))
    assert len(only) == 13 and only[0].value == {"question": "q0"}


def test_a_mixed_folder_reads_jsonl_parquet_and_arrow_and_nothing_else(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "j1"}, "", {"prompt": "j2"}])
    pq.write_table(pa.table({"prompt": ["p1", "p2"]}), tmp_path / "b.parquet")
    datasets.Dataset.from_list([{"prompt": "s1"}]).save_to_disk(str(tmp_path / "c"))
    (tmp_path / "README.md").write_text("# not rows")
    got = [(r.file.rsplit("/", 1)[1], r.row, r.value["prompt"]) for r in tabular.iter_records(str(tmp_path))]
    assert got == [("a.jsonl", 1, "j1"), ("a.jsonl", 3, "j2"), ("b.parquet", 1, "p1"), ("b.parquet", 2, "p2"),
                   ("data-00000-of-00001.arrow", 1, "s1")]
    assert tabular.list_files(str(tmp_path / "*.parquet")) == [str(tmp_path / "b.parquet")]
    with pytest.raises(FileNotFoundError, match="decontaminate.against not found: "):
        tabular.list_files(str(tmp_path / "nope"), what="decontaminate.against")


def test_arrow_types_map_to_json_values(tmp_path):
    t = pa.table({
        "ts": pa.array([datetime.datetime(2024, 5, 1, 12), None]),
        "day": pa.array([datetime.date(2024, 5, 1), None]),
        "price": pa.array([decimal.Decimal("1.50"), None]),
        "cat": pa.array(["x", "y"]).dictionary_encode(),
        "attrs": pa.array([[("k", 1)], []], type=pa.map_(pa.string(), pa.int64())),
        "extra.v2": pa.array(['{"a": [1, null]}', None], type=pa.json_()),  # a dot in a name is a name
        "half": pa.array([1.5, None], type=pa.float16()),
        "ints": pa.array([[1, None], None], type=pa.list_(pa.int32())),
    })
    pq.write_table(t, tmp_path / "t.parquet")
    got = [r.value for r in tabular.iter_records(str(tmp_path / "t.parquet"))]
    assert got == [{"ts": "2024-05-01 12:00:00.000000", "day": "2024-05-01", "price": 1.5, "cat": "x",
                    "attrs": {"k": 1}, "extra.v2": {"a": [1, None]}, "half": 1.5, "ints": [1, None]},
                   {"cat": "y", "attrs": {}}]
    feather = tmp_path / "t.arrow"  # the IPC file format, beside save_to_disk's stream format
    with pa.ipc.new_file(feather, t.schema) as w:
        w.write_table(t)
    assert [r.value for r in tabular.iter_records(str(feather))] == got


@pytest.mark.parametrize("table, message", [
    (pa.table({"prompt": ["p"], "img": pa.array([b"\x89PNG"])}), "column img: Arrow type binary has no JSON value"),
    (pa.table({"m": pa.array([[{"role": "u", "at": datetime.timedelta(1)}]])}),
     "column m[].at: Arrow type duration[us] has no JSON value"),
    (pa.table({"m": pa.array([[(1, "a")]], type=pa.map_(pa.int32(), pa.string()))}), "keys must be strings"),
    (pa.table({"s": pa.StructArray.from_arrays([pa.array(["{}"], pa.json_())], names=["j"])}),
     "column s.j: a JSON extension value inside another value is not read"),
])
def test_a_column_of_no_json_value_is_refused_by_name(tmp_path, table, message):
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.raises(InputError, match=re.escape(message)) as e:
        list(tabular.iter_records(str(tmp_path / "t.parquet")))
    assert e.value.source == str(tmp_path / "t.parquet")
    if "img" in message:  # leaving the column out reads the file
        assert [r.value for r in tabular.iter_records(str(tmp_path / "t.parquet"), columns=["prompt"])] == \
            [{"prompt": "p"}]


def test_broken_files_name_themselves(tmp_path):
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "text.parquet").write_text("prompt,answer\n")
    pq.write_table(pa.table({"prompt": ["p"] * 100}), tmp_path / "cut.parquet")
    data = (tmp_path / "cut.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "x.arrow").write_text("not arrow")
    for name in ("empty.parquet", "text.parquet", "cut.parquet", "x.arrow"):
        with pytest.raises(InputError, match="not a readable") as e:
            list(tabular.iter_rows(str(tmp_path / name)))
        assert e.value.source == str(tmp_path / name)
    pq.write_table(pa.table({"prompt": ["p"]}), tmp_path / "good.parquet")
    with pytest.raises(InputError, match=r"column\(s\) answer: not in the file \(it has: prompt\)"):
        list(tabular.iter_records(str(tmp_path / "good.parquet"), columns=["answer"]))
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, "[1, 2]"])
    with pytest.raises(InputError, match=r"bad.jsonl:2: expected a JSON object, got list"):
        list(tabular.iter_records(str(tmp_path / "bad.jsonl")))
    (tmp_path / "state" / "x").mkdir(parents=True)
    (tmp_path / "state" / "x" / "state.json").write_text('{"not": "datasets"}')
    with pytest.raises(InputError, match="state.json: not a `datasets` state.json"):
        tabular.list_files(str(tmp_path / "state"))


def test_rename_fields():
    assert rename_fields({"question": "q", "answer": "a", "x": 1}, {"question": "prompt", "answer": "expected_answer"}) \
        == {"prompt": "q", "expected_answer": "a", "x": 1}
    row = {"prompt": "p"}
    assert rename_fields(row, {"question": "prompt"}) is row  # nothing to rename: the row itself
    assert rename_fields({"a": 1, "b": 2}, {"a": "b", "b": "a"}) == {"b": 1, "a": 2}  # a swap
    with pytest.raises(InputError, match="in.parquet:3: field prompt: given twice, by the row's own prompt and by "
                                         "question"):
        rename_fields({"question": "q", "prompt": "p"}, {"question": "prompt"}, "in.parquet:3")
    with pytest.raises(InputError, match="field prompt: given twice"):
        rename_fields({"prompt": "p", "question": "q"}, {"question": "prompt"}, "in.parquet:3")
    assert json.loads(orjson.dumps(rename_fields({"question": "q"}, {"question": "prompt"}))) == {"prompt": "q"}
