"""Self-describing artifacts: fingerprints, manifests and atomic completion.

Every stage output carries a ``manifest.json`` written last, so its presence means the stage completed.
This module uses only the standard library and numpy, so any tool can read and check an artifact.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import numpy as np

MANIFEST = "manifest.json"
PACKAGES = ("torch", "torchvision", "nvidia-dali-cuda130", "zarr", "numcodecs", "numpy", "typer", "dive")


class ArtifactError(RuntimeError):
    """An input artifact is missing, incomplete, or not the one a stage expects."""


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_arrays(*arrays: np.ndarray, strings: Iterable[str] = ()) -> str:
    """Fingerprint arrays (dtype, shape and bytes) and strings, in order."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    for text in strings:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour an artifact depends on (absent ones are skipped)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what ``platform`` knows). It is recorded because the
    same seed trains to other numbers on another CPU: bf16 and oneDNN kernels differ by instruction set (an AMD
    EPYC and an Intel Xeon give fmnist-lt's default run 80.15 / 81.87 and 79.34 / 80.71)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict[str, Any]:
    return {"cpu": cpu_model(), "arch": platform.machine(), "cores": os.cpu_count()}


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON to ``path`` (a folder's file or an object-store URL) so that readers never see half a file:
    through a temporary file and a rename locally, in one PUT remotely (``store.location.write_atomic``)."""
    from store.location import write_atomic

    text = json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n"
    write_atomic(path, text.encode())


def _json_default(value: Any) -> Any:
    """JSON for the numpy and path values artifacts carry; anything else is an error."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, numpy scalars become Python)."""
    return json.loads(json.dumps(value, default=_json_default))


def write_manifest(out_dir: str | os.PathLike, stage: str, config: dict, inputs: dict[str, str],
                   outputs: dict[str, str], extra: dict | None = None) -> Path:
    """Mark a stage complete: write its manifest (config, input and output fingerprints, versions, the machine)
    last."""
    payload = {
        "stage": stage,
        "format_version": 1,
        "config": config,
        "inputs": inputs,
        "outputs": outputs,
        "versions": package_versions(),
        "machine": machine(),
        "command": " ".join(sys.argv),
    }
    if extra:
        payload.update(extra)
    path = Path(out_dir) / MANIFEST
    write_json_atomic(path, payload)
    return path


def read_manifest(out_dir: str | os.PathLike, stage: str | None = None) -> dict:
    """Read a completed artifact's manifest, or raise ArtifactError saying how to make it."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        hint = f" Run `make {stage}` (or `dive {stage}`) to make it." if stage else ""
        raise ArtifactError(f"{out_dir} is not a completed artifact: {path} is missing.{hint}")
    with open(path) as handle:
        manifest = json.load(handle)
    if stage is not None and manifest.get("stage") != stage:
        raise ArtifactError(f"{path} was written by stage {manifest.get('stage')!r}, expected {stage!r}.")
    return manifest


def check_fingerprint(what: str, expected: str, found: str, where: str) -> None:
    """Refuse an input whose fingerprint differs from the one recorded, naming both."""
    if expected != found:
        raise ArtifactError(
            f"{what} fingerprint mismatch for {where}: expected {expected[:16]}…, found {found[:16]}…. "
            f"It was made from another {what}; rebuild it or point to the matching one."
        )
