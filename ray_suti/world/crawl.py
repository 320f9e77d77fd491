"""The synthetic web crawl, written in DESIGN.md's web-pairs schema plus a hidden ground truth.

Each page is generated from ``(world seed, page index)`` alone, so output is byte-identical for a
seed whatever the sharding or scheduling. Ray tasks each write one shard (web + truth Parquet) and
return only counts, so the driver's memory does not grow with the number of pages.
"""
from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..utils.images import contact_sheet, encode, encode_png
from .contexts import SCENES, sample_context
from .render import background, render, _downsample, _grid
from .subjects import Subject, train_seed

WEB_SCHEMA = pa.schema([
    ("key", pa.string()), ("url", pa.string()), ("page_url", pa.string()), ("caption", pa.string()),
    ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32()),
])
TRUTH_SCHEMA = pa.schema([
    ("key", pa.string()), ("page_index", pa.int64()), ("page_url", pa.string()),
    ("page_kind", pa.string()), ("subject_seed", pa.int64()), ("class_word", pa.string()),
    ("context", pa.string()), ("prompt", pa.string()), ("skills", pa.list_(pa.string())),
    ("box", pa.list_(pa.int32())), ("mask", pa.binary()),
    ("is_junk", pa.bool_()), ("is_dup", pa.bool_()), ("is_broken", pa.bool_()), ("broken_reason", pa.string()),
])
BROKEN_KINDS = ("truncated", "tiny", "not_image", "empty", "huge")
IRRELEVANT_ALT_TEXT = ("click to enlarge", "IMG_4821.JPG", "photo", "image 3 of 7", "buy now",
                       "sale!", "thumbnail", "product image", "DSC00192", "untitled")
TRACKING_SUFFIXES = ("?utm_source=feed", "?utm_source=news&utm_medium=email", "?fbclid=AbC123", "#gallery",
                     "/", "?gclid=xyz#top")


@dataclass(frozen=True)
class WorldConfig:
    out: str = field(default="runs/world", metadata={"help": "output folder"})
    pages: int = field(default=200, metadata={"help": "number of web pages"})
    seed: int = field(default=0, metadata={"help": "world seed; same seed, same bytes"})
    image_size: int = field(default=64, metadata={"help": "crawl image size in px (32, 64 or 128)"})
    image_format: str = field(default="png", metadata={"help": "png (lossless) or jpeg"})
    pages_per_shard: int = field(default=50, metadata={"help": "pages per Parquet shard"})
    min_images: int = field(default=3, metadata={"help": "fewest images on a page"})
    max_images: int = field(default=8, metadata={"help": "most images on a page"})
    junk_rate: float = field(default=0.1, metadata={"help": "fraction of pages of unrelated images"})
    dup_rate: float = field(default=0.1, metadata={"help": "fraction of pages repeating one photo"})
    dup_image_rate: float = field(default=0.05, metadata={"help": "chance a subject-page image near-copies an earlier one"})
    broken_rate: float = field(default=0.03, metadata={"help": "fraction of records with broken images"})
    empty_caption_rate: float = field(default=0.15, metadata={"help": "fraction of empty alt texts"})
    irrelevant_caption_rate: float = field(default=0.1, metadata={"help": "fraction of irrelevant alt texts"})
    url_noise_rate: float = field(default=0.3, metadata={"help": "fraction of page URLs with case/slash/tracking noise"})
    jitter: float = field(default=0.03, metadata={"help": "position/scale jitter of crawl photos"})
    max_in_flight: int = field(default=4, metadata={"help": "shard tasks running at once"})
    preview_pages: int = field(default=10, metadata={"help": "pages shown in preview.png"})

    def __post_init__(self):
        if self.image_size not in (32, 64, 128):
            raise ValueError(f"image_size must be 32, 64 or 128, got {self.image_size}")
        if self.image_format not in ("png", "jpeg"):
            raise ValueError(f"image_format must be png or jpeg, got {self.image_format!r}")
        if not 1 <= self.min_images <= self.max_images:
            raise ValueError("need 1 <= min_images <= max_images")
        if self.junk_rate + self.dup_rate > 1:
            raise ValueError("junk_rate + dup_rate must not exceed 1")


def canonical_page_url(page_index: int) -> str:
    return f"https://www.shop{page_index % 97}.example/items/{page_index}"


def _noisy_url(url: str, rng: np.random.Generator, rate: float) -> str:
    if rng.random() >= rate:
        return url
    scheme, rest = url.split("://")
    host, path = rest.split("/", 1)
    if rng.random() < 0.5:
        scheme, host = scheme.upper(), host.upper()
    return f"{scheme}://{host}/{path}{TRACKING_SUFFIXES[int(rng.integers(len(TRACKING_SUFFIXES)))]}"


