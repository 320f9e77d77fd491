"""Stage 3, apprenticeship: per ICL cluster, a DreamBooth expert draws its subject for new prompts,
CLIP keeps the good drawings, and (real demos -> expert target) pairs become ICL-V2 examples.

    ICL clusters (kept rows) -> one actor call per cluster, bounded in flight:
        check photos and captions (a reason for every skip) -> class word -> new prompts (5 skills)
        -> DreamBooth expert on the photos -> candidates per prompt -> CLIP-I / CLIP-T -> keep
        -> examples/<cluster>.parquet (ICL-V2) + status/<cluster>.json, each written atomically
    -> stats.json (keep rate per skill, skips per reason, seconds per cluster)

A cluster is finished when its status file exists: a rerun skips it, a killed actor is restarted
and its call retried, and no file is ever half-written, so an interrupted run plus a rerun equals a
clean run. Seeds come from the cluster id, so results do not depend on scheduling. --clusters and
--output may be local paths or URIs (s3://...): every read and write goes through utils.storage.

    ray job submit -- python jobs/apprentice.py --clusters runs/clusters/clusters --output runs/apprentice
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..schemas import ICL_V2_SCHEMA
from ..utils import storage
from ..utils.images import encode_png, inspect_image
from .dreambooth import DreamBoothConfig

STOPWORDS = frozenset("a an the of in on at to with and or for from by its it is as this that photo image picture "
                      "my our your his her their small large big".split())


@dataclass(frozen=True)
class ApprenticeConfig:
    clusters: str = field(default="runs/clusters/clusters", metadata={"help": "ICL-cluster Parquet (build-dataset output)"})
    output: str = field(default="runs/apprentice", metadata={"help": "output folder: examples/, status/, stats.json"})
    checkpoint: str = field(default="checkpoints/tiny-32.safetensors", metadata={"help": "base model (demos unused)"})
    prompt_writer: str = field(default="world", metadata={"help": "world, templates, or a causal-LM folder (path or URI)"})
    prompts_per_cluster: int = field(default=4, metadata={"help": "new prompts per cluster"})
    candidates_per_prompt: int = field(default=2, metadata={"help": "expert drawings per prompt"})
    max_demos: int = field(default=3, metadata={"help": "cluster photos stored as demos per example"})
    min_images: int = field(default=2, metadata={"help": "clusters with fewer readable photos are skipped"})
    clip_model: str = field(default="tiny", metadata={"help": "tiny or an open_clip model name"})
    clip_pretrained: str = field(default="checkpoints/tiny-clip.safetensors", metadata={"help": "CLIP weights"})
    clip_i_threshold: float = field(default=0.6, metadata={"help": "keep candidates whose mean CLIP-I to the photos is at least"})
    clip_t_threshold: float = field(default=-1.0, metadata={"help": "and whose CLIP-T to the prompt is at least (-1: off)"})
    keep_rejected: bool = field(default=False, metadata={"help": "also write rejected candidates to rejected/ (audits, bench)"})
    concurrency: int = field(default=2, metadata={"help": "expert actors"})
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per expert actor"})
    max_clusters: int = field(default=0, metadata={"help": "stop after this many clusters (0: all)"})
    dreambooth_steps: int = field(default=150, metadata={"help": "fine-tuning steps per expert"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank"})
    full_finetune: bool = field(default=False, metadata={"help": "full UNet fine-tune instead of LoRA"})
    prior_preservation: bool = field(default=False, metadata={"help": "class-prior preservation loss"})
    sample_steps: int = field(default=25, metadata={"help": "sampling steps of the experts"})
    seed: int = field(default=0, metadata={"help": "seed (mixed with each cluster id)"})

    def __post_init__(self):
        if self.prompts_per_cluster < 1 or self.candidates_per_prompt < 1 or self.concurrency < 1:
            raise ValueError("prompts_per_cluster, candidates_per_prompt and concurrency must be positive")
        if self.min_images < 2:
            raise ValueError("min_images must be at least 2 (an expert needs photos to learn from)")

    def dreambooth(self) -> DreamBoothConfig:
        return DreamBoothConfig(steps=self.dreambooth_steps, lora_rank=self.lora_rank, full_finetune=self.full_finetune,
                                prior_preservation=self.prior_preservation, sample_steps=self.sample_steps)


def safe_name(cluster_id: str) -> str:
    """A cluster id as a file name: kept when plainly safe, else hashed (no input becomes a path)."""
    if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cluster_id or ""):
        return cluster_id
    return "h" + hashlib.sha1(str(cluster_id).encode()).hexdigest()[:24]


def cluster_seed(cfg: ApprenticeConfig, cluster_id: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{cfg.seed}:{cluster_id}".encode()).digest()[:4], "little")


def infer_class_word(captions: list[str], ignore: frozenset = frozenset()) -> str:
    """The cluster's most frequent caption word that is neither a stop word nor context vocabulary."""
    counts = Counter(w for c in captions for w in re.findall(r"[a-z]+", str(c).lower())
                     if w not in STOPWORDS and w not in ignore and len(w) > 2)
    return counts.most_common(1)[0][0] if counts else "object"


