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
import json
import os
import shutil
import tempfile
import time
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
    """A local path for ``uri``: itself when local, else a cached download (file or folder). A
    published folder (``MANIFEST.json``) is fetched by its manifest and cached by its content id, so a
    model replaced at the same URI is fetched again, and a half-written one is never loaded."""
    import pyarrow.fs as pafs

    if not is_uri(uri):
        if os.path.isdir(uri):
            published_manifest(uri)  # waits for a folder still being written
        return uri
    cache = cache or os.environ.get("RAY_SUTI_CACHE", os.path.expanduser("~/.cache/ray_suti"))
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} not found")
    for _ in range(3):  # a new publish may start while we copy: then start again
        manifest = published_manifest(uri) if info.type == pafs.FileType.Directory else None
        # a published folder by its content; anything else by its size and time
        version = manifest["content_id"] if manifest else f"{info.size}|{info.mtime_ns}"
        local = os.path.join(cache, hashlib.sha256(f"{uri}|{version}".encode()).hexdigest()[:16],
                             os.path.basename(path.rstrip("/")))
        if os.path.exists(local):
            return local
        os.makedirs(cache, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".fetch-", dir=cache)
        dest = os.path.join(tmp, os.path.basename(local))
        try:
            if manifest:
                for name, entry in manifest["files"].items():
                    os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
                    pafs.copy_files(f"{path.rstrip('/')}/{name}", os.path.join(dest, name), source_filesystem=fs,
                                    destination_filesystem=pafs.LocalFileSystem())
                    if os.path.getsize(os.path.join(dest, name)) != entry["size"]:
                        raise _Republished()
                if published_manifest(uri, wait_s=0) != manifest:
                    raise _Republished()
                write_manifest(dest, manifest)
            else:
                if info.type == pafs.FileType.Directory:
                    os.makedirs(dest)  # copy_files fills a folder, it does not make one
                pafs.copy_files(path, dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            os.makedirs(os.path.dirname(local), exist_ok=True)
            try:
                os.replace(dest, local)  # another process may have fetched it meanwhile: same bytes
            except OSError:
                pass
            return local
        except (_Republished, FileNotFoundError):
            continue
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise RuntimeError(f"{uri} kept changing while it was fetched; try again once its upload has finished")


class _Republished(Exception):
    """The folder being fetched was replaced meanwhile."""


MANIFEST = "MANIFEST.json"


def folder_manifest(folder: str) -> dict:
    """Every file of a local folder with its size and SHA-256; the content id hashes that list."""
    files = {}
    for d, _, names in os.walk(folder):
        for n in names:
            full = os.path.join(d, n)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            if rel == MANIFEST or n.startswith("."):
                continue
            digest = hashlib.sha256()
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            files[rel] = {"size": os.path.getsize(full), "sha256": digest.hexdigest()}
    listing = json.dumps(sorted((k, v["sha256"]) for k, v in files.items())).encode()
    return {"content_id": hashlib.sha256(listing).hexdigest()[:16], "files": dict(sorted(files.items()))}


def write_manifest(uri: str, manifest: dict) -> None:
    write_bytes(join(uri, MANIFEST), json.dumps(manifest, indent=1).encode())


def published_manifest(uri: str, wait_s: float | None = None) -> dict | None:
    """The manifest of a folder, waiting up to ``wait_s`` (env RAY_SUTI_MANIFEST_WAIT_S, 120 s) when
    it is a SuTI folder still being written; None for a folder another tool wrote (no manifest and
    no SuTI ``model_index.json``), which is read as it is."""
    wait_s = float(os.environ.get("RAY_SUTI_MANIFEST_WAIT_S", 120)) if wait_s is None else wait_s
    deadline = time.time() + wait_s
    while True:
        try:
            return json.loads(read_bytes(join(uri, MANIFEST)))
        except (FileNotFoundError, OSError, json.JSONDecodeError):
            pass
        try:
            ours = json.loads(read_bytes(join(uri, "model_index.json"))).get("_class_name") == "SuTIPipeline"
        except (FileNotFoundError, OSError, json.JSONDecodeError):
            ours = False
        if not ours and wait_s:
            return None
        if time.time() >= deadline:
            if not wait_s:
                return None
            raise FileNotFoundError(f"{uri} has no {MANIFEST} after {wait_s:g} s: it is still being written (or "
                                    "its upload failed); a SuTI folder is complete once save_pretrained wrote it")
        time.sleep(1.0)


@contextlib.contextmanager
def staged(uri: str, publish: bool = False):
    """Yields a local path to write ``uri``'s content to (a file or a folder); a remote ``uri`` is
    uploaded when the block ends without an error, so a failed job leaves nothing half-written.
    ``publish`` (model folders): any old ``MANIFEST.json`` is removed first and a new one written
    last, so readers (``local_copy``) wait for a folder being written and see when it is replaced."""
    import pyarrow.fs as pafs

    if publish and exists(join(uri, MANIFEST)):
        fs, path = resolve(join(uri, MANIFEST))
        fs.delete_file(path)
    if not is_uri(uri):
        os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        yield uri
        if publish:
            write_manifest(uri, folder_manifest(uri))
        return
    with tempfile.TemporaryDirectory(prefix="ray-suti-stage-") as tmp:
        local = os.path.join(tmp, os.path.basename(uri.rstrip("/")) or "out")
        yield local
        fs, path = resolve(uri)
        if os.path.isdir(local):
            fs.create_dir(path, recursive=True)
        else:
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        manifest = folder_manifest(local) if publish else None
        pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        if manifest:
            write_manifest(uri, manifest)


def content_id(checkpoint: str) -> str:
    """A short hash of a model's bytes: a published folder's manifest id, else a hash of the file
    (or of every file of a folder with its relative path); a preset's name stands for itself."""
    path = local_copy(checkpoint) if is_uri(checkpoint) else checkpoint
    if not os.path.exists(path):
        return checkpoint
    if os.path.isdir(path):
        manifest = published_manifest(path, wait_s=0)
        return (manifest or folder_manifest(path))["content_id"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]
