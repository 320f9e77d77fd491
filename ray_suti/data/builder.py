"""Stage 1: web pairs -> in-context clusters, streamed with Ray Data.

    read web-pairs shards: Parquet, or img2dataset's output as it is written (checked first: a bad
    shard fails naming the file, or is skipped)
    -> validate each record (decode; a reason for every skip) and normalise its page URL
    -> embed valid images with CLIP on an actor pool (batch size, concurrency, GPUs from config)
    -> group by page -> per page: drop near-duplicates, then incoherent or too-small clusters
    -> write ICL-cluster Parquet (every page, with ``kept`` and ``drop_reason``) + stats.json

Near-duplicates go first because near-identical demos and targets teach copy-paste (docs/design.md).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..schemas import ICL_CLUSTER_SCHEMA
from ..utils import storage
from ..utils.images import MIN_SIDE, inspect_image
from .captions import clean_caption
from .urls import normalize_page_url

WEB_COLUMNS = {"key": pa.string(), "page_url": pa.string(), "caption": pa.string(), "image": pa.binary()}
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# What every reader hands on: the web pairs, and a reason for the records the crawl itself already
# failed ("" for the rest; validate_records adds its own).
PAIRS_SCHEMA = pa.schema([*WEB_COLUMNS.items(), ("reason", pa.string())])

# img2dataset (https://github.com/rom1504/img2dataset) writes per shard, with output_format
#   "parquet":    NNNNN.parquet: the url list's columns (url, caption, any save_additional_columns such
#                 as page_url) + key, status, error_message, width, height, ..., and the image bytes in
#                 a column named after encode_format (jpg, png or webp), null where status != success;
#   "webdataset": NNNNN.tar (KEY.jpg|png|webp, KEY.txt, KEY.json; successes only) + NNNNN.parquet with
#                 the same metadata for every row and no image column.
# Rows whose status is not "success" are records with the reason "status:<status>", e.g.
# "status:failed_to_download"; the metadata Parquet beside a tar gives only those (the tar has the rest).
IMG2DATASET_IMAGE_COLUMNS = ("jpg", "png", "webp")
IMG2DATASET_COLUMNS = {"key": pa.string(), "url": pa.string(), "status": pa.string()}
IMG2DATASET_OPTIONAL = {"caption": pa.string(), "page_url": pa.string()}


def page_of_image_url(url: str | None) -> str | None:
    """The page to group an image by when the crawl kept no page URL (an img2dataset run without
    ``save_additional_columns=["page_url"]``): the folder the image sits in, ``https://cdn.x/p/7`` for
    ``https://cdn.x/p/7/a.jpg``. A stand-in, no more: one folder may hold many products' photos (the
    coherence filter drops such groups) and one product's photos may sit in several folders."""
    from urllib.parse import urlsplit, urlunsplit

    if not url or not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc:
        return None
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rsplit("/", 1)[0], "", ""))


def _status_reason(status) -> str:
    return "" if status == "success" else f"status:{status or 'missing'}"


def _binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


@dataclass(frozen=True)
class ParquetPlan:
    """How one Parquet shard is read: ``kind`` "pairs" (the web-pairs contract), "img2dataset" (bytes in
    ``image_column``) or "img2dataset-meta" (the metadata beside an img2dataset tar); ``columns`` to read."""
    kind: str
    columns: tuple[str, ...]
    image_column: str | None = None


