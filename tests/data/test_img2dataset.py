"""A real img2dataset crawl of a local HTTP server -> the dataset builder, both output formats.

img2dataset (a dev dependency) downloads a url list (url, caption, page_url) from a server on
127.0.0.1 that holds a few world pages' photos, URLs that 404, one that serves garbage and one 4x4
image. Its output goes straight into the builder: ``output_format="parquet"`` (the bytes in a ``jpg``
column) and ``"webdataset"`` (``.tar`` shards + metadata Parquet beside them, here with PNG). The
first shard (10 URLs) fails whole: its tar is empty, its metadata still counts the failures.
"""
import functools
import io
import json
import os
import signal
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_suti.data.builder import (BuildConfig, build_dataset, check_shards, img2dataset_to_pairs, parquet_plan,
                                   read_web_pairs, validate_records, webdataset_to_pairs)
from ray_suti.data.urls import normalize_page_url
from ray_suti.world.crawl import WorldConfig, generate_page

PAGES = 3
SHARD = 10  # img2dataset's number_sample_per_shard
FAILURES = {"status:failed_to_download": SHARD - 1, "status:failed_to_resize": 1, "too_small": 1}
FAILING = [f"missing-{i}.jpg" for i in range(SHARD - 1)] + ["garbage.jpg"]  # the first shard: none succeeds
FORMATS = {"parquet": "jpg", "webdataset": "png"}  # output_format -> encode_format
QUALITY = {"jpg": 95, "png": 6}  # img2dataset's encode_quality: JPEG quality, PNG compression level


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _download(url_list: Path, out: Path, output_format: str, encode_format: str) -> None:
    import img2dataset

    handler = signal.getsignal(signal.SIGINT)  # img2dataset installs its own; pytest's comes back after
    try:
        img2dataset.download(url_list=str(url_list), input_format="parquet", output_folder=str(out),
                             output_format=output_format, encode_format=encode_format,
                             encode_quality=QUALITY[encode_format], url_col="url",
                             caption_col="caption", save_additional_columns=["page_url"], processes_count=1,
                             thread_count=4, resize_mode="no", number_sample_per_shard=SHARD, timeout=30, retries=0,
                             enable_wandb=False)
    finally:
        signal.signal(signal.SIGINT, handler)


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else albumentations asks PyPI on import
    import img2dataset  # noqa: F401  (a dev dependency: pip install -e '.[dev]')
    root = tmp_path_factory.mktemp("img2dataset")
    cfg = WorldConfig(out=str(root / "world"), image_size=32, junk_rate=0.0, dup_rate=0.0, broken_rate=0.0,
                      url_noise_rate=0.5)
    world = [web for p in range(PAGES) for web, _ in generate_page(cfg, p)]
    site = root / "site" / "img"
    site.mkdir(parents=True)
    for w in world:
        (site / f"{w['key']}.png").write_bytes(w["image"])
    (site / "garbage.jpg").write_bytes(b"<html>not an image</html>" * 20)
    tiny = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(tiny, format="PNG")
    (site / "tiny.png").write_bytes(tiny.getvalue())
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root / "site")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}/img"
        bad = lambda name: {"url": f"{base}/{name}", "caption": f"bad {name}", "page_url": world[0]["page_url"]}  # noqa: E731
        rows = [bad(name) for name in FAILING]
        rows += [{"url": f"{base}/{w['key']}.png", "caption": w["caption"], "page_url": w["page_url"]} for w in world]
        rows.append(bad("tiny.png"))
        pq.write_table(pa.Table.from_pylist(rows), root / "urls.parquet")
        outs = {}
        for fmt, enc in FORMATS.items():
            outs[fmt] = root / fmt
            _download(root / "urls.parquet", outs[fmt], fmt, enc)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    return {"world": {f"{base}/{w['key']}.png": w for w in world}, "rows": rows, "outs": outs, "base": base}


def _key_to_url(out: Path) -> dict:
    tables = [pq.read_table(f, columns=["key", "url"]) for f in sorted(out.glob("*.parquet"))]
    return dict(zip(*pa.concat_tables(tables).to_pydict().values()))


