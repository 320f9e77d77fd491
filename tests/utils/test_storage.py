"""utils.storage with file:// URIs, which take the same pyarrow calls as s3:// or gs://."""
import os

import pytest

from ray_suti.utils import storage


def test_reads_and_writes_through_uris(tmp_path):
    uri = (tmp_path / "a" / "b").as_uri()
    storage.write_bytes(storage.join(uri, "x.json"), b"{}")
    assert (tmp_path / "a" / "b" / "x.json").read_bytes() == b"{}"
    assert storage.is_file(storage.join(uri, "x.json")) and storage.is_dir(uri) and not storage.exists(uri + "/nope")
    assert storage.read_bytes(storage.join(uri, "x.json")) == b"{}"
    assert [p.rsplit("/", 1)[-1] for p in storage.list_files(uri, ".json")[1]] == ["x.json"]
    assert not [n for n in os.listdir(tmp_path / "a" / "b") if n.startswith(".")]  # no temporary left behind
    storage.delete_dir(uri)
    assert not (tmp_path / "a" / "b").exists()


def test_local_copy_fetches_once_and_again_when_the_object_changes(tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes(b"v1")
    cache = str(tmp_path / "cache")
    assert storage.local_copy(str(src), cache) == str(src)  # local paths are used in place
    first = storage.local_copy(src.as_uri(), cache)
    assert first.startswith(cache) and open(first, "rb").read() == b"v1"
    assert storage.local_copy(src.as_uri(), cache) == first
    src.write_bytes(b"v2, longer")
    second = storage.local_copy(src.as_uri(), cache)
    assert second != first and open(second, "rb").read() == b"v2, longer"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "suti.json").write_text("{}")
    assert os.listdir(storage.local_copy((tmp_path / "folder").as_uri(), cache)) == ["suti.json"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        storage.local_copy((tmp_path / "nowhere").as_uri(), cache)


def test_staged_output_is_uploaded_only_when_the_block_succeeds(tmp_path):
    with storage.staged((tmp_path / "out").as_uri()) as local:
        os.makedirs(local)
        open(os.path.join(local, "results.json"), "w").write("{}")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "results.json").read_text() == "{}"
    with pytest.raises(RuntimeError):
        with storage.staged((tmp_path / "failed.safetensors").as_uri()) as local:
            open(local, "wb").write(b"half")
            raise RuntimeError("the job failed")
    assert not (tmp_path / "failed.safetensors").exists()
    with storage.staged((tmp_path / "one.safetensors").as_uri()) as local:
        open(local, "wb").write(b"weights")
    assert (tmp_path / "one.safetensors").read_bytes() == b"weights"