def parquet_plan(schema: pa.Schema, has_tar: bool) -> ParquetPlan:
    """The plan for a shard with this schema (``has_tar``: a ``.tar`` of the same name sits beside it),
    or ValueError listing what is wrong."""
    names = set(schema.names)
    if "image" in names or "status" not in names:  # the web-pairs contract
        problems = [f"missing column {c!r}" + (" (nor is it img2dataset output: no 'status' column)" if c == "image"
                                               else "") for c in WEB_COLUMNS if c not in names]
        problems += [f"column {c!r} is {schema.field(c).type}, expected {t}" for c, t in WEB_COLUMNS.items()
                     if c in names and not schema.field(c).type.equals(t)
                     and not (t == pa.binary() and schema.field(c).type == pa.large_binary())]
        if problems:
            raise ValueError("; ".join(problems))
        return ParquetPlan("pairs", tuple(WEB_COLUMNS))
    images = [c for c in IMG2DATASET_IMAGE_COLUMNS if c in names]
    problems = [f"img2dataset output without column {c!r}" for c in IMG2DATASET_COLUMNS if c not in names]
    problems += [f"column {c!r} is {schema.field(c).type}, expected string" for c in (*IMG2DATASET_COLUMNS,
                 *IMG2DATASET_OPTIONAL) if c in names and not _string(schema.field(c).type)]
    problems += [f"column {c!r} is {schema.field(c).type}, expected binary" for c in images
                 if not _binary(schema.field(c).type)]
    if len(images) > 1:
        problems.append(f"several image columns {images}")
    if not images and not has_tar:
        problems.append("img2dataset metadata without images: no jpg/png/webp column and no .tar of the same "
                        "name beside it")
    if problems:
        raise ValueError("; ".join(problems))
    columns = (*IMG2DATASET_COLUMNS, *(c for c in IMG2DATASET_OPTIONAL if c in names), *images)
    return ParquetPlan("img2dataset" if images else "img2dataset-meta", columns, images[0] if images else None)


@dataclass(frozen=True)
class BuildConfig:
    input: str = field(default="runs/world/web", metadata={"help": "web pairs (Parquet, or img2dataset's parquet or webdataset output): folder, file or URI"})
    output: str = field(default="runs/clusters", metadata={"help": "output folder or URI"})
    min_cluster: int = field(default=3, metadata={"help": "fewest images in a kept cluster"})
    max_cluster: int = field(default=8, metadata={"help": "most images kept per cluster"})
    min_side: int = field(default=MIN_SIDE, metadata={"help": "smallest image side accepted, px"})
    clip_model: str = field(default="tiny", metadata={"help": "tiny (embedded default) or an open_clip model name"})
    clip_pretrained: str = field(default="", metadata={"help": "tiny: safetensors from train-clip; else a tag or path"})
    embed_batch_size: int = field(default=64, metadata={"help": "images per embedding batch"})
    embed_shifts: int = field(default=0, metadata={"help": "average each embedding over an N x N grid of 1-px rolls, N*N forward passes (0: 3 for tiny, 1 = off for real CLIPs)"})
    embed_concurrency: int = field(default=1, metadata={"help": "embedding actors"})
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per embedding actor"})
    coherence_threshold: float = field(default=0.30, metadata={"help": "drop clusters whose mean pairwise cosine is below"})
    duplicate_threshold: float = field(default=0.96, metadata={"help": "images closer than this to a kept one are dropped"})
    captioner: str = field(default="alt", metadata={"help": "alt (clean the alt text) or a transformers image-to-text model folder (path or URI)"})
    caption_concurrency: int = field(default=1, metadata={"help": "captioning actors (model captioner)"})
    tolerate_bad_shards: bool = field(default=False, metadata={"help": "skip unreadable shards with a warning"})
    shuffle_partitions: int = field(default=0, metadata={"help": "partitions of the group-by-page shuffle (0: one per input shard, at least one per cluster CPU)"})


def _check_parquet(fs, path: str, has_tar: bool = False) -> ParquetPlan:
    with fs.open_input_file(path) as handle:
        schema = pq.read_schema(handle)
    return parquet_plan(schema, has_tar)


def _check_tar(fs, path: str, empty_ok: bool = False) -> bool:
    """img2dataset's webdataset layout: ``KEY.jpg|png|webp`` + ``KEY.json`` (its metadata, with
    ``page_url`` when the crawl saved it) per sample. False for an empty tar where ``empty_ok``."""
    import tarfile

    with fs.open_input_file(path) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
        first: dict = {}
        for member in tar:  # the first sample is enough: img2dataset writes every sample alike
            key, _, ext = member.name.rpartition(".")
            if first and key != next(iter(first)):
                break
            first.setdefault(key, set()).add(ext.lower())
    if not first:
        if empty_ok:
            return False
        raise ValueError("empty tar")
    exts = next(iter(first.values()))
    if not exts & set(TAR_IMAGE_EXTENSIONS):
        raise ValueError(f"first sample has no image ({sorted(exts)})")
    if "json" not in exts:
        raise ValueError("first sample has no .json (img2dataset metadata with page_url)")
    return True


