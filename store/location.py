"""Where a store lives: a local folder (``pathlib.Path``) or an object-store prefix (``RemotePath``, any fsspec
URL such as ``s3://bucket/prefix``).

``RemotePath`` offers the few ``Path`` operations the store uses (``/``, ``is_file``, ``read_bytes``,
``write_bytes``, ``unlink``, ``iterdir``, ``name``, ``parent``), so the store's code is one code for both. What
differs is said where it matters:

- a PUT of one object is atomic, so ``write_atomic`` needs no temporary file and rename there;
- ``create_new`` (the dump lock, the claim to create a store) is O_CREAT | O_EXCL locally and a conditional
  PUT (``If-None-Match: *``) on S3, which refuses when the object exists;
- there is no fsync: an object is durable once its PUT returns.

S3 settings come from the environment, as for the AWS tools: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``
and, for a server other than AWS (SeaweedFS, MinIO, Ceph), ``AWS_ENDPOINT_URL``.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath


def is_url(value) -> bool:
    return "://" in str(value)


def location(value) -> "Path | RemotePath":
    """``value`` as a ``RemotePath`` if it is a URL, else as a ``Path``."""
    if isinstance(value, (Path, RemotePath)):
        return value
    return RemotePath(str(value)) if is_url(value) else Path(value)


def storage_options(protocol: str) -> dict:
    # No listings cache: done markers and chunks appear from other ranks and processes, and a cached
    # listing would hide them.
    options = {"use_listings_cache": False}
    if protocol in ("s3", "s3a"):
        # s3fs waits 15 s for a response, botocore 60: a server on a busy machine (SeaweedFS beside a
        # training on 2 cores) can take longer than 15 s to answer a PUT, and 5 retries of 15 s failed a dump.
        options["config_kwargs"] = {"read_timeout": 60, "connect_timeout": 20}
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


class RemotePath:
    """A path in an fsspec file system, addressed by URL (``s3://bucket/prefix/logits.zarr``)."""

    def __init__(self, url: str, _fs=None):
        import fsspec

        self.url = url.rstrip("/")
        self.protocol, _, rest = self.url.partition("://")
        self._key = PurePosixPath(rest)
        self.fs = _fs or fsspec.filesystem(self.protocol, **storage_options(self.protocol))

    # --- Path-like -------------------------------------------------------------------------------------
    def __truediv__(self, name: str) -> "RemotePath":
        return RemotePath(f"{self.url}/{name}", self.fs)

    def __str__(self) -> str:
        return self.url

    __repr__ = __str__

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return self._key.name

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(f"{self.protocol}://{self._key.parent}", self.fs)

    @property
    def key(self) -> str:
        """The path without the protocol, as fsspec takes it."""
        return str(self._key)

    def is_file(self) -> bool:
        return self.fs.isfile(self.key)

    def exists(self) -> bool:
        return self.fs.exists(self.key)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.key)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.key)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        self.fs.pipe_file(self.key, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def iterdir(self):
        if not self.fs.isdir(self.key):
            return iter(())
        return (RemotePath(f"{self.protocol}://{key}", self.fs) for key in self.fs.ls(self.key, detail=False))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: a prefix exists once an object is under it."""

    def rglob(self, pattern: str = "*"):
        return (RemotePath(f"{self.protocol}://{key}", self.fs) for key in self.fs.find(self.key))

    def stat_size(self) -> int:
        return self.fs.size(self.key)

    def rmtree(self) -> None:
        if self.fs.exists(self.key):
            self.fs.rm(self.key, recursive=True)


def zarr_store(path, read_only: bool = False):
    """What ``zarr.open_group`` takes for ``path``: its folder name, or an fsspec store for a URL."""
    path = location(path)
    if isinstance(path, Path):
        return str(path)
    import fsspec
    from zarr.storage import FsspecStore

    fs = fsspec.filesystem(path.protocol, asynchronous=True, **storage_options(path.protocol))
    return FsspecStore(fs, path=path.key, read_only=read_only)


def write_atomic(path, data: bytes) -> None:
    """Write ``data`` so that no reader sees half of it: a temporary file and a rename locally, one PUT remotely."""
    path = location(path)
    if isinstance(path, RemotePath):
        path.write_bytes(data)
        return
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def create_new(path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist; False if it does (atomically, both kinds)."""
    path = location(path)
    if isinstance(path, RemotePath):
        try:
            path.fs.pipe_file(path.key, data, IfNoneMatch="*")
        except (OSError, FileExistsError) as error:
            if "pre-condition" in str(error).lower() or "precondition" in str(error).lower() or isinstance(
                    error, FileExistsError):
                return False
            raise
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return True


def age_seconds(path) -> float:
    """Seconds since ``path`` was last written."""
    import time

    path = location(path)
    if isinstance(path, RemotePath):
        modified = path.fs.info(path.key).get("LastModified")
        return time.time() - modified.timestamp() if modified is not None else 0.0
    return time.time() - path.stat().st_mtime
