"""The content of decontaminate.against's benchmarks is part of the run fingerprint (issue 27): a
benchmark file edited between a run and its resume is a change the resume names; a folder made
before the content was recorded is compared without it."""

from __future__ import annotations

import pytest

from sft_ray.configload import load_config
from sft_ray.decontaminate import build_index
from sft_ray.runfolder.manifest import DriftError, prepare_run_dir, save_manifest
from tests.conftest import write_jsonl

GSM = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
       "How many clips did Natalia sell altogether in April and May?")


def test_an_edited_benchmark_refuses_the_resume_and_an_older_folder_is_compared_without_it(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p"}])
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"q": GSM}])
    cfg = load_config(None, [f"input={inp}", f"output={tmp_path / 'run'}", "model.name=mock",
                             f"decontaminate.against={gsm}"])

    def prepare():
        return prepare_run_dir(cfg, False, {}, build_index([str(gsm)]).digests)

    manifest = prepare()
    assert set(manifest["fingerprint"]["decontaminate"]["content"]) == {"gsm"}
    save_manifest(str(tmp_path / "run"), manifest)
    prepare()  # the same content: the same run
    write_jsonl(gsm, [{"q": GSM}, {"q": GSM.replace("Natalia", "Ruth")}])
    with pytest.raises(DriftError, match=r"decontaminate\.content\.gsm: '[0-9a-f]{32}' -> '[0-9a-f]{32}'"):
        prepare()
    del manifest["fingerprint"]["decontaminate"]["content"]  # a folder made before the digest was recorded
    save_manifest(str(tmp_path / "run"), manifest)
    prepare()
