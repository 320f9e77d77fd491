"""Knowledge base at scale: index build throughput with 1 vs 2 embedding actors, and query latency
p50/p99 at 10k and 100k entries, in one run.

    OMP_NUM_THREADS=1 RAY_AUTH_MODE=disabled .venv/bin/python bench/kb_scale.py [--pages 300 --queries 200]

1. A synthetic crawl of ``--pages`` pages is indexed by the real job (``run_index``: Ray Data reads,
   an actor pool embeds with the committed tiny CLIP, LanceDB stores) twice, with 1 and with 2
   actors: records/s of the whole job, wall clock.
2. The 1-actor KB's entries are tiled to 10k and 100k (each copy its own page, its embeddings moved
   by a little noise, the same caption and image bytes), indexed as ``run_index`` indexes (full-text
   on captions, IVF-PQ on both embeddings from ``index_min_rows``), and ``KnowledgeBase.search`` is
   timed on ``--queries`` prompts: the crawl's captions, plus made-up names. The same searches with
   the vector index bypassed (exact scan) give the share of queries whose best page the index keeps.
"""
import argparse
import glob
import json
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa


def index_throughput(crawl: str, work: str, actors: int) -> dict:
    from ray_suti.knowledge import IndexConfig, run_index

    out = os.path.join(work, f"kb-{actors}")
    start = time.perf_counter()
    meta = run_index(IndexConfig(input=crawl, output=out, embed_concurrency=max(actors, 1)))
    seconds = time.perf_counter() - start
    return {"actors": actors, "records": meta["rows"], "seconds": round(seconds, 2),
            "records_per_s": round(meta["rows"] / seconds, 1), "kb": out}


def tiled_kb(source: str, out: str, rows: int, seed: int = 0) -> str:
    """A KB of ``rows`` entries: copies of ``source``'s, each copy a new page with jittered embeddings."""
    import lancedb

    from ray_suti.knowledge.index import META, TABLE, create_indexes, read_meta

    base = lancedb.connect(source).open_table(TABLE).to_arrow()
    rng = np.random.default_rng(seed)
    db = lancedb.connect(out)
    table = db.create_table(TABLE, schema=base.schema, mode="overwrite")
    copies = -(-rows // base.num_rows)
    for c in range(copies):
        part = base.slice(0, min(base.num_rows, rows - c * base.num_rows))
        columns = {"id": pa.array([f"{i}#{c}" for i in part["id"].to_pylist()]),
                   "page": pa.array([f"{p}#{c}" for p in part["page"].to_pylist()])}
        for name in ("image_emb", "text_emb"):
            emb = np.stack(part[name].to_numpy(zero_copy_only=False))
            emb = emb + (0.05 * rng.standard_normal(emb.shape) if c else 0)
            emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
            columns[name] = pa.FixedSizeListArray.from_arrays(emb.ravel(), emb.shape[1])
        table.add(pa.table({n: columns.get(n, part[n]) for n in base.schema.names}).cast(base.schema))
    meta = read_meta(source)
    start = time.perf_counter()
    meta.update(rows=table.count_rows(), indexed_vectors=create_indexes(table, min_rows=10_000))
    meta["index_seconds"] = round(time.perf_counter() - start, 2)
    with open(os.path.join(out, META), "w") as f:
        json.dump(meta, f)
    return out


def query_latency(kb_path: str, prompts: list[str]) -> dict:
    from ray_suti.knowledge import KnowledgeBase

    kb, exact = KnowledgeBase(kb_path), KnowledgeBase(kb_path, exact=True)
    kb.search(prompts[0])  # loads CLIP
    seconds, same_page = [], 0
    for prompt in prompts:
        start = time.perf_counter()
        found = kb.search(prompt, k=3)
        seconds.append(time.perf_counter() - start)
        same_page += found[0].page == exact.search(prompt, k=3)[0].page
    ms = np.asarray(seconds) * 1000
    return {"entries": len(kb), "vector_index": kb.meta["indexed_vectors"], "index_build_s": kb.meta["index_seconds"],
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "best_page_as_exact": round(same_page / len(prompts), 3), "queries": len(prompts)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=600, help="pages of the crawl indexed for throughput")
    parser.add_argument("--sizes", default="10000,100000", help="KB sizes for query latency")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", default="docs/results/kb-scale.json")
    args = parser.parse_args()

    from ray_suti.utils.ray_utils import init_ray
    from ray_suti.world.catalogue import made_up_names
    from ray_suti.world.crawl import WorldConfig, generate_world

    work = tempfile.mkdtemp(prefix="kb-scale-")
    try:
        init_ray()
        generate_world(WorldConfig(out=os.path.join(work, "world"), pages=args.pages, preview_pages=0))
        crawl = os.path.join(work, "world", "web")
        index_throughput(sorted(glob.glob(os.path.join(crawl, "*.parquet")))[0], work, 0)  # warm-up: imports, CLIP file
        build = [index_throughput(crawl, work, actors) for actors in (1, 2)]
        import lancedb

        captions = [c for c in lancedb.connect(build[0]["kb"]).open_table("entries").to_arrow()["caption"].to_pylist()
                    if len(c) > 12]
        rng = np.random.default_rng(0)
        prompts = [str(c) for c in rng.choice(captions, args.queries - args.queries // 4)]
        prompts += [f"a {name} mug on the beach" for name in made_up_names(args.queries // 4)]
        queries = [query_latency(tiled_kb(build[0]["kb"], os.path.join(work, f"kb-{n}"), n), prompts)
                   for n in map(int, args.sizes.split(","))]
        results = {"config": vars(args), "cpus": os.cpu_count(),
                   "build": [{k: v for k, v in b.items() if k != "kb"} for b in build],
                   "build_2_vs_1_actors": round(build[1]["records_per_s"] / build[0]["records_per_s"], 2),
                   "query": queries}
        print(json.dumps(results, indent=1))
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
