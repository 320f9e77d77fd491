import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_suti.world import CLASS_WORDS, VOCABULARY, Context, Subject, heldout_seeds, is_heldout, render
from ray_suti.world.crawl import IRRELEVANT_ALT_TEXT, TRUTH_SCHEMA, WEB_SCHEMA, WorldConfig, generate_world
from ray_suti.world.subjects import train_seed

RATES = dict(junk_rate=0.2, dup_rate=0.15, broken_rate=0.1, empty_caption_rate=0.2, irrelevant_caption_rate=0.1)
PAGES = 240


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    cfg = WorldConfig(out=str(tmp_path_factory.mktemp("world")), pages=PAGES, image_size=32,
                      pages_per_shard=60, **RATES)
    generate_world(cfg, progress=False)
    web = pq.read_table(Path(cfg.out) / "web").to_pylist()
    truth = pq.read_table(Path(cfg.out) / "truth").to_pylist()
    return cfg, web, truth


def _decode(data: bytes):
    try:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except Exception:
        return None


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, ray_local):
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        cfg = WorldConfig(out=str(tmp_path / name), pages=24, seed=seed, image_size=32, pages_per_shard=8,
                          preview_pages=0)
        generate_world(cfg, progress=False)
        outs.append({p.relative_to(cfg.out): p.read_bytes() for p in Path(cfg.out).rglob("*.parquet")})
    assert len(outs[0]) == 6  # 3 shards x (web, truth)
    assert outs[0] == outs[1]
    assert all(outs[0][k] != outs[2][k] for k in outs[0])


def test_schema_matches_the_web_pairs_contract(world):
    cfg, web, truth = world
    assert pq.read_schema(next((Path(cfg.out) / "web").glob("*.parquet"))).remove_metadata() == WEB_SCHEMA
    assert pq.read_schema(next((Path(cfg.out) / "truth").glob("*.parquet"))).remove_metadata() == TRUTH_SCHEMA
    assert [w["key"] for w in web] == [t["key"] for t in truth]
    assert len({w["key"] for w in web}) == len(web)
    stats = json.loads((Path(cfg.out) / "world.json").read_text())["stats"]
    assert stats["pages"] == PAGES and stats["records"] == len(web)
    assert (Path(cfg.out) / "preview.png").stat().st_size > 1000


def _within(observed: int, n: int, p: float) -> bool:
    return abs(observed / n - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9


def test_configured_rates_of_junk_dup_and_broken(world):
    cfg, web, truth = world
    kinds = {t["page_index"]: t["page_kind"] for t in truth}
    assert len(kinds) == PAGES
    assert _within(sum(k == "junk" for k in kinds.values()), PAGES, cfg.junk_rate)
    assert _within(sum(k == "dup" for k in kinds.values()), PAGES, cfg.dup_rate)
    assert _within(sum(t["is_broken"] for t in truth), len(truth), cfg.broken_rate)
    assert _within(sum(w["caption"] == "" for w in web), len(web), cfg.empty_caption_rate)
    reasons = {t["broken_reason"] for t in truth if t["is_broken"]}
    assert {"truncated", "tiny", "not_image", "empty"} <= reasons


def test_broken_records_are_really_broken_and_the_rest_decode(world):
    cfg, web, truth = world
    for w, t in zip(web, truth):
        img = _decode(w["image"])
        ok = img is not None and img.shape[:2] == (cfg.image_size, cfg.image_size)
        assert ok != t["is_broken"], (t["key"], t["broken_reason"])


def test_captions_never_carry_subject_identity(world):
    _, web, truth = world
    allowed = VOCABULARY | set(CLASS_WORDS)
    for w, t in zip(web, truth):
        if w["caption"] and w["caption"] not in IRRELEVANT_ALT_TEXT:
            assert w["caption"] == t["prompt"]
            assert set(w["caption"].replace(",", "").split()) <= allowed, w["caption"]
    # two different subjects of one class in one context get the very same words
    a, b = [s for s in range(1, 200) if Subject.from_seed(s).class_word == "mug"][:2]
    ctx = Context(scene="beach", colour="red", accessory="hat", rotation=180)
    assert ctx.prompt(Subject.from_seed(a).class_word) == ctx.prompt(Subject.from_seed(b).class_word)


def test_render_reproduces_crawl_images(world):
    cfg, web, truth = world
    checked = 0
    for w, t in zip(web, truth):
        if t["is_broken"] or t["is_dup"] or t["subject_seed"] < 0:
            continue
        image, mask = render(t["subject_seed"], Context.from_json(t["context"]), cfg.image_size)
        np.testing.assert_array_equal(_decode(w["image"]), image)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(t["mask"]))) > 0, mask)
        checked += 1
    assert checked > 200


