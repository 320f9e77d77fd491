import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_suti.data.builder import BuildConfig, build_dataset, check_shards, shuffle_partitions
from ray_suti.data.captions import clean_caption
from ray_suti.schemas import ICL_CLUSTER_SCHEMA
from ray_suti.world.crawl import WorldConfig, generate_world

from ..conftest import model_libraries_loaded_by

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
    cfg, stats, clusters, truth = built
    assert clusters.num_rows == len({t["page_index"] for t in truth}) == PAGES
    assert len(list(Path(cfg.output, "clusters").glob("*.parquet"))) <= PAGES // 20  # a file per shard, not per page
    assert stats["records_in"] == len(truth)
    assert clusters.schema.remove_metadata() == ICL_CLUSTER_SCHEMA


def test_the_page_shuffle_has_a_partition_per_input_shard_and_per_cpu(ray_local):
    assert shuffle_partitions(BuildConfig(), shards=3) == 3
    assert shuffle_partitions(BuildConfig(), shards=1) == 2  # the session's Ray has 2 CPUs
    assert shuffle_partitions(BuildConfig(shuffle_partitions=7), shards=3) == 7


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


def _to_webdataset(parquet_dir: Path, tar_path: Path) -> int:
    """The world's web pairs as one img2dataset webdataset shard: KEY.png, KEY.txt, KEY.json."""
    import io
    import tarfile

    rows = pq.read_table(parquet_dir).to_pylist()
    with tarfile.open(tar_path, "w") as tar:
        for r in rows:
            meta = {"key": r["key"], "url": r["url"], "page_url": r["page_url"], "caption": r["caption"], "status": "success"}
            for ext, data in (("png", r["image"]), ("txt", (r["caption"] or "").encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{r['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return len(rows)


def test_webdataset_tars_build_the_same_clusters_and_a_model_captioner_rewrites_kept_captions(built, tmp_path):
    """One build of the same crawl as tars, with a (tiny) model captioner, output as a URI."""
    from tests.data.test_captions import save_tiny_captioner

    cfg, stats, clusters, _ = built
    (tmp_path / "tars").mkdir()
    _to_webdataset(Path(cfg.input), tmp_path / "tars" / "00000.tar")
    words = save_tiny_captioner(tmp_path / "git")
    tar_cfg = BuildConfig(input=str(tmp_path / "tars"), output=f"file://{tmp_path}/out", captioner=str(tmp_path / "git"))
    tar_stats = build_dataset(tar_cfg)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clusters", "clusters.png", "stats.json"]
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == json.loads(json.dumps(tar_stats))
    assert (tmp_path / "out" / "clusters.png").stat().st_size > 0
    rows = pq.read_table(tmp_path / "out" / "clusters").to_pylist()
    by_id = lambda rs: {r["cluster_id"]: (r["kept"], r["drop_reason"], sorted(r["keys"])) for r in rs}  # noqa: E731
    assert by_id(rows) == by_id(clusters.to_pylist())
    assert tar_stats["records_in"] == stats["records_in"] and tar_stats["records_skipped"] == stats["records_skipped"]
    alt = {r["cluster_id"]: r for r in clusters.to_pylist()}
    assert any(r["kept"] for r in rows)
    for r in rows:  # kept clusters get the captioner's words, one caption per image; the rest keep theirs
        if r["kept"]:
            assert len(r["captions"]) == len(r["images"]) and all(c and set(c.split()) <= words for c in r["captions"])
        else:
            assert r["captions"] == alt[r["cluster_id"]]["captions"]


def test_bad_tar_shards_fail_naming_the_file(tmp_path):
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 40)
    with pytest.raises(ValueError, match="broken.tar"):
        check_shards(str(tmp_path), tolerate=False)
    import io
    import tarfile

    (tmp_path / "broken.tar").unlink()
    with tarfile.open(tmp_path / "nojson.tar", "w") as tar:
        info = tarfile.TarInfo("0001.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ValueError, match=r"nojson.tar.*no .json"):
        check_shards(str(tmp_path), tolerate=False)
    with pytest.raises(ValueError, match="no readable web-pairs shards"):  # skipped, and nothing left
        check_shards(str(tmp_path), tolerate=True)


def test_the_builders_tasks_import_no_torch():
    # Ray Data's read, validate and cluster tasks unpickle functions of builder.py: importing it
    # must not pull in torch (seconds of CPU in each task process); only the embedding actors need it
    assert model_libraries_loaded_by("import ray_suti.data.builder") == []


def test_unknown_captioner_fails_before_any_work(built, tmp_path):
    cfg = built[0]
    with pytest.raises(ValueError, match="--captioner"):
        build_dataset(BuildConfig(input=cfg.input, output=str(tmp_path / "o"), captioner="blip-somewhere"))
