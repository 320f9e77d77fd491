"""Build a Re-Imagen knowledge base: every image-text pair embedded with CLIP, in a LanceDB table.

    read (web pairs | img2dataset crawl | ICL clusters) -> map_batches(Embedder, actor pool) -> LanceDB

The KB is a folder (local or any pyarrow URI): ``entries.lance`` (a LanceDB table: ``id``, ``page``,
``caption``, ``image`` PNG/JPEG bytes, unit-length ``image_emb`` and ``text_emb``), a full-text index
on ``caption`` and, from ``index_min_rows`` rows on, an IVF-PQ vector index on each embedding
column (below that LanceDB's exact scan is faster); ``kb.json`` holds the CLIP that embedded it and
the input files already indexed. Indexing again adds only files it has not seen (incremental).
``page`` groups the entries of one web page (or one ICL cluster): retrieval keeps them together.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from ..utils import storage
from ..utils.images import MIN_SIDE, inspect_image

TABLE = "entries"
META = "kb.json"
COMMITTED_CLIP = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "checkpoints", "tiny-clip.safetensors")


def entry_schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("page", pa.string()), ("caption", pa.string()), ("image", pa.binary()),
                      ("image_emb", pa.list_(pa.float32(), dim)), ("text_emb", pa.list_(pa.float32(), dim))])


@dataclass
class IndexConfig:
    input: str = field(default="runs/world/web", metadata={"help": "web pairs or an img2dataset crawl (folder of "
                                                                    "shards), or ICL clusters: folder or URI"})
    output: str = field(default="runs/kb", metadata={"help": "the knowledge base folder (local or s3://...)"})
    clip_model: str = field(default="tiny", metadata={"help": "tiny (embedded default) or an open_clip model name"})
    clip_pretrained: str = field(default=COMMITTED_CLIP, metadata={"help": "tiny: safetensors from train-clip "
                                                                           "(default: the committed one); else a tag or path"})
    embed_shifts: int = field(default=0, metadata={"help": "as build-dataset's (0: the model's default)"})
    embed_batch_size: int = field(default=64, metadata={"help": "pairs per embedding batch"})
    embed_concurrency: int = field(default=1, metadata={"help": "embedding actors"})
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per embedding actor"})
    min_side: int = field(default=MIN_SIDE, metadata={"help": "smaller images are skipped"})
    index_min_rows: int = field(default=10_000, metadata={"help": "build vector indexes from this many rows on"})


def is_clusters(files: list[str], fs) -> bool:
    import pyarrow.parquet as pq

    parquet = [f for f in files if f.endswith(".parquet")]
    return bool(parquet) and "cluster_id" in pq.read_schema(parquet[0], filesystem=fs).names


def cluster_entries(batch: pd.DataFrame) -> pd.DataFrame:
    """ICL cluster rows -> one row per kept image: the cluster is the page."""
    rows = [(f"{cid}/{key}", cid, caption, image)
            for cid, kept, keys, captions, images in zip(batch["cluster_id"], batch["kept"], batch["keys"],
                                                         batch["captions"], batch["images"]) if kept
            for key, caption, image in zip(keys, captions, images)]
    return pd.DataFrame(rows, columns=["key", "page_key", "caption", "image"]).assign(reason="")


def pair_entries(batch: pd.DataFrame, min_side: int) -> pd.DataFrame:
    """Web pairs -> rows with the page and a reason ("" for good ones)."""
    from ..data.builder import validate_records

    return validate_records(batch, min_side)[["key", "page_key", "caption", "image", "reason"]]


class Embedder:
    """Actor: CLIP image and caption embeddings of the good rows; the others are dropped."""

    def __init__(self, model: str, pretrained: str, use_gpu: bool, shifts: int):
        import torch

        from ..data.clip import load_clip

        torch.set_num_threads(1)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.clip, self.size = load_clip(model, pretrained, self.device)
        self.model, self.shifts = model, shifts

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from ..data.clip import embed_images, embed_texts

        batch = batch[(batch["reason"] == "") & batch["page_key"].astype(bool)].reset_index(drop=True)
        if batch.empty:
            return pd.DataFrame({c: [] for c in ("id", "page", "caption", "image", "image_emb", "text_emb")})
        captions = [c if isinstance(c, str) else "" for c in batch["caption"]]
        images = [inspect_image(data)[0] for data in batch["image"]]
        image_emb = embed_images(self.clip, images, self.size, self.device, self.shifts).astype(np.float32)
        text_emb = embed_texts(self.clip, [c or " " for c in captions], self.model, self.device).astype(np.float32)
        return pd.DataFrame({"id": batch["key"], "page": batch["page_key"], "caption": captions, "image": batch["image"],
                             "image_emb": list(image_emb), "text_emb": list(text_emb)})


def read_meta(kb: str) -> dict | None:
    path = storage.join(kb, META)
    return json.loads(storage.read_bytes(path)) if storage.exists(path) else None


def run_index(cfg: IndexConfig) -> dict:
    """Embeds the input files not indexed yet and adds them to the KB; returns its kb.json."""
    import lancedb
    from ray.data import ActorPoolStrategy

    from ..data.builder import check_shards, read_web_pairs
    from ..data.clip import default_shifts
    from ..utils.progress import bar as progress_bar
    from ..utils.ray_utils import init_ray, pool_actor_cpus, read_parquet

    meta = read_meta(cfg.output)
    clip = {"clip_model": cfg.clip_model, "clip_pretrained": cfg.clip_pretrained,
            "embed_shifts": cfg.embed_shifts or default_shifts(cfg.clip_model)}
    if meta and {k: meta[k] for k in clip} != clip:
        raise ValueError(f"{cfg.output} was embedded with {({k: meta[k] for k in clip})}: index with the same CLIP")
    files, fs, skipped = check_shards(cfg.input, tolerate=False)
    seen = set(meta["files"]) if meta else set()
    new = [f for f in files if f not in seen]
    meta = meta or {**clip, "files": [], "rows": 0}
    if not new:
        return meta
    init_ray()
    if is_clusters(new, fs):
        ds = read_parquet([f for f in new if f.endswith(".parquet")], filesystem=fs)
        ds = ds.map_batches(cluster_entries, batch_format="pandas")
    else:
        ds = read_web_pairs(new, fs, num_cpus=0.25)
        ds = ds.map_batches(pair_entries, fn_kwargs={"min_side": cfg.min_side}, batch_format="pandas")
    # Small shards are read as one block, which one actor would embed alone: blocks of a few batches
    # keep every actor of the pool busy (streaming, no shuffle).
    ds = ds.repartition(target_num_rows_per_block=cfg.embed_batch_size * 4)
    ds = ds.map_batches(Embedder, fn_constructor_kwargs={"model": cfg.clip_model, "pretrained": cfg.clip_pretrained,
                                                          "use_gpu": cfg.num_gpus > 0, "shifts": clip["embed_shifts"]},
                        batch_size=cfg.embed_batch_size, compute=ActorPoolStrategy(size=cfg.embed_concurrency),
                        num_cpus=pool_actor_cpus(cfg.embed_concurrency),
                        num_gpus=cfg.num_gpus, batch_format="pandas")
    dim = meta.get("dim") or embedding_dim(cfg)
    db, schema = lancedb.connect(cfg.output), entry_schema(dim)
    table = db.open_table(TABLE) if meta["rows"] else db.create_table(TABLE, schema=schema, mode="overwrite")
    # Appended from the driver as the actors finish batches: Ray 2.60's write_lance passes an argument
    # (storage_options_provider) that no released pylance accepts (docs/NOTES.md).
    with progress_bar(desc="index entries", unit="entry") as bar:
        for batch in ds.iter_batches(batch_size=cfg.embed_batch_size * 4, batch_format="pyarrow"):
            if batch.num_rows:
                table.add(batch.select(schema.names).cast(schema))
                bar.update(batch.num_rows)
    rows = table.count_rows()
    meta.update(files=sorted(seen | set(new)), rows=rows, dim=dim,
                indexed_vectors=create_indexes(table, cfg.index_min_rows))
    storage.write_bytes(storage.join(cfg.output, META), json.dumps(meta, indent=2).encode())  # last: the KB is whole
    return meta


def create_indexes(table, min_rows: int) -> bool:
    """Full-text index on the captions; IVF-PQ on both embeddings from ``min_rows`` rows on (below,
    LanceDB's exact scan is faster). Returns whether the vector indexes exist."""
    from lancedb.index import FTS

    table.create_index("caption", config=FTS(), replace=True)
    if table.count_rows() < min_rows:
        return False
    for column in ("image_emb", "text_emb"):
        table.create_index(metric="cosine", vector_column_name=column, replace=True)
    return True


def embedding_dim(cfg: IndexConfig) -> int:
    from ..data.clip import embed_texts, load_clip

    clip, _ = load_clip(cfg.clip_model, cfg.clip_pretrained, "cpu")
    return int(embed_texts(clip, ["a"], cfg.clip_model, "cpu").shape[1])