def check_shards(path: str, tolerate: bool) -> tuple[list[str], object, list[str]]:
    """(readable shards, filesystem, skipped files): ``.parquet`` files (web pairs, img2dataset's
    parquet output or the metadata beside its tars) and img2dataset ``.tar`` shards under ``path``
    (local or any pyarrow URI). A corrupt file, a missing column or a wrong type raises ValueError
    naming the file, unless ``tolerate``."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), os.path.abspath(path))
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no input at {path}")
    files = [root] if info.type == pafs.FileType.File else sorted(
        f.path for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if f.type == pafs.FileType.File and f.path.endswith((".parquet", ".tar")))
    tars = {f[: -len(".tar")] for f in files if f.endswith(".tar")}
    parquets = {f[: -len(".parquet")] for f in files if f.endswith(".parquet")}
    good, skipped, no_page = [], [], 0
    for f in files:
        try:
            if f.endswith(".tar"):
                # An img2dataset shard none of whose downloads succeeded has an empty tar; the
                # metadata Parquet beside it still brings its failed rows.
                if not _check_tar(fs, f, empty_ok=f[: -len(".tar")] in parquets):
                    continue
            else:
                plan = _check_parquet(fs, f, has_tar=f[: -len(".parquet")] in tars)
                no_page += plan.kind != "pairs" and "page_url" not in plan.columns
            good.append(f)
        except Exception as e:
            message = f"bad web-pairs shard {f}: {e}"
            if not tolerate:
                raise ValueError(message) from None
            print(f"warning: skipping {message}", flush=True)
            skipped.append(f)
    if not good:
        raise ValueError(f"no readable web-pairs shards under {path}")
    if no_page:
        print(f"note: {no_page} img2dataset shard(s) without a page_url column (save_additional_columns): "
              "their images are grouped by the folder of their URL", flush=True)
    return good, fs, skipped


def _pairs(keys, pages, captions, images, reasons) -> pa.Table:
    return pa.table([pa.array(keys, pa.string()), pa.array(pages, pa.string()), pa.array(captions, pa.string()),
                     pa.array(images, pa.binary()), pa.array(reasons, pa.string())], schema=PAIRS_SCHEMA)


def webdataset_to_pairs(batch: pa.Table | pd.DataFrame) -> pa.Table:
    """Rows of ``read_webdataset(decoder=None)`` (one column per file extension) -> web pairs
    (``PAIRS_SCHEMA``). A sample whose ``.json`` has no ``page_url`` key (img2dataset run without it
    in save_additional_columns) is grouped by its image URL's folder (``page_of_image_url``)."""
    keys, pages, captions, images, reasons = [], [], [], [], []
    for row in batch.to_pylist() if isinstance(batch, pa.Table) else batch.to_dict("records"):
        try:
            meta = json.loads(row["json"]) if isinstance(row.get("json"), (bytes, str)) else {}
        except ValueError:
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        image = next((row[e] for e in TAR_IMAGE_EXTENSIONS if e in row and isinstance(row[e], bytes)), b"")
        text = row.get("txt")
        keys.append(str(meta.get("key") or row["__key__"]))
        pages.append(meta["page_url"] if "page_url" in meta else page_of_image_url(meta.get("url")))
        captions.append(text.decode("utf-8", "replace") if isinstance(text, bytes) else meta.get("caption"))
        reason = _status_reason(meta["status"]) if "status" in meta else ""
        images.append(b"" if reason else image)
        reasons.append(reason)
    return _pairs(keys, pages, captions, images, reasons)


def img2dataset_to_pairs(batch: pa.Table, image_column: str | None) -> pa.Table:
    """Rows of img2dataset's Parquet -> web pairs (``PAIRS_SCHEMA``): the bytes from ``image_column``
    (jpg, png or webp), rows whose status is not "success" kept with the reason "status:<status>" and
    no image. ``image_column`` None: the metadata Parquet beside a webdataset tar, of which only the
    failed rows are kept (the tar holds the successes). Without a page_url column (img2dataset run
    without it in save_additional_columns) images are grouped by their URL's folder."""
    col = lambda name: batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows  # noqa: E731
    urls, statuses = col("url"), col("status")
    pages = col("page_url") if "page_url" in batch.column_names else [page_of_image_url(u) for u in urls]
    rows = [i for i, s in enumerate(statuses) if image_column is not None or s != "success"]
    reasons = [_status_reason(s) for s in statuses]
    images = col(image_column) if image_column is not None else [None] * batch.num_rows
    keys, captions = col("key"), col("caption")
    return _pairs([keys[i] for i in rows], [pages[i] for i in rows], [captions[i] for i in rows],
                  [b"" if reasons[i] or images[i] is None else images[i] for i in rows], [reasons[i] for i in rows])


