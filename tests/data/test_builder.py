import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_suti.data.builder import BuildConfig, build_dataset, check_shards
from ray_suti.data.captions import clean_caption
from ray_suti.schemas import ICL_CLUSTER_SCHEMA
from ray_suti.world.crawl import WorldConfig, generate_world

PAGES = 60


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("build")
    world = WorldConfig(out=str(root / "world"), pages=PAGES, image_size=32, pages_per_shard=20, broken_rate=0.1,
                        url_noise_rate=0.6, preview_pages=0)
    generate_world(world, progress=False)
    cfg = BuildConfig(input=str(root / "world" / "web"), output=str(root / "out"))
    stats = build_dataset(cfg)
    clusters = pq.read_table(root / "out" / "clusters")
    truth = pq.read_table(root / "world" / "truth").to_pylist()
    return cfg, stats, clusters, truth


def test_one_cluster_row_per_page_despite_url_noise(built):
    _, stats, clusters, truth = built
    assert clusters.num_rows == len({t["page_index"] for t in truth}) == PAGES
    assert stats["records_in"] == len(truth)
    assert clusters.schema.remove_metadata() == ICL_CLUSTER_SCHEMA


def test_every_broken_record_is_counted_with_its_reason(built):
    _, stats, _, truth = built
    expected = {"truncated": "truncated", "tiny": "too_small", "not_image": "not_image", "empty": "empty",
                "huge": "too_large"}
    want: dict = {}
    for t in truth:
        if t["is_broken"]:
            want[expected[t["broken_reason"]]] = want.get(expected[t["broken_reason"]], 0) + 1
    assert stats["records_skipped"] == want and sum(want.values()) > 5


def test_kept_clusters_respect_sizes_and_carry_embeddings(built):
    cfg, stats, clusters, _ = built
    rows = clusters.to_pylist()
    kept = [r for r in rows if r["kept"]]
    assert stats["clusters_kept"] == len(kept) > 0
    for r in kept:
        assert cfg.min_cluster <= r["n_images"] == len(r["images"]) == len(r["embeddings"]) <= cfg.max_cluster
        assert all(abs(sum(x * x for x in e) - 1) < 1e-3 for e in r["embeddings"])
    for r in rows:
        assert r["kept"] == (r["drop_reason"] == "")
    assert sum(stats["clusters_dropped"].values()) + len(kept) == PAGES


def _write(path, table):
    pq.write_table(table, path)


def test_bad_shards_fail_naming_the_file_or_are_skipped(tmp_path):
    good = pa.table({"key": ["a"], "url": ["u"], "page_url": ["https://x.example/p"], "caption": ["c"],
                     "image": [b"x"], "width": [1], "height": [1]})
    _write(tmp_path / "good.parquet", good)
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ValueError, match="corrupt.parquet"):
        check_shards(str(tmp_path), tolerate=False)
    files, _, skipped = check_shards(str(tmp_path), tolerate=True)
    assert [Path(f).name for f in files] == ["good.parquet"] and [Path(f).name for f in skipped] == ["corrupt.parquet"]
    (tmp_path / "corrupt.parquet").unlink()
    _write(tmp_path / "nocol.parquet", good.drop(["page_url"]))
    with pytest.raises(ValueError, match=r"nocol.parquet.*missing column 'page_url'"):
        check_shards(str(tmp_path), tolerate=False)
    (tmp_path / "nocol.parquet").unlink()
    _write(tmp_path / "types.parquet", good.set_column(4, "image", pa.array(["text, not bytes"])))
    with pytest.raises(ValueError, match=r"types.parquet.*'image' is string"):
        check_shards(str(tmp_path), tolerate=False)
    with pytest.raises(FileNotFoundError):
        check_shards(str(tmp_path / "missing"), tolerate=False)


@pytest.mark.parametrize("alt,clean", [
    ("  a small red toy   on the beach ", "a small red toy on the beach"), ("IMG_4821.JPG", ""), ("DSC00192", ""),
    ("click to enlarge", ""), ("image 3 of 7", ""), ("thumbnail", ""), (None, ""), ("photo", ""),
    ("a photo of a mug in the snow", "a photo of a mug in the snow"),
])
def test_alt_text_is_cleaned(alt, clean):
    assert clean_caption(alt) == clean


def test_stats_file_is_written(built):
    cfg, stats, _, _ = built
    assert json.loads((Path(cfg.output) / "stats.json").read_text()) == json.loads(json.dumps(stats))
    assert (Path(cfg.output) / "clusters.png").stat().st_size > 1000