def test_near_duplicates_are_close_copies(world):
    _, web, truth = world
    by_key = {w["key"]: _decode(w["image"]) for w in web}
    pages: dict = {}
    for t in truth:
        pages.setdefault(t["page_index"], []).append(t)
    diffs = []
    for rows in pages.values():
        if rows[0]["page_kind"] == "dup" and not rows[0]["is_broken"]:
            first = by_key[rows[0]["key"]].astype(float)
            for r in rows[1:]:
                if not r["is_broken"]:
                    assert r["is_dup"]
                    diffs.append(np.abs(by_key[r["key"]] - first).mean())
    assert diffs and max(diffs) < 40 and np.median(diffs) < 25


def test_train_and_heldout_subjects_are_disjoint(world):
    _, _, truth = world
    assert not any(is_heldout(t["subject_seed"]) for t in truth if t["subject_seed"] >= 0)
    held = heldout_seeds(50)
    assert len(set(held)) == 50 and all(is_heldout(s) for s in held)
    rng = np.random.default_rng(0)
    assert not any(is_heldout(train_seed(rng)) for _ in range(2000))


def test_render_is_consistent_across_sizes_and_views():
    ctx = Context(scene="grass", position="left", size="large")
    big, _ = render(11, ctx, 128)
    small, mask = render(11, ctx, 32)
    pooled = big.reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))
    assert np.abs(pooled - small).mean() < 2.0
    assert 0.1 < mask.mean() < 0.6  # the subject covers a good part of the frame
    mirrored, _ = render(11, Context(mirror=True), 64)
    upright, _ = render(11, Context(), 64)
    np.testing.assert_array_equal(mirrored[:, 16:48], upright[:, 16:48][:, ::-1])  # the centre band mirrors
    assert np.abs(mirrored.astype(int) - upright).mean() > 3  # and is a different picture


def test_subjects_are_distinct():
    imgs = [render(s, Context(), 32)[0].astype(float) for s in range(1, 40)]
    dists = [np.abs(imgs[i] - imgs[j]).mean() for i in range(len(imgs)) for j in range(i)]
    assert min(dists) > 3


def test_bad_context_values_are_rejected():
    with pytest.raises(ValueError, match="unknown context value"):
        Context(scene="moon")
    with pytest.raises(ValueError, match="unknown colour"):
        Context(colour="teal")


def test_catalogue_names_are_new_words_on_their_own_pages(world, tmp_path):
    from ray_suti.world.catalogue import CatalogueConfig, made_up_names, write_catalogue

    names = made_up_names(200)
    assert len(set(names)) == 200 and names == made_up_names(200)
    crawl_words = {w.lower() for row in world[1] for w in row["caption"].split()}
    assert not {n.lower() for n in names} & (crawl_words | set(VOCABULARY))
    entries = write_catalogue(CatalogueConfig(out=str(tmp_path), num_subjects=5, photos_per_page=4, image_size=32))
    rows = pq.read_table(tmp_path / "web" / "catalogue.parquet")
    assert rows.schema == WEB_SCHEMA and rows.num_rows == 20
    for entry in entries:
        assert is_heldout(entry["subject_seed"])
        mine = [r for r in rows.to_pylist() if r["page_url"] == entry["page_url"]]
        assert [r["key"] for r in mine] == entry["keys"]
        assert all(f"{entry['name']} {entry['class_word']}" in r["caption"] for r in mine)
        scenes = {Context.from_json(c).scene for c in entry["contexts"]}
        assert Context.from_json(entry["target"]).scene not in scenes  # a new context: copying never pays
