"""A work dir in a bucket: the bucket holds the truth, each process works in a local mirror of it.

Stages read and write the work dir as files (memory-mapped pools, faiss indexes, tars written by webdataset),
and an object store has no rename, no append and no mmap. So a work dir at a URL is mirrored under the node's
scratch dir: every file is written there under a temp name and renamed, as in a local work dir, and then
*published* (uploaded under its final key). A shard's data objects are published before its marker, so the
marker's PUT is the commit and needs no rename: readers trust marked shards only, and a data object left without
its marker by a killed run is overwritten when the shard runs again. A process *fetches* an object into its
mirror the first time it reads it, so a node reads what its tasks need, not the whole work dir.

The mirror is a cache of one command's run (see :func:`register`): deleting it loses nothing.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from saferclip_data.pipeline import storage

#: local mirror root -> the work dir's URL, for the work dirs this process opened
_MIRRORS: dict[Path, str] = {}
#: the command's mirror session and the process that owns (and removes) its mirrors; inherited by its workers
SESSION_VARIABLE = "SAFERCLIP_MIRROR_SESSION"
OWNER_VARIABLE = "SAFERCLIP_MIRROR_OWNER"
#: file -> its modification time when this process uploaded it (a folder's later upload skips it)
_PUBLISHED: dict[Path, int] = {}
#: in a mirror's root: the URL it mirrors (never uploaded)
URL_FILE = ".mirror-of"


def mirrors() -> dict[Path, str]:
    """The mirrors this process opened: root -> URL."""
    return dict(_MIRRORS)


def session_variables() -> dict[str, str]:
    """The variables that make another process (a Ray worker on any node) share this command's mirror session."""
    return {name: os.environ[name] for name in (SESSION_VARIABLE, OWNER_VARIABLE) if name in os.environ}


def register(url: str) -> Path:
    """The local mirror of the work dir at ``url``: ``<scratch>/workdirs/<hash of the URL>-<session>``. The
    session is the command's: its worker processes on the same node inherit it (and share the mirror), and the
    command removes it when it exits, so no mirror outlives the run that filled it or serves a later one."""
    url = url.rstrip("/")
    session = os.environ.get(SESSION_VARIABLE)
    if session is None:
        session = os.environ[SESSION_VARIABLE] = uuid.uuid4().hex[:12]
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    root = storage.scratch_root() / "workdirs" / f"{digest}-{session}"
    if root not in _MIRRORS:
        root.mkdir(parents=True, exist_ok=True)
        (root / URL_FILE).write_text(url)  # for the other processes of the node that write in it (see remote_of)
        _MIRRORS[root] = url
        me = f"{socket.gethostname()}:{os.getpid()}"
        if os.environ.setdefault(OWNER_VARIABLE, me) == me:
            atexit.register(shutil.rmtree, root, True)
    return root


def lock_folder(url: str) -> Path:
    """Where this machine's builds of the work dir at ``url`` take its lock (one per machine, whatever the run)."""
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return storage.scratch_root() / "workdirs" / f"{digest}-lock"


def remote_of(path: Path) -> str | None:
    """The URL a mirrored file stands for, or None for a file outside every mirror (a local work dir's). A task
    process that was handed paths in another process's mirror (a global stage's tasks on its node) finds the
    mirror's URL in the file :func:`register` left there."""
    for root, url in _MIRRORS.items():
        if path.is_relative_to(root):
            relative = path.relative_to(root).as_posix()
            return url if relative == "." else storage.join(url, relative)
    mirrors = storage.scratch_root() / "workdirs"
    if path.is_relative_to(mirrors) and len(path.relative_to(mirrors).parts) > 1:
        root = mirrors / path.relative_to(mirrors).parts[0]
        if (root / URL_FILE).is_file():
            _MIRRORS[root] = (root / URL_FILE).read_text()
            return remote_of(path)
    return None


def _is_temp(path: Path) -> bool:
    """A file the bucket never holds: a temp name of an atomic write, or the mirror's own note."""
    return path.name == URL_FILE or (path.name.startswith(".") and ".tmp" in path.name)


def publish(path: Path) -> None:
    """Upload a file just written in a mirror under its final name (nothing for a local work dir's file)."""
    remote = remote_of(path)
    if remote is None or _is_temp(path):
        return
    fs, key = storage.filesystem(remote)
    with storage.errors(remote):
        fs.put_file(str(path), key)
    _PUBLISHED[path] = path.stat().st_mtime_ns


def fetch(path: Path) -> bool:
    """Make sure a mirrored file is local, downloading it if absent; False where the bucket has no such object.
    A file outside every mirror is only looked at."""
    if path.is_file():
        return True
    remote = remote_of(path)
    if remote is None:
        return False
    fs, key = storage.filesystem(remote)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with storage.errors(remote):
            try:
                fs.get_file(key, str(tmp))
            except FileNotFoundError:
                return False
        os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def refresh(path: Path) -> bytes | None:
    """The bucket's current bytes of a small file that other processes rewrite (a stage manifest), also kept in
    the mirror; None where there is none. Locally: the file's bytes."""
    remote = remote_of(path)
    if remote is None:
        return path.read_bytes() if path.is_file() else None
    fs, key = storage.filesystem(remote)
    with storage.errors(remote):
        try:
            data = fs.cat_file(key)
        except FileNotFoundError:
            return None
    if not path.is_file() or path.read_bytes() != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return data


