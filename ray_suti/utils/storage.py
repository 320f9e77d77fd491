"""Local paths and pyarrow URIs (s3://, gs://, file://) through one set of calls.

Every job input and output goes through here, so a cluster without a shared file system works with
object storage alone. Writes are whole-or-nothing: a local file is written aside and renamed into
place; an object store only shows an object once its upload completes. Models that must be files
(safetensors, from_pretrained folders) are copied to a local cache on read (``local_copy``) and
written to a local staging folder that is uploaded on success (``staged``).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid


def is_uri(path) -> bool:
    return "://" in str(path)


def resolve(uri: str):
    """-> (pyarrow filesystem, path inside it). Plain paths are local and made absolute."""
    import pyarrow.fs as pafs

    if is_uri(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts]) if is_uri(uri) else os.path.join(uri, *parts)


def _info(uri: str):
    fs, path = resolve(uri)
    return fs.get_file_info(path)


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    return _info(uri).type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    import pyarrow.fs as pafs

    return _info(uri).type == pafs.FileType.File


def is_dir(uri: str) -> bool:
    import pyarrow.fs as pafs

    return _info(uri).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Whole or nothing: a reader never sees a partly written file."""
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    folder, name = path.rsplit("/", 1)
    fs.create_dir(folder, recursive=True)
    local = isinstance(fs, pafs.LocalFileSystem)
    target = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp" if local else path  # unique: threads and processes race
    with fs.open_output_stream(target) as f:
        f.write(data)
    if local:
        fs.move(target, path)


def list_files(uri: str, suffix: str) -> tuple[object, list[str]]:
    """-> (filesystem, sorted paths of the files under ``uri`` ending in ``suffix``)."""
    import pyarrow.fs as pafs

    fs, root = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return fs, sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def listdir(uri: str) -> list[str]:
    """Sorted names of the files and folders directly in ``uri`` (join them back onto it)."""
    import pyarrow.fs as pafs

    fs, root = resolve(uri)
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)))


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    fs.delete_dir(path)


def local_copy(uri: str, cache: str = "") -> str:
    """A local path for ``uri``: itself when local, else a cached download (file or folder)."""
    import pyarrow.fs as pafs

    if not is_uri(uri):
        return uri
    cache = cache or os.environ.get("RAY_SUTI_CACHE", os.path.expanduser("~/.cache/ray_suti"))
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} not found")
    # keyed by the URI and the object's size and time, so a replaced checkpoint is fetched again
    key = hashlib.sha256(f"{uri}|{info.size}|{info.mtime_ns}".encode()).hexdigest()[:16]
    local = os.path.join(cache, key, os.path.basename(path.rstrip("/")))
    if not os.path.exists(local):
        os.makedirs(cache, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".fetch-", dir=cache)
        dest = os.path.join(tmp, os.path.basename(local))
        if info.type == pafs.FileType.Directory:
            os.makedirs(dest)  # copy_files fills a folder, it does not make one
        pafs.copy_files(path, dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        os.makedirs(os.path.dirname(local), exist_ok=True)
        try:
            os.replace(dest, local)  # another process may have fetched it meanwhile: same bytes
        except OSError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    return local


@contextlib.contextmanager
def staged(uri: str):
    """Yields a local path to write ``uri``'s content to (a file or a folder); a remote ``uri`` is
    uploaded when the block ends without an error, so a failed job leaves nothing half-written."""
    import pyarrow.fs as pafs

    if not is_uri(uri):
        os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        yield uri
        return
    with tempfile.TemporaryDirectory(prefix="ray-suti-stage-") as tmp:
        local = os.path.join(tmp, os.path.basename(uri.rstrip("/")) or "out")
        yield local
        fs, path = resolve(uri)
        if os.path.isdir(local):
            fs.create_dir(path, recursive=True)
        else:
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def content_id(checkpoint: str) -> str:
    """A short hash of a model's bytes (a file, or every file of a folder with its relative path);
    a preset's name stands for itself. A model replaced at the same URI gets a new id."""
    path = local_copy(checkpoint) if is_uri(checkpoint) else checkpoint
    if not os.path.exists(path):
        return checkpoint
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, names in os.walk(path) for f in names if not f.startswith("."))
    digest = hashlib.sha256()
    for name in files:
        digest.update(os.path.relpath(name, path).encode() + b"\0")
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]
