"""train-clip runs as a Ray Train job on page pairs and its weights plug into the builder."""
import pytest
from safetensors.torch import load_file

from ray_suti.data.builder import BuildConfig, build_dataset
from ray_suti.data.clip import load_clip
from ray_suti.data.train_clip import ClipTrainConfig, train_clip
from ray_suti.world.crawl import WorldConfig, generate_world

pytestmark = pytest.mark.slow


def test_train_clip_writes_weights_the_builder_loads(tmp_path, ray_local):
    generate_world(WorldConfig(out=str(tmp_path / "world"), pages=30, image_size=32, pages_per_shard=15,
                               preview_pages=0), progress=False)
    out = tmp_path / "clip.safetensors"
    metrics = train_clip(ClipTrainConfig(input=str(tmp_path / "world" / "web"), output=str(out), steps=4,
                                         batch_size=16, storage_path=str(tmp_path / "runs")))
    assert metrics["step"] == 4
    trained, untrained = load_file(str(out)), load_clip("tiny")[0].state_dict()
    assert any((trained[k] - untrained[k]).abs().max() > 0 for k in untrained if k in trained)
    stats = build_dataset(BuildConfig(input=str(tmp_path / "world" / "web"), output=str(tmp_path / "out"),
                                      clip_pretrained=str(out)))
    assert stats["records_in"] > 0