def remove_stale_temporaries(output: str) -> int:
    """Temporaries of local writes cut short by a kill (object stores leave none)."""
    fs, files = storage.list_files(output, "")
    stale = [f for f in files if re.fullmatch(r"\..+\.tmp\d+", f.rsplit("/", 1)[-1])]
    for path in stale:
        fs.delete_file(path)
    return len(stale)


def _parquet_bytes(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=ICL_V2_SCHEMA), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


class ExpertWorker:
    """Ray actor: the base model, CLIP and prompt writer loaded once; ``run`` handles one cluster."""

    def __init__(self, cfg: ApprenticeConfig):
        import torch

        from ..data.clip import load_clip
        from ..model.pipeline import load_pipeline
        from ..world.contexts import VOCABULARY
        from .prompts import make_prompt_writer

        torch.set_num_threads(1)
        self.cfg, self.device = cfg, "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(cfg.checkpoint).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.clip, self.clip_size = load_clip(cfg.clip_model, cfg.clip_pretrained, self.device)
        self.writer = make_prompt_writer(cfg.prompt_writer)
        self.ignore = VOCABULARY if cfg.prompt_writer == "world" else frozenset()

    def run(self, cluster: dict) -> dict:
        cfg, name, t0 = self.cfg, safe_name(cluster["cluster_id"]), time.time()
        status = {"cluster_id": cluster["cluster_id"], "file": name, "status": "skipped", "reason": "",
                  "unreadable_images": 0, "candidates": [], "seconds": 0.0}
        photos, captions = [], []
        for data, caption in zip(cluster.get("images") or [], cluster.get("captions") or []):
            img, reason = inspect_image(data)
            if reason:
                status["unreadable_images"] += 1
            else:
                photos.append(img.convert("RGB"))
                captions.append(str(caption or ""))
        if len(photos) < cfg.min_images:
            status["reason"] = "too_few_images"
        else:
            self._apprentice(cluster["cluster_id"], name, photos, captions, status)
        status["seconds"] = round(time.time() - t0, 2)
        storage.write_bytes(storage.join(cfg.output, "status", f"{name}.json"), json.dumps(status, sort_keys=True).encode())
        return {k: v for k, v in status.items() if k != "candidates"}

    def _apprentice(self, cluster_id: str, name: str, photos: list, captions: list[str], status: dict) -> None:
        from ..data.clip import default_shifts, embed_images, embed_texts
        from .dreambooth import dreambooth_expert

        cfg, seed = self.cfg, cluster_seed(self.cfg, cluster_id)
        rng = np.random.default_rng(seed)
        class_word = infer_class_word(captions, self.ignore)
        prompts = [p for p in self.writer.write(class_word, captions, cfg.prompts_per_cluster, rng) if p.text.strip()]
        if not prompts:
            status["reason"] = "no_prompts"
            return
        db = DreamBoothConfig(**{**asdict(cfg.dreambooth()), "seed": seed % 2**31})
        with dreambooth_expert(self.pipe, photos, captions, class_word, db) as expert:
            drawn = expert.sample([p.text for p in prompts], seed % 2**31, cfg.candidates_per_prompt)  # (P*C, H, W, 3)
        images = [np.round(d * 255).astype(np.uint8) for d in drawn]
        from PIL import Image

        shifts = default_shifts(cfg.clip_model)  # as the builder embeds
        real = embed_images(self.clip, photos, self.clip_size, self.device, shifts)
        fake = embed_images(self.clip, [Image.fromarray(i) for i in images], self.clip_size, self.device, shifts)
        texts = embed_texts(self.clip, [p.text for p in prompts], self.cfg.clip_model, self.device)
        clip_i = (fake @ real.T).mean(1)
        clip_t = (fake * np.repeat(texts, cfg.candidates_per_prompt, 0)).sum(1)
        keep = (clip_i >= cfg.clip_i_threshold) & (clip_t >= cfg.clip_t_threshold)
        demos = [encode_png(np.asarray(p)) for p in photos[: cfg.max_demos]]
        expert_id = f"dreambooth-{'full' if cfg.full_finetune else 'lora'}:{cluster_id}"
        rows = {True: [], False: []}
        for j, image in enumerate(images):
            p = prompts[j // cfg.candidates_per_prompt]
            rows[bool(keep[j])].append({
                "example_id": f"{name}-{j:03d}", "cluster_id": cluster_id, "demo_images": demos,
                "demo_captions": captions[: cfg.max_demos], "target_image": encode_png(image),
                "target_prompt": p.text, "skills": list(p.skills), "clip_i": float(clip_i[j]),
                "clip_t": float(clip_t[j]), "expert": expert_id})
            status["candidates"].append({"example_id": f"{name}-{j:03d}", "prompt": p.text, "skills": list(p.skills),
                                         "context": p.context, "clip_i": round(float(clip_i[j]), 5),
                                         "clip_t": round(float(clip_t[j]), 5), "kept": bool(keep[j])})
        for kept, folder in ((True, "examples"), (False, "rejected")):
            if rows[kept] and (kept or cfg.keep_rejected):
                storage.write_bytes(storage.join(cfg.output, folder, f"{name}.parquet"), _parquet_bytes(rows[kept]))
        status.update(status="done", class_word=class_word)


def iter_clusters(path: str, max_clusters: int = 0):
    """Kept cluster rows, streamed a record batch at a time (never the whole folder in memory)."""
    if storage.is_dir(path):
        fs, files = storage.list_files(path, ".parquet")
        files = [f for f in files if not f.rsplit("/", 1)[-1].startswith(".")]
    else:
        fs, one = storage.resolve(path)
        files = [one] if storage.is_file(path) else []
    if not files:
        raise FileNotFoundError(f"no ICL-cluster Parquet files in {path}")
    n = 0
    for f in files:
        try:
            pf = pq.ParquetFile(fs.open_input_file(f))
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise ValueError(f"{f}: not a readable Parquet file ({e})") from e
        missing = {"cluster_id", "images", "captions"} - set(pf.schema_arrow.names)
        if missing:
            raise ValueError(f"{f}: missing ICL-cluster columns {sorted(missing)}")
        cols = ["cluster_id", "images", "captions"] + (["kept"] if "kept" in pf.schema_arrow.names else [])
        for batch in pf.iter_batches(batch_size=64, columns=cols):
            for row in batch.to_pylist():
                if row.get("kept", True):
                    yield row
                    n += 1
                    if max_clusters and n >= max_clusters:
                        return


def check_inputs(cfg: ApprenticeConfig) -> None:
    """Fails in the driver, naming the path: an actor whose constructor fails would be restarted forever."""
    from ..model.loading import resolve_checkpoint

    resolve_checkpoint(cfg.checkpoint)
    if cfg.clip_model == "tiny" and cfg.clip_pretrained and not storage.is_file(cfg.clip_pretrained):
        raise FileNotFoundError(f"--clip-pretrained {cfg.clip_pretrained!r} not found (train one: ray-suti train-clip)")
    if cfg.prompt_writer not in ("world", "templates") and not storage.is_dir(cfg.prompt_writer):
        raise ValueError(f"--prompt-writer must be world, templates or a model folder (path or URI), got {cfg.prompt_writer!r}")


def run_apprentice(cfg: ApprenticeConfig, progress: bool = True) -> dict:
    import ray
    from ..utils.progress import bar as progress_bar

    from ..utils.ray_utils import init_ray

    check_inputs(cfg)
    next(iter_clusters(cfg.clusters), None)  # a bad first file fails here, before any actor starts
    init_ray()
    remove_stale_temporaries(cfg.output)  # left by a run killed mid-write
    done = {p.rsplit("/", 1)[-1][:-5] for p in storage.list_files(storage.join(cfg.output, "status"), ".json")[1]}
    actor = ray.remote(num_cpus=1, num_gpus=cfg.num_gpus, max_restarts=-1, max_task_retries=3)(ExpertWorker)
    workers, pending, idle, skipped_done = [], {}, [], 0
    bar = progress_bar(total=cfg.max_clusters or None, desc="apprentice clusters", unit="cluster", disable=not progress)

    failed = []

    def collect(block: bool) -> None:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=None if block else 0)
        for ref in ready:
            idle.append(pending.pop(ref))
            try:
                ray.get(ref)  # a killed actor's call was retried already; this is an error in the cluster itself
            except ray.exceptions.RayTaskError as e:
                failed.append(str(e).strip().splitlines()[-1][:300])  # no status file: a rerun tries it again
            bar.update(1)

    def free_worker():
        """An idle expert, a new one while fewer than ``concurrency`` run (none for a run with nothing left)."""
        if not idle and len(workers) < cfg.concurrency:
            workers.append(actor.remote(cfg))
            return workers[-1]
        while not idle:
            collect(block=True)
        return idle.pop()

    try:
        for row in iter_clusters(cfg.clusters, cfg.max_clusters):
            if safe_name(row["cluster_id"]) in done:
                skipped_done += 1
                continue
            worker = free_worker()
            pending[worker.run.remote(row)] = worker
        while pending:
            collect(block=True)
    finally:
        # Stopped by their handles, at once: left to the garbage collector, an expert whose handle went
        # out of scope while it was still loading its model kept its process, and its CPU, for good.
        for worker in workers:
            ray.kill(worker)
    bar.close()
    stats = summarize(cfg.output)
    stats.update(clusters_already_done=skipped_done, clusters_failed=len(failed), failures=failed[:20])
    storage.write_bytes(storage.join(cfg.output, "stats.json"), json.dumps(stats, indent=2, sort_keys=True).encode())
    return stats


def summarize(output: str) -> dict:
    fs, files = storage.list_files(storage.join(output, "status"), ".json")
    statuses = []
    for path in files:
        with fs.open_input_stream(path) as f:
            statuses.append(json.loads(f.read()))
    done = [s for s in statuses if s["status"] == "done"]
    cands = [c for s in done for c in s["candidates"]]
    per_skill = {}
    for c in cands:
        for skill in c["skills"]:
            d = per_skill.setdefault(skill, {"candidates": 0, "kept": 0})
            d["candidates"] += 1
            d["kept"] += c["kept"]
    for d in per_skill.values():
        d["keep_rate"] = round(d["kept"] / d["candidates"], 4)
    return {
        "clusters": len(statuses), "clusters_done": len(done),
        "clusters_skipped": dict(Counter(s["reason"] for s in statuses if s["status"] != "done")),
        "unreadable_images": sum(s["unreadable_images"] for s in statuses),
        "candidates": len(cands), "kept": sum(c["kept"] for c in cands),
        "keep_rate": round(sum(c["kept"] for c in cands) / max(1, len(cands)), 4), "per_skill": per_skill,
        "seconds_per_cluster": round(float(np.mean([s["seconds"] for s in done])), 2) if done else None,
    }
