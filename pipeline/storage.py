"""One storage layer: every read of a source goes through here, local paths and URLs alike.

A location is a local path or a URL (``s3://``, ``gs://``, ``hf://``, ``https://``, any protocol fsspec knows).
Local paths take the fast path of the standard library (``pathlib``, ``mmap``), unchanged; URLs go through
fsspec, whose file systems (s3fs, gcsfs, huggingface_hub) are the ones img2dataset, webdataset, datatrove and
NeMo Curator use, so a bucket a user reads with those reads here with the same credentials. Credentials come from
each file system's standard environment and config files (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), plus
the recipe's optional ``storage_options`` (per protocol), which live in this process only: never in the work dir,
a manifest, the report or a log (:func:`redacted`).

Every failure of a remote file system becomes one line naming the URL (:func:`errors`), so a missing bucket, a
refused credential or an unreachable endpoint reads the same whatever library raised it.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any

from saferclip_data.pipeline.errors import UserError

#: per protocol (``s3``, ``gs``, ``hf``, ...), the keyword arguments of its fsspec file system (from the recipe)
_OPTIONS: dict[str, dict[str, Any]] = {}
#: bounded retries for a remote endpoint that does not answer (s3fs's own default retries for minutes)
S3_DEFAULTS = {"config_kwargs": {"retries": {"max_attempts": 3, "mode": "standard"}, "connect_timeout": 5,
                                 "read_timeout": 60}}  # fmt: skip
#: environment variables a file system's client reads its endpoint and credentials from
ENV_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS",
                 "HF_TOKEN")  # fmt: skip
_INSTANCES: dict[tuple, Any] = {}
#: which extra installs the file system of a protocol
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "hf": "hf"}


def configure(options: Mapping[str, Mapping[str, Any]] | None) -> None:
    """Use these file-system options (protocol -> keyword arguments) in this process; ``None`` keeps the
    current ones. Called wherever a recipe's stages are built: the driver and every worker."""
    if options is None:
        return
    _OPTIONS.clear()
    _OPTIONS.update({protocol: dict(values) for protocol, values in options.items()})


def redacted(options: Mapping[str, Any] | None) -> dict[str, str]:
    """What may be shown of storage options: their protocols and keys, never their values."""
    return {protocol: ", ".join(sorted(values)) for protocol, values in (options or {}).items()}


def is_url(location: str | os.PathLike) -> bool:
    """A URL of a file system other than the local one (``file://`` is local)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def protocol(location: str) -> str:
    return str(location).split("://", 1)[0] if is_url(location) else "file"


def local_path(location: str | os.PathLike) -> Path:
    text = str(location)
    return Path(text.removeprefix("file://"))


def filesystem(url: str):
    """(fsspec file system, path inside it) of a URL, with the recipe's options for its protocol."""
    import fsspec

    proto = protocol(url)
    try:
        cls = fsspec.get_filesystem_class(proto)
    except (ImportError, ValueError) as exc:
        extra = EXTRAS.get(proto)
        hint = f" (pip install 'saferclip-data[{extra}]')" if extra else ""
        raise UserError(f"storage: {url}: no file system for {proto}://{hint}: {exc}") from None
    options = {**(S3_DEFAULTS if proto in ("s3", "s3a") else {}), **_OPTIONS.get(proto, {})}
    # one instance per protocol, options and environment: a changed variable (another endpoint or key) gets a new
    # client, where fsspec's own cache would keep the first
    key = (proto, repr(sorted(options.items())), tuple(os.environ.get(v) for v in ENV_VARIABLES))
    if key not in _INSTANCES:
        _INSTANCES[key] = cls(skip_instance_cache=True, **options)
    return _INSTANCES[key], cls._strip_protocol(url)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a URL or a local path."""
    if is_url(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(local_path(base).joinpath(*parts))


def name(location: str) -> str:
    return PurePosixPath(str(location).rstrip("/")).name if is_url(location) else local_path(location).name


def parent(location: str) -> str:
    if is_url(location):
        head, _, _ = str(location).rstrip("/").rpartition("/")
        return head
    return str(local_path(location).parent)


def _url_of(fs, path: str, like: str) -> str:
    """A path fsspec returned, as a URL of the protocol ``like`` was given in."""
    return fs.unstrip_protocol(path) if hasattr(fs, "unstrip_protocol") else f"{protocol(like)}://{path}"


@contextmanager
def errors(location: str) -> Iterator[None]:
    """Turn a remote file system's failure into one line naming the URL (:class:`UserError`, exit code 2)."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - every library raises its own; the message names what happened
        if not is_url(location):
            raise
        raise UserError(f"storage: {location}: {describe(exc)}") from exc


