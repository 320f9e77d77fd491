"""Local paths and pyarrow URIs (s3://, gs://, file://) through one set of calls, for job outputs."""
from __future__ import annotations

import os


def resolve(uri: str):
    """-> (pyarrow filesystem, path inside it). Plain paths are local and made absolute."""
    import pyarrow.fs as pafs

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts]) if "://" in uri else os.path.join(uri, *parts)


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def list_files(uri: str, suffix: str) -> tuple[object, list[str]]:
    """-> (filesystem, sorted paths of the files under ``uri`` ending in ``suffix``)."""
    import pyarrow.fs as pafs

    fs, root = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return fs, sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    fs.delete_dir(path)