def _pairs_from_contract(batch: pa.Table) -> pa.Table:
    return batch.select(list(WEB_COLUMNS)).append_column("reason", pa.array([""] * batch.num_rows, pa.string())) \
        .cast(PAIRS_SCHEMA)


def read_web_pairs(files: list[str], fs, num_cpus: float | None = None):
    """A Ray Dataset of ``PAIRS_SCHEMA`` (``WEB_COLUMNS`` + ``reason``) from checked Parquet and tar shards
    (streamed): web-pairs Parquet, img2dataset Parquet and webdataset output; ``num_cpus`` per read
    task (reads are IO-bound: a fraction leaves cores to training workers)."""
    import ray.data

    from ..utils.ray_utils import read_parquet

    tars = [f for f in files if f.endswith(".tar")]
    groups: dict[ParquetPlan, list[str]] = {}
    for f in files:  # footers only, read again here: check_shards hands on paths. Its checks passed, so
        # metadata Parquet is read even where its tar was empty or skipped as unreadable (the failed rows)
        if f.endswith(".parquet"):
            groups.setdefault(_check_parquet(fs, f, has_tar=True), []).append(f)
    parts = []
    for plan, paths in groups.items():  # one read per layout: shards of one crawl share it
        ds = read_parquet(paths, filesystem=fs, num_cpus=num_cpus).select_columns(list(plan.columns))
        if plan.kind == "pairs":
            parts.append(ds.map_batches(_pairs_from_contract, batch_format="pyarrow", num_cpus=num_cpus))
        else:
            parts.append(ds.map_batches(img2dataset_to_pairs, fn_kwargs={"image_column": plan.image_column},
                                        batch_format="pyarrow", num_cpus=num_cpus))
    if tars:
        parts.append(ray.data.read_webdataset(tars, filesystem=fs, decoder=None, num_cpus=num_cpus)
                     .map_batches(webdataset_to_pairs, batch_format="pyarrow", num_cpus=num_cpus))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def validate_records(batch: pd.DataFrame, min_side: int) -> pd.DataFrame:
    """Adds ``page_key`` and ``reason`` ("" for good records); broken images are emptied. A ``reason``
    already there (the crawl's own, e.g. "status:failed_to_download") is kept."""
    keys, reasons, images = [], [], []
    given = batch["reason"] if "reason" in batch.columns else [""] * len(batch)
    for url, data, prior in zip(batch["page_url"], batch["image"], given):
        key = normalize_page_url(url)
        reason = prior if isinstance(prior, str) and prior else inspect_image(data, min_side=min_side)[1]
        reason = reason or ("" if key else "no_page_url")
        keys.append(key or "")
        reasons.append(reason)
        images.append(data if not reason else b"")
    return batch.assign(page_key=keys, reason=reasons, image=images)


class ClipEmbedder:
    """Actor: adds a unit-length CLIP ``embedding`` to valid records (empty list for the rest)."""

    def __init__(self, model: str, pretrained: str, use_gpu: bool, shifts: int = 1):
        import torch

        from .clip import load_clip

        torch.set_num_threads(1)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.clip, self.size = load_clip(model, pretrained, self.device)
        self.shifts = shifts

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from .clip import embed_images

        valid = [i for i, r in enumerate(batch["reason"]) if not r]
        images = [inspect_image(batch["image"].iloc[i])[0] for i in valid]
        feats = embed_images(self.clip, images, self.size, self.device, self.shifts)
        out = [[] for _ in range(len(batch))]
        for i, f in zip(valid, feats):
            out[i] = f.astype(np.float32).tolist()
        return batch.assign(embedding=out)