def describe(exc: BaseException) -> str:
    """A short reason for a storage failure, by kind (the library's own words follow)."""
    kind = type(exc).__name__
    text = " ".join(str(exc).split())[:300] or kind
    if kind in ("NoCredentialsError", "PartialCredentialsError") or "credentials" in text.lower():
        return f"no credentials ({text}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or storage_options"
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"permission denied ({text})"
    if isinstance(exc, FileNotFoundError):
        return f"not found ({text})"
    if kind in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError") or (
        "Could not connect" in text or "Connect timeout" in text
    ):
        return f"cannot reach the endpoint ({text})"
    return f"{kind}: {text}"


def info(location: str) -> dict | None:
    """What the file system knows of a URL (``type``, ``size``, ...), or None where nothing is there; a missing
    bucket, refused credentials or an unreachable endpoint are errors, not "nothing there"."""
    fs, path = filesystem(location)
    try:
        with errors(location):
            return fs.info(path)
    except UserError as exc:
        cause = exc.__cause__
        if isinstance(cause, FileNotFoundError) and "bucket does not exist" not in str(cause).lower():
            return None
        raise


def exists(location: str) -> bool:
    if not is_url(location):
        return local_path(location).exists()
    return info(location) is not None


def is_file(location: str) -> bool:
    if not is_url(location):
        return local_path(location).is_file()
    found = info(location)
    return found is not None and found.get("type") == "file"


def is_dir(location: str) -> bool:
    if not is_url(location):
        return local_path(location).is_dir()
    found = info(location)
    return found is not None and found.get("type") == "directory"


def glob(pattern: str) -> list[str]:
    """Files matching a glob pattern, sorted (URLs keep their protocol)."""
    if not is_url(pattern):
        import glob as globbing

        return sorted(globbing.glob(str(local_path(pattern))))
    fs, path = filesystem(pattern)
    with errors(pattern):
        found = fs.glob(path, detail=True)  # one listing answers type and size: no request per match
    return sorted(_url_of(fs, p, pattern) for p, info in found.items() if info.get("type") == "file")


def list_files(folder: str, pattern: str = "*") -> list[str]:
    """Files directly in ``folder`` whose name matches ``pattern``, sorted."""
    if not is_url(folder):
        return sorted(str(p) for p in local_path(folder).glob(pattern) if p.is_file())
    fs, path = filesystem(folder)
    with errors(folder):
        entries = fs.ls(path, detail=True)
    return sorted(_url_of(fs, e["name"], folder) for e in entries
                  if e["type"] == "file" and fnmatch.fnmatch(PurePosixPath(e["name"]).name, pattern))  # fmt: skip


def existing_files(locations: list[str]) -> list[str]:
    """Those of ``locations`` that are files, in order: a URL's folder is listed once for all its files (a
    brace pattern of 10,000 tars is a few listings, not 10,000 requests)."""
    listed: dict[str, dict[str, dict]] = {}
    kept = []
    for location in locations:
        if not is_url(location):
            if local_path(location).is_file():
                kept.append(location)
        elif name(location) in _files_in(parent(location), listed, missing_ok=True):
            kept.append(location)
    return kept


def _files_in(folder: str, listed: dict[str, dict[str, dict]], missing_ok: bool = False) -> dict[str, dict]:
    """name -> info of the files directly in a URL's folder, listed once per call site (``listed`` caches)."""
    if folder not in listed:
        fs, path = filesystem(folder)
        try:
            with errors(folder):
                entries = fs.ls(path, detail=True)
        except UserError as exc:
            if not (missing_ok and isinstance(exc.__cause__, FileNotFoundError)):
                raise
            entries = []
        listed[folder] = {PurePosixPath(e["name"]).name: e for e in entries if e["type"] == "file"}
    return listed[folder]