def _listing(remote: str) -> dict[str, dict]:
    """Relative path -> info of every object below a URL's folder, in one fresh listing (other nodes write)."""
    fs, prefix = storage.filesystem(remote)
    base = prefix.rstrip("/") + "/"
    with storage.errors(remote):
        fs.invalidate_cache(prefix)
        try:
            found = fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
    return {key[len(base) :]: info for key, info in found.items() if key.startswith(base) and key != base}


def pull(folder: Path, pattern: str = "**") -> int:
    """Fetch every object below a mirrored folder (matching a glob ``pattern``) that the mirror lacks or holds
    at another size, in one listing; returns how many were downloaded."""
    remote = remote_of(folder)
    if remote is None:
        return 0
    fetched = 0
    for relative, info in _listing(remote).items():
        if pattern != "**" and not PurePosixPath(relative).match(pattern):
            continue
        local = folder / relative
        if local.is_file() and local.stat().st_size == info.get("size"):
            continue
        local.unlink(missing_ok=True)
        fetched += fetch(local)
    return fetched


def publish_folder(folder: Path, since: float | None = None) -> int:
    """Upload the files of a mirrored folder that this process did not upload as they are and that the bucket
    lacks, holds at another size, or (``since``: a unix time) that were written since then: what a stage or a
    task wrote outside the atomic writes (spill files, indexes, what another process of the node wrote). One
    listing; returns how many were uploaded."""
    remote = remote_of(folder)
    if remote is None or not folder.is_dir():
        return 0
    sizes = {relative: info.get("size") for relative, info in _listing(remote).items()}
    uploaded = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not _is_temp(p)):
        stat = path.stat()
        if _PUBLISHED.get(path) == stat.st_mtime_ns:
            continue
        changed = since is not None and stat.st_mtime >= since
        if changed or sizes.get(path.relative_to(folder).as_posix()) != stat.st_size:
            publish(path)
            uploaded += 1
    return uploaded


def mirrored_task(fn: Callable[..., Any], mirrors: dict[Path, str]) -> Callable[..., Any]:
    """``fn`` for a task that may run on another node: arguments naming a file or folder in one of the calling
    process's mirrors (``mirrors``: root -> URL) are moved to this node's mirror of the same work dir, which is
    brought up to date from the bucket first, and what the task writes there is published before it returns."""

    def run(*args: Any) -> Any:
        started = time.time()
        moved: list[Path] = []

        def here(arg: Any) -> Any:
            for root, url in mirrors.items():
                text = str(arg) if isinstance(arg, (str, Path)) else None
                if text is not None and (text == str(root) or text.startswith(f"{root}/")):
                    local = register(url)
                    moved.append(local)
                    new = str(local) + text[len(str(root)) :]
                    return Path(new) if isinstance(arg, Path) else new
            return arg

        args = tuple(here(a) for a in args)
        for local in set(moved):
            pull(local)
        result = fn(*args)
        for local in set(moved):
            publish_folder(local, since=started)
        return result

    return run


def remove(folder: Path) -> None:
    """Delete a mirrored folder's objects from the bucket (a stage reset)."""
    remote = remote_of(folder)
    if remote is not None:
        remove_folder(remote)


def exists(folder: Path) -> bool:
    """Whether a mirrored folder has objects in the bucket (locally: whether the folder exists)."""
    remote = remote_of(folder)
    if remote is None:
        return folder.exists()
    fs, prefix = storage.filesystem(remote)
    with storage.errors(remote):
        fs.invalidate_cache(prefix)
        return bool(fs.find(prefix, maxdepth=None))


def copy_folder(location: str, dest: Path) -> Path:
    """Every file below a URL's folder copied under ``dest`` (made afresh), for tools that read a work dir as
    files (the benchmarks comparing builds); a local folder is returned as it is."""
    if not storage.is_url(location):
        return storage.local_path(location)
    shutil.rmtree(dest, ignore_errors=True)
    for relative in storage.walk_files(location):
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        fs, path = storage.filesystem(storage.join(location, relative))
        with storage.errors(location):
            fs.get_file(path, str(target))
    return dest


def remove_folder(location: str) -> None:
    """A folder and all below it, local or at a URL (nothing when absent)."""
    if not storage.is_url(location):
        shutil.rmtree(storage.local_path(location), ignore_errors=True)
        return
    fs, path = storage.filesystem(location)
    with storage.errors(location):
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.invalidate_cache(path)


def modified_times(folder: str, name: str) -> dict[str, float]:
    """Relative path -> modification time (unix seconds) of the files called ``name`` below ``folder``."""
    if not storage.is_url(folder):
        root = storage.local_path(folder)
        return {p.relative_to(root).as_posix(): p.stat().st_mtime for p in root.rglob(name)}
    times = {}
    for relative, info in _listing(folder).items():
        if PurePosixPath(relative).name == name:
            stamp = info.get("LastModified") or info.get("mtime") or 0
            times[relative] = stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)
    return times