def _caption(prompt: str, rng: np.random.Generator, cfg: WorldConfig) -> str:
    r = rng.random()
    if r < cfg.empty_caption_rate:
        return ""
    if r < cfg.empty_caption_rate + cfg.irrelevant_caption_rate or not prompt:
        return str(rng.choice(IRRELEVANT_ALT_TEXT))
    return prompt


def _jittered_copy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A near-duplicate: shifted a pixel, brightness nudged, a little sensor noise."""
    out = np.roll(image, tuple(int(s) for s in rng.integers(-1, 2, 2)), axis=(0, 1)).astype(np.float32)
    out = out * rng.uniform(0.96, 1.04) + rng.normal(0, 2.0, out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def junk_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """Unrelated web imagery: empty scenes, banners of random blocks, or flat logos."""
    kind = rng.integers(3)
    if kind == 0:
        x, y = _grid(size)
        return np.round(_downsample(background(str(rng.choice(SCENES)), x, y), size) * 255).astype(np.uint8)
    if kind == 1:
        blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        return np.kron(blocks, np.ones((size // 4, size // 4, 1), np.uint8))
    img = np.full((size, size, 3), rng.integers(0, 256, 3), np.uint8)
    c = size // 2
    img[c - size // 6: c + size // 6, size // 8: -size // 8] = rng.integers(0, 256, 3)
    return img


def _broken_bytes(kind: str, good: bytes, rng: np.random.Generator) -> bytes:
    if kind == "truncated":
        return good[: max(8, len(good) // 3)]
    if kind == "tiny":
        return encode_png(np.full((1, 1, 3), 128, np.uint8))
    if kind == "not_image":
        return b"<html><body>404 Not Found</body></html>"
    if kind == "huge":  # 7200 x 7200 (52 MP, over utils.images.MAX_PIXELS): 30 KB on disk, 155 MB as RGB
        buf = io.BytesIO()
        Image.new("1", (7200, 7200)).save(buf, format="PNG")
        return buf.getvalue()
    return b""


def _box(mask: np.ndarray) -> list[int] | None:
    ys, xs = np.nonzero(mask)
    return None if len(xs) == 0 else [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def generate_page(cfg: WorldConfig, page_index: int) -> list[tuple[dict, dict]]:
    """(web row, truth row) for every image of one page; a pure function of (cfg, page_index)."""
    rng = np.random.default_rng([cfg.seed, page_index])
    r = rng.random()
    kind = "junk" if r < cfg.junk_rate else "dup" if r < cfg.junk_rate + cfg.dup_rate else "subject"
    n_images = int(rng.integers(cfg.min_images, cfg.max_images + 1))
    url = canonical_page_url(page_index)
    subject = Subject.from_seed(train_seed(rng))
    rows = []
    for i in range(n_images):
        seed, ctx, is_dup = subject.seed, None, False
        if kind == "junk":
            if rng.random() < 0.5:  # another subject per image: a page of unrelated products
                seed, ctx = train_seed(rng), sample_context(rng, jitter=cfg.jitter)
                image, mask = render(seed, ctx, cfg.image_size)
            else:
                seed, image, mask = -1, junk_image(rng, cfg.image_size), None
        elif rows and (kind == "dup" or rng.random() < cfg.dup_image_rate):
            seed, ctx, source, mask, _ = rows[0] if kind == "dup" else rows[int(rng.integers(len(rows)))]
            image, is_dup = _jittered_copy(source, rng), True
        else:
            ctx = sample_context(rng, jitter=cfg.jitter)
            image, mask = render(subject, ctx, cfg.image_size)
        rows.append((seed, ctx, image, mask, is_dup))

    out = []
    for i, (seed, ctx, image, mask, is_dup) in enumerate(rows):
        key = f"{page_index:07d}{i:02d}"
        class_word = Subject.from_seed(seed).class_word if seed >= 0 else None
        prompt = ctx.prompt(class_word) if ctx is not None else ""
        data = encode(image, cfg.image_format)
        broken = str(rng.choice(BROKEN_KINDS)) if rng.random() < cfg.broken_rate else None
        if broken:
            data = _broken_bytes(broken, data, rng)
        web = {"key": key, "url": f"https://cdn.shop{page_index % 97}.example/img/{key}.{cfg.image_format}",
               "page_url": _noisy_url(url, rng, cfg.url_noise_rate), "caption": _caption(prompt, rng, cfg),
               "image": data, "width": cfg.image_size, "height": cfg.image_size}
        truth = {"key": key, "page_index": page_index, "page_url": url, "page_kind": kind,
                 "subject_seed": seed, "class_word": class_word,
                 "context": ctx.to_json() if ctx is not None else None, "prompt": prompt or None,
                 "skills": ctx.skills if ctx is not None else [], "box": _box(mask) if mask is not None else None,
                 "mask": encode_png(mask.astype(np.uint8) * 255) if mask is not None else None,
                 "is_junk": kind == "junk", "is_dup": is_dup, "is_broken": broken is not None,
                 "broken_reason": broken}
        out.append((web, truth))
    return out


def write_shard(cfg: WorldConfig, shard: int) -> dict:
    """Writes ``web/part-NNNNN.parquet`` and ``truth/part-NNNNN.parquet``; returns counts only."""
    first = shard * cfg.pages_per_shard
    pages = range(first, min(first + cfg.pages_per_shard, cfg.pages))
    web_rows, truth_rows, page_kinds = [], [], Counter()
    for p in pages:
        rows = generate_page(cfg, p)
        page_kinds[rows[0][1]["page_kind"]] += 1
        for web, truth in rows:
            web_rows.append(web)
            truth_rows.append(truth)
    name = f"part-{shard:05d}.parquet"
    for folder, rows, schema in (("web", web_rows, WEB_SCHEMA), ("truth", truth_rows, TRUTH_SCHEMA)):
        path = os.path.join(cfg.out, folder, name)
        tmp = path + ".tmp"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp, compression="zstd")
        os.replace(tmp, path)  # a shard is either whole or absent
    return {
        "pages": len(pages), "records": len(web_rows), "page_kinds": dict(page_kinds),
        "broken": dict(Counter(t["broken_reason"] for t in truth_rows if t["is_broken"])),
        "dup_records": sum(t["is_dup"] for t in truth_rows),
        "empty_captions": sum(w["caption"] == "" for w in web_rows),
    }


def _merge(total: dict, part: dict) -> dict:
    for k, v in part.items():
        if isinstance(v, dict):
            _merge(total.setdefault(k, {}), v)
        else:
            total[k] = total.get(k, 0) + v
    return total


def write_preview(cfg: WorldConfig, path: str) -> None:
    """A contact sheet of the first pages, one row each, read back from the written shard."""
    table = pq.read_table(os.path.join(cfg.out, "web", "part-00000.parquet"), columns=["key", "image"])
    truth = pq.read_table(os.path.join(cfg.out, "truth", "part-00000.parquet"),
                          columns=["page_index", "page_kind"]).to_pylist()
    rows: dict[int, list] = {}
    labels: dict[int, str] = {}
    for rec, t in zip(table.to_pylist(), truth):
        if t["page_index"] >= cfg.preview_pages:
            break
        try:
            img = np.asarray(Image.open(io.BytesIO(rec["image"])).convert("RGB"))
            img = img if img.shape[0] == cfg.image_size and img.shape[1] == cfg.image_size else None
        except Exception:  # broken records show as blank cells, as they are in the crawl
            img = None
        rows.setdefault(t["page_index"], []).append(img)
        labels[t["page_index"]] = f"page {t['page_index']}: {t['page_kind']}"
    order = sorted(rows)
    contact_sheet([rows[p] for p in order], [labels[p] for p in order]).save(path)


def generate_world(cfg: WorldConfig, progress: bool = True) -> dict:
    """Runs the crawl as Ray tasks (at most ``max_in_flight`` at once) and writes world.json."""
    from ..utils.ray_utils import run_sharded

    for folder in ("web", "truth"):
        os.makedirs(os.path.join(cfg.out, folder), exist_ok=True)
    n_shards = -(-cfg.pages // cfg.pages_per_shard)
    start, stats = time.time(), {}
    for part in run_sharded(write_shard, [(cfg, s) for s in range(n_shards)], cfg.max_in_flight, "world pages",
                            unit_key="pages", total=cfg.pages, progress=progress):
        _merge(stats, part)
    elapsed = time.time() - start
    stats.update(shards=n_shards, seconds=round(elapsed, 2), pages_per_second=round(cfg.pages / elapsed, 1))
    if cfg.preview_pages:
        write_preview(cfg, os.path.join(cfg.out, "preview.png"))
    with open(os.path.join(cfg.out, "world.json"), "w") as f:
        json.dump({"config": asdict(cfg), "stats": stats}, f, indent=2, sort_keys=True)
    return stats