@pytest.fixture(scope="module")
def pairs(crawl, ray_local):
    """Both crawls as the builder reads and validates them, in one Ray Data run (each costs seconds)."""
    parts, shards = [], {}
    for fmt, out in crawl["outs"].items():
        files, fs, skipped = check_shards(str(out), tolerate=False)
        assert not skipped
        shards[fmt] = files
        tag = lambda t, fmt=fmt: t.append_column("crawl", pa.array([fmt] * t.num_rows, pa.string()))  # noqa: E731
        parts.append(read_web_pairs(files, fs).map_batches(tag, batch_format="pyarrow"))
    df = parts[0].union(*parts[1:]).map_batches(validate_records, fn_kwargs={"min_side": 16},
                                                 batch_format="pandas").to_pandas()
    return {fmt: (shards[fmt], df[df["crawl"] == fmt]) for fmt in FORMATS}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_img2dataset_output_reads_as_web_pairs(crawl, pairs, fmt):
    files, df = pairs[fmt]
    out = crawl["outs"][fmt]
    shards = sorted(out.glob("*.parquet"))
    assert len(shards) == -(-len(crawl["rows"]) // SHARD) > 2
    read = shards + sorted(out.glob("*.tar"))[1:]  # the first shard's tar is empty: its metadata is enough
    assert sorted(files) == sorted(str(f) for f in read)
    assert len(df) == len(crawl["rows"]) and df["key"].is_unique  # every url once: successes not counted twice
    urls = _key_to_url(out)
    good = df[df["reason"] == ""]
    assert sorted(urls[k] for k in good["key"]) == sorted(crawl["world"])
    for r in good.itertuples():
        w = crawl["world"][urls[r.key]]
        assert r.caption == w["caption"] and r.page_url == w["page_url"]
        assert r.page_key == normalize_page_url(w["page_url"])
        img = Image.open(io.BytesIO(r.image))
        assert img.size == (32, 32) and img.format == {"jpg": "JPEG", "png": "PNG"}[FORMATS[fmt]]
        if fmt == "webdataset":  # PNG re-encoding is lossless: the world's own pixels
            original = Image.open(io.BytesIO(w["image"]))
            assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(original.convert("RGB")))
    bad = df[df["reason"] != ""]
    assert dict(Counter(bad["reason"])) == FAILURES
    assert sorted(urls[k].rsplit("/", 1)[1] for k in bad["key"]) == sorted([*FAILING, "tiny.png"])
    assert all(len(b) == 0 for b in bad["image"])
    assert set(bad["page_key"]) == {normalize_page_url(crawl["rows"][0]["page_url"])}


def test_build_dataset_runs_on_an_img2dataset_crawl(crawl, ray_local, tmp_path):
    stats = build_dataset(BuildConfig(input=str(crawl["outs"]["parquet"]), output=str(tmp_path / "out")))
    assert stats["records_in"] == len(crawl["rows"]) and stats["records_skipped"] == FAILURES
    clusters = pq.read_table(tmp_path / "out" / "clusters").to_pylist()
    pages = {normalize_page_url(w["page_url"]) for w in crawl["world"].values()}
    assert {c["page_url"] for c in clusters} == pages and len(pages) == PAGES
    assert stats["clusters_kept"] > 0
    urls = _key_to_url(crawl["outs"]["parquet"])
    for c in clusters:
        assert all(normalize_page_url(crawl["world"][urls[k]]["page_url"]) == c["page_url"] for k in c["keys"])
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["records_skipped"] == FAILURES


def test_png_or_webp_columns_and_a_crawl_without_page_urls(crawl):
    """The bytes column is named after img2dataset's encode_format; without save_additional_columns
    there is no page_url, and images are grouped by their URL's folder."""
    shard = pa.concat_tables(pq.read_table(f) for f in sorted(crawl["outs"]["parquet"].glob("*.parquet")))
    renamed = shard.rename_columns(["webp" if c == "jpg" else c for c in shard.column_names]).drop(["page_url"])
    plan = parquet_plan(renamed.schema, has_tar=False)
    assert plan.kind == "img2dataset" and plan.image_column == "webp" and "page_url" not in plan.columns
    pairs = img2dataset_to_pairs(renamed.select(list(plan.columns)), plan.image_column)
    assert pairs.num_rows == shard.num_rows and set(pairs.column("page_url").to_pylist()) == {crawl["base"]}
    ok = [s == "success" for s in shard.column("status").to_pylist()]
    assert 0 < sum(ok) < len(ok)
    assert [bool(b) for b in pairs.column("image").to_pylist()] == ok
    assert [r == "" for r in pairs.column("reason").to_pylist()] == ok
    sample = {"__key__": "k", "png": b"\x89PNG...", "json": json.dumps({"url": f"{crawl['base']}/a.png"})}
    assert webdataset_to_pairs(pa.Table.from_pylist([sample])).column("page_url").to_pylist() == [crawl["base"]]


def test_metadata_without_its_tar_is_refused_naming_the_file(crawl, tmp_path):
    meta = sorted(crawl["outs"]["webdataset"].glob("*.parquet"))[1]
    (tmp_path / meta.name).write_bytes(meta.read_bytes())
    with pytest.raises(ValueError, match=rf"{meta.name}.*no jpg/png/webp column and no .tar"):
        check_shards(str(tmp_path), tolerate=False)
    with pytest.raises(ValueError, match="no readable web-pairs shards"):
        check_shards(str(tmp_path), tolerate=True)