class CaptionActor:
    """Actor: rewrites the captions of kept clusters with a model captioner (``captions.py``)."""

    def __init__(self, spec: str, use_gpu: bool):
        import torch

        from .captions import make_captioner

        torch.set_num_threads(1)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.captioner = make_captioner(spec, device)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = [i for i, kept in enumerate(batch["kept"]) if kept]
        images = [inspect_image(b)[0] for i in rows for b in batch["images"].iloc[i]]
        alts = [c for i in rows for c in batch["captions"].iloc[i]]
        new = iter(self.captioner(images, alts))
        captions = [list(c) for c in batch["captions"]]
        for i in rows:
            captions[i] = [next(new) for _ in captions[i]]
        return batch.assign(captions=captions)


def make_cluster(group: pd.DataFrame, cfg: BuildConfig) -> pa.Table:
    """One page's records -> one ICL-cluster row (kept or dropped, with a reason)."""
    key = group["page_key"].iloc[0]
    reasons = Counter(r for r in group["reason"] if r)
    valid = group[group["reason"] == ""].sort_values("key")  # the shuffle's order is arbitrary: keys decide which copy stays
    emb = np.array(valid["embedding"].tolist(), np.float32).reshape(len(valid), -1)
    keep: list[int] = []
    for i in range(len(valid)):  # greedy: the first of a set of near-duplicates stays
        if not keep or (emb[keep] @ emb[i]).max() <= cfg.duplicate_threshold:
            keep.append(i)
    dups = len(valid) - len(keep)
    keep = keep[: cfg.max_cluster]
    sims = emb[keep] @ emb[keep].T if keep else np.zeros((0, 0))
    pairs = sims[np.triu_indices(len(keep), 1)] if len(keep) > 1 else np.array([np.nan])
    mean_sim = float(np.mean(pairs))
    drop = ("no_page_url" if not key else "too_few_images" if len(keep) < cfg.min_cluster
            else "incoherent" if mean_sim < cfg.coherence_threshold else "")
    rows = valid.iloc[keep]
    return pa.Table.from_pylist([{
        "cluster_id": hashlib.sha1((key or "no-page").encode()).hexdigest()[:16], "page_url": key,
        "kept": not drop, "drop_reason": drop, "keys": list(rows["key"]), "images": list(rows["image"]),
        "captions": [clean_caption(c) for c in rows["caption"]], "embeddings": list(rows["embedding"]),
        "n_records": len(group), "n_images": len(keep), "duplicates_removed": dups,
        "mean_sim": mean_sim, "min_sim": float(np.min(pairs)), "max_sim": float(np.max(pairs)),
        "record_reasons": json.dumps(dict(sorted(reasons.items()))),
    }], schema=ICL_CLUSTER_SCHEMA)


def recaption(source: str, target: str, cfg: BuildConfig) -> None:
    """A second pass over the written clusters with the model captioner, ``source`` -> ``target``.
    Separate from the first, so its actors never hold CPUs while the CLIP actors still need them (on
    a small cluster the two pools together starved the reads and the job stalled)."""
    from ray.data import ActorPoolStrategy

    from ..utils.ray_utils import read_parquet

    ds = read_parquet(source)
    ds = ds.map_batches(CaptionActor, fn_constructor_kwargs={"spec": cfg.captioner, "use_gpu": cfg.num_gpus > 0},
                        batch_size=16, compute=ActorPoolStrategy(size=cfg.caption_concurrency), num_gpus=cfg.num_gpus,
                        batch_format="pandas")
    ds.write_parquet(target)


def shuffle_partitions(cfg: BuildConfig, shards: int) -> int:
    """A partition holds about a shard's worth of pages (so its memory stays bounded as the crawl
    grows), and every CPU gets one. Ray Data's default is 200 whatever the crawl's size: mostly
    empty reduce tasks on a small one, partitions of gigabytes on a large one."""
    import ray

    return cfg.shuffle_partitions or max(shards, int(ray.cluster_resources().get("CPU", 1)))


