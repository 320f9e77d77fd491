"""Oracle ICL-V2 examples: the world's renderer plays a perfect expert.

An explicit, labelled stand-in for the apprenticeship stage (``expert = "oracle-renderer"``): the
demos are photos of a train subject in ordinary scenes, the target shows the same subject in a new
context whose scene differs from every demo's, so copying a demo never pays.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..schemas import ICL_V2_SCHEMA
from ..utils.images import encode_png
from .contexts import Context, sample_context
from .controls import controls_of
from .render import render
from .subjects import Subject, train_seed

DEMO_SKILLS = {"recontext": 1.0, "stylize": 0.0, "recolor": 0.0, "view": 0.0, "accessorize": 0.0}
ORACLE_EXPERT = "oracle-renderer"


@dataclass(frozen=True)
class OracleConfig:
    out: str = field(default="runs/oracle", metadata={"help": "output folder of ICL-V2 Parquet shards"})
    examples: int = field(default=20000, metadata={"help": "number of examples"})
    seed: int = field(default=0, metadata={"help": "same seed, same bytes"})
    image_size: int = field(default=32, metadata={"help": "image size in px (32, 64 or 128)"})
    num_demos: int = field(default=3, metadata={"help": "demos per example"})
    demo_jitter: float = field(default=0.03, metadata={"help": "position/scale jitter of demo photos"})
    target_jitter: float = field(default=0.0, metadata={"help": "position/scale jitter of targets (boxes then matter)"})
    examples_per_shard: int = field(default=1000, metadata={"help": "examples per Parquet shard"})
    max_in_flight: int = field(default=2, metadata={"help": "shard tasks at once"})


def draw_case(rng: np.random.Generator, num_demos: int, demo_jitter: float = 0.0,
              target_jitter: float = 0.0) -> tuple[list[Context], Context]:
    """Demo contexts (ordinary scenes) and a target context in a scene none of them shows."""
    demos = [sample_context(rng, DEMO_SKILLS, jitter=demo_jitter) for _ in range(num_demos)]
    scenes = {d.scene for d in demos}
    while True:
        target = sample_context(rng, jitter=target_jitter)
        if target.scene not in scenes and all(target != d.on_grid() for d in demos):
            return demos, target


def oracle_example(cfg: OracleConfig, index: int, subject_seed: int | None = None) -> dict:
    rng = np.random.default_rng([cfg.seed, 0x1C1, index])
    seed = train_seed(rng) if subject_seed is None else subject_seed
    word = Subject.from_seed(seed).class_word
    demos, target = draw_case(rng, cfg.num_demos, cfg.demo_jitter, cfg.target_jitter)
    image, mask = render(seed, target, cfg.image_size)
    controls = controls_of(seed, target, cfg.image_size, mask)
    return {
        "example_id": f"oracle-{cfg.seed}-{index:08d}", "cluster_id": f"subject-{seed}",
        "demo_images": [encode_png(render(seed, c, cfg.image_size)[0]) for c in demos],
        "demo_captions": [c.prompt(word) for c in demos],
        "target_image": encode_png(image),
        "target_prompt": target.prompt(word), "skills": target.skills,
        "clip_i": None, "clip_t": None, "expert": ORACLE_EXPERT,
        "target_box": controls["box"].tolist(), "target_keypoints": controls["keypoints"].ravel().tolist(),
        "target_edges": encode_png(np.round(controls["edges"] * 255).astype(np.uint8)),
    }


def write_oracle_shard(cfg: OracleConfig, shard: int) -> dict:
    first = shard * cfg.examples_per_shard
    rows = [oracle_example(cfg, i) for i in range(first, min(first + cfg.examples_per_shard, cfg.examples))]
    path = os.path.join(cfg.out, f"part-{shard:05d}.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=ICL_V2_SCHEMA), path + ".tmp", compression="zstd")
    os.replace(path + ".tmp", path)
    return {"examples": len(rows)}


def write_oracle(cfg: OracleConfig, progress: bool = True) -> int:
    from ..utils.ray_utils import run_sharded

    os.makedirs(cfg.out, exist_ok=True)
    n_shards = -(-cfg.examples // cfg.examples_per_shard)
    parts = run_sharded(write_oracle_shard, [(cfg, s) for s in range(n_shards)], cfg.max_in_flight,
                        "oracle examples", unit_key="examples", total=cfg.examples, progress=progress)
    return sum(p["examples"] for p in parts)


def oracle_cluster(subject_seed: int, num_photos: int = 4, image_size: int = 32, seed: int = 0) -> dict:
    """An ICL-cluster row (stage 1's contract) of one subject in ordinary scenes: what a perfect
    dataset builder would keep, for testing and measuring the apprenticeship stage on its own."""
    rng = np.random.default_rng([seed, 0xC1, subject_seed])
    word = Subject.from_seed(subject_seed).class_word
    contexts = [sample_context(rng, DEMO_SKILLS, jitter=0.03) for _ in range(num_photos)]
    return {
        "cluster_id": f"subject-{subject_seed}", "page_url": f"world://subject/{subject_seed}", "kept": True,
        "drop_reason": "", "keys": [f"{subject_seed}-{i}" for i in range(num_photos)],
        "images": [encode_png(render(subject_seed, c, image_size)[0]) for c in contexts],
        "captions": [c.prompt(word) for c in contexts], "embeddings": [[] for _ in contexts],
        "n_records": num_photos, "n_images": num_photos, "duplicates_removed": 0, "mean_sim": None,
        "min_sim": None, "max_sim": None, "record_reasons": "{}",
    }
