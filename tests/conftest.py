"""Shared fixtures: where the real Fashion-MNIST lives, and how to run the CLI as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
ALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824",
             "MALLOC_TOP_PAD_": "1073741824"}

needs_fmnist = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                                  reason="real Fashion-MNIST missing: apt-get install dataset-fashion-mnist")


def run_cli(*args: str, env: dict | None = None, check: bool = True, timeout: int = 600,
            module: str = "stages.cli", nproc: int = 1) -> subprocess.CompletedProcess:
    """Run ``dive ARGS`` (or under torchrun with ``nproc`` gloo processes) in a subprocess."""
    full_env = {**os.environ, **ALLOC_ENV, **(env or {})}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory):
    """A real teacher (1 epoch on Fashion-MNIST-LT) and its cache of 3 views per image, made once."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("real Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
    root = tmp_path_factory.mktemp("pipeline")
    teacher, cache = root / "teacher", root / "cache"
    run_cli("teacher", "--set", "epochs=1", "--out", str(teacher))
    run_cli("cache", "--teacher", str(teacher), "--set", "views=3", "--out", str(cache))
    return teacher, cache


def kill_after(args: list[str], marker, timeout: float = 300) -> None:
    """Start ``dive ARGS``, SIGKILL it as soon as ``marker()`` is true, and wait for it to die."""
    import signal
    import tempfile
    import time

    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen([sys.executable, "-m", "stages.cli", *args], cwd=REPO,
                                env={**os.environ, **ALLOC_ENV}, stdout=subprocess.DEVNULL, stderr=errors)
        deadline = time.time() + timeout
        while not marker() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # A process that ended by itself before the marker did not test a kill: say why it ended, not what
        # the test then finds missing.
        if proc.returncode != -signal.SIGKILL and not marker():
            errors.seek(0)
            tail = errors.read().decode(errors="replace")[-4000:]
            raise AssertionError(f"dive {' '.join(args)} ended by itself (rc {proc.returncode}) before it could "
                                 f"be killed:\n{tail}")



@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server on loopback (``scripts/seaweed_server.py``) with an empty bucket, for the session:
    yields the environment a client needs, the bucket's URL and an s3fs client."""
    sys.path.insert(0, str(REPO / "scripts"))
    from seaweed_server import seaweedfs

    import s3fs

    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as s3:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3["endpoint"]}, use_listings_cache=False)
        yield {**s3, "fs": fs}
