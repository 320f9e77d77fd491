"""Models are published and picked up safely: a manifest written last, readers that wait for it, and a
model replaced at the same URI fetched again (by content id, not size or time)."""
import json
import shutil
import threading
import time

import pytest
import torch

from ray_suti.model import SuTIPipeline
from ray_suti.utils import storage


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_SUTI_CACHE", str(tmp_path / "cache"))


def weights(pipe) -> torch.Tensor:
    return next(pipe.unet.parameters()).detach().flatten()[:64].clone()


def test_a_saved_folder_lists_every_file_in_a_manifest_written_last(tmp_path):
    uri = (tmp_path / "models" / "a").as_uri()
    SuTIPipeline.from_preset("tiny-32", seed=0).save_pretrained(uri)
    folder = tmp_path / "models" / "a"
    manifest = json.loads((folder / storage.MANIFEST).read_text())
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != storage.MANIFEST)
    assert sorted(manifest["files"]) == files and "model_index.json" in files
    assert all(manifest["files"][f]["size"] == (folder / f).stat().st_size for f in files)
    assert (folder / storage.MANIFEST).stat().st_mtime_ns >= max((folder / f).stat().st_mtime_ns for f in files)
    assert storage.content_id(uri) == manifest["content_id"] == storage.content_id(str(folder))


def test_a_reader_waits_for_a_folder_still_being_uploaded(tmp_path, monkeypatch):
    done = tmp_path / "done"
    SuTIPipeline.from_preset("tiny-32", seed=0).save_pretrained(str(done))
    uploading = tmp_path / "uploading"
    shutil.copytree(done, uploading, ignore=shutil.ignore_patterns(storage.MANIFEST))  # every file but the last
    monkeypatch.setenv("RAY_SUTI_MANIFEST_WAIT_S", "1")
    with pytest.raises(FileNotFoundError, match="still being written"):
        SuTIPipeline.from_pretrained(uploading.as_uri())
    with pytest.raises(FileNotFoundError, match="still being written"):
        SuTIPipeline.from_pretrained(str(uploading))  # a local folder too

    monkeypatch.setenv("RAY_SUTI_MANIFEST_WAIT_S", "60")
    finish = threading.Timer(2.0, lambda: shutil.copy(done / storage.MANIFEST, uploading / storage.MANIFEST))
    finish.start()
    t0 = time.time()
    pipe = SuTIPipeline.from_pretrained(uploading.as_uri())
    assert time.time() - t0 >= 1.5 and torch.equal(weights(pipe), weights(SuTIPipeline.from_pretrained(str(done))))


def test_a_model_replaced_at_the_same_uri_is_fetched_again(tmp_path):
    uri = (tmp_path / "models" / "latest").as_uri()
    first, second = SuTIPipeline.from_preset("tiny-32", seed=0), SuTIPipeline.from_preset("tiny-32", seed=1)
    first.save_pretrained(uri)
    id_first, local_first = storage.content_id(uri), storage.local_copy(uri)
    assert torch.equal(weights(SuTIPipeline.from_pretrained(uri)), weights(first))
    second.save_pretrained(uri)  # the same files, the same sizes, other bytes
    assert storage.content_id(uri) != id_first and storage.local_copy(uri) != local_first
    assert torch.equal(weights(SuTIPipeline.from_pretrained(uri)), weights(second))


def test_folders_other_tools_wrote_load_as_they_are(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert storage.published_manifest(str(folder)) is None  # no waiting: not a SuTI folder
    assert storage.local_copy(folder.as_uri()).endswith("plain")