def walk_files(folder: str) -> list[str]:
    """Every file below ``folder``, as paths relative to it ('/'-separated), sorted."""
    if not is_url(folder):
        root = local_path(folder)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    fs, path = filesystem(folder)
    with errors(folder):
        found = fs.find(path)
    base = path.rstrip("/") + "/"
    return sorted(p[len(base) :] for p in found if p.startswith(base))


def open_file(location: str, mode: str = "rb") -> IO:
    """A file object (remote: streamed through fsspec's buffered reader)."""
    if not is_url(location):
        return open(local_path(location), mode)  # noqa: SIM115 - the caller closes it
    fs, path = filesystem(location)
    with errors(location):
        return fs.open(path, mode)


def read_bytes(location: str, strict: bool = True) -> bytes:
    """The whole file. ``strict=False``: a remote failure stays the library's exception (an ``OSError`` for a
    missing object), for a caller that rejects one record instead of stopping the build."""
    if not is_url(location):
        return local_path(location).read_bytes()
    fs, path = filesystem(location)
    if not strict:
        return fs.cat_file(path)
    with errors(location):
        return fs.cat_file(path)


def stamp(location: str) -> list:
    """What tells whether a file changed: [size, modification time or version tag]."""
    if not is_url(location):
        st = local_path(location).stat()
        return [st.st_size, st.st_mtime_ns]
    fs, path = filesystem(location)
    with errors(location):
        return _stamp_of(fs.info(path))


def stamps(locations: list[str]) -> dict[str, list]:
    """:func:`stamp` of many files: a URL's folder is listed once for all its files."""
    out: dict[str, list] = {}
    listed: dict[str, dict[str, dict]] = {}
    for location in locations:
        if not is_url(location):
            out[location] = stamp(location)
            continue
        info = _files_in(parent(location), listed).get(name(location))
        if info is None:
            raise UserError(f"storage: {location}: not found")
        out[location] = _stamp_of(info)
    return out


def _stamp_of(info: dict) -> list:
    tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
    return [int(info.get("size") or 0), str(tag)]


class RemoteNpy:
    """Rows of a .npy file at a URL, read by byte range (the header once, then the span of the rows asked):
    what ``np.load(mmap_mode="r")`` gives for a local file, without copying a gigabyte file to read a shard."""

    def __init__(self, location: str):
        import numpy as np

        self.location = location
        with open_file(location) as file, errors(location):
            major, _ = np.lib.format.read_magic(file)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(file)
            self.offset = file.tell()
        if fortran or len(shape) != 2:
            raise UserError(f"storage: {location}: expected a C-ordered 2-d array, got shape {shape}")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        import numpy as np

        rows = np.arange(self.shape[0])[rows] if not isinstance(rows, np.ndarray) else rows
        if not len(rows):
            return np.zeros((0, self.shape[1]), self.dtype)
        first, last = int(rows.min()), int(rows.max()) + 1
        width = self.shape[1] * self.dtype.itemsize
        fs, path = filesystem(self.location)
        with errors(self.location):
            data = fs.cat_file(path, start=self.offset + first * width, end=self.offset + last * width)
        block = np.frombuffer(data, self.dtype).reshape(last - first, self.shape[1])
        return block[rows - first]


def npy_rows(location: str):
    """A 2-d .npy file's rows, indexable without reading it whole: a memory map, or :class:`RemoteNpy`."""
    import numpy as np

    if not is_url(location):
        return np.load(local_path(location), mmap_mode="r")
    return RemoteNpy(location)


def scratch_root() -> Path:
    """Where remote files that must be local (memory-mapped, or read by a library that takes a path) are
    copied: $SAFERCLIP_SCRATCH, else the system temp dir."""
    return Path(os.environ.get("SAFERCLIP_SCRATCH") or tempfile.gettempdir()) / "saferclip-scratch"


@contextmanager
def local_copy(location: str) -> Iterator[Path]:
    """A local path of the file: itself when local, else a copy in the scratch dir, removed afterwards."""
    if not is_url(location):
        yield local_path(location)
        return
    scratch_root().mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=scratch_root()))
    try:
        target = folder / name(location)
        fs, path = filesystem(location)
        with errors(location):
            fs.get_file(path, str(target))
        yield target
    finally:
        shutil.rmtree(folder, ignore_errors=True)