def build_dataset(cfg: BuildConfig) -> dict:

    from ray.data import ActorPoolStrategy

    from ..utils.ray_utils import init_ray, pool_actor_cpus
    from .clip import default_shifts

    files, fs, skipped = check_shards(cfg.input, cfg.tolerate_bad_shards)
    if cfg.captioner != "alt" and not storage.is_dir(cfg.captioner):
        raise ValueError(f"--captioner must be 'alt' or a transformers model folder (path or URI), got {cfg.captioner!r}")
    init_ray()
    ds = read_web_pairs(files, fs, num_cpus=0.25)  # IO-bound; whole cores go to the actor pools
    ds = ds.map_batches(validate_records, fn_kwargs={"min_side": cfg.min_side}, batch_format="pandas")
    ds = ds.map_batches(ClipEmbedder, fn_constructor_kwargs={"model": cfg.clip_model, "pretrained": cfg.clip_pretrained,
                                                            "use_gpu": cfg.num_gpus > 0,
                                                            "shifts": cfg.embed_shifts or default_shifts(cfg.clip_model)},
                        batch_size=cfg.embed_batch_size, compute=ActorPoolStrategy(size=cfg.embed_concurrency),
                        num_cpus=pool_actor_cpus(cfg.embed_concurrency), num_gpus=cfg.num_gpus,
                        batch_format="pandas")
    ds = ds.groupby("page_key", num_partitions=shuffle_partitions(cfg, len(files)))
    ds = ds.map_groups(make_cluster, fn_kwargs={"cfg": cfg}, batch_format="pandas")
    out = storage.join(cfg.output, "clusters")  # a local folder or any pyarrow URI (s3://, gs://)
    if cfg.captioner == "alt":  # make_cluster already cleaned the alt text
        ds.write_parquet(out)
    else:
        uncaptioned = storage.join(cfg.output, "clusters.uncaptioned")
        ds.write_parquet(uncaptioned)
        recaption(uncaptioned, out, cfg)
        storage.delete_dir(uncaptioned)
    stats = cluster_stats(out, skipped)
    storage.write_bytes(storage.join(cfg.output, "stats.json"), json.dumps(stats, indent=2, sort_keys=True).encode())
    write_preview(out, storage.join(cfg.output, "clusters.png"))
    return stats


def write_preview(clusters_dir: str, path: str, per_kind: int = 6) -> None:
    """Kept and dropped example clusters, one row each, read shard by shard until enough are found."""
    from ..utils.images import contact_sheet

    rows, labels, counts = [], [], Counter()
    fs, files = storage.list_files(clusters_dir, ".parquet")
    for f in files:
        for r in pq.read_table(f, filesystem=fs, columns=["kept", "drop_reason", "images", "mean_sim"]).to_pylist():
            kind = "kept" if r["kept"] else r["drop_reason"]
            if counts["kept" if r["kept"] else "dropped"] >= per_kind or not r["images"]:
                continue
            counts["kept" if r["kept"] else "dropped"] += 1
            rows.append([np.asarray(inspect_image(b)[0].convert("RGB")) for b in r["images"]])
            labels.append(f"{kind} (sim {r['mean_sim']:.2f})")
        if min(counts["kept"], counts["dropped"]) >= per_kind:
            break
    if rows:
        buf = io.BytesIO()
        contact_sheet(rows, labels, cell=48).save(buf, format="PNG")
        storage.write_bytes(path, buf.getvalue())


def cluster_stats(clusters_dir: str, skipped_shards: list[str]) -> dict:
    """Counts from the written clusters (small columns only)."""
    fs, path = storage.resolve(clusters_dir)
    t = pq.read_table(path, filesystem=fs, columns=["kept", "drop_reason", "n_records", "n_images",
                                                    "duplicates_removed", "mean_sim", "record_reasons"]).to_pandas()
    records = Counter()
    for r in t["record_reasons"]:
        records.update(json.loads(r))
    kept = t[t["kept"]]
    hist = lambda s: np.histogram(s.dropna(), bins=10, range=(-1, 1))[0].tolist()  # noqa: E731
    return {
        "records_in": int(t["n_records"].sum()), "records_skipped": dict(records),
        "images_kept": int(kept["n_images"].sum()), "duplicates_removed": int(t["duplicates_removed"].sum()),
        "clusters_kept": int(len(kept)), "clusters_dropped": dict(Counter(t.loc[~t["kept"], "drop_reason"])),
        "mean_sim_histogram": {"bins": np.linspace(-1, 1, 11).round(2).tolist(), "kept": hist(kept["mean_sim"]),
                               "dropped": hist(t.loc[~t["kept"], "mean_sim"])},
        "skipped_shards": skipped_shards,
    }
