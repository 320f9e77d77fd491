import pyarrow.parquet as pq

from ray_suti.utils.images import inspect_image
from ray_suti.world.crawl import WorldConfig, write_shard

EXPECTED = {"truncated": "truncated", "tiny": "too_small", "not_image": "not_image", "empty": "empty",
            "huge": "too_large"}


def test_every_broken_record_of_the_world_gets_its_reason(tmp_path):
    cfg = WorldConfig(out=str(tmp_path), pages=40, image_size=32, broken_rate=0.3, pages_per_shard=40)
    for d in ("web", "truth"):
        (tmp_path / d).mkdir()
    write_shard(cfg, 0)
    web = pq.read_table(tmp_path / "web").to_pylist()
    truth = pq.read_table(tmp_path / "truth").to_pylist()
    seen = set()
    for w, t in zip(web, truth):
        img, reason = inspect_image(w["image"])
        if t["is_broken"]:
            assert img is None and reason == EXPECTED[t["broken_reason"]], t["broken_reason"]
            seen.add(reason)
        else:
            assert reason is None and img.size == (32, 32)
    assert seen == set(EXPECTED.values())
