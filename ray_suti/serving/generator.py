"""The model deployment: one pipeline per replica, batched requests, and a cache of demo features.

Concurrent requests are batched (``batcher.Batcher``: a batch is cut when the sampler is free);
every row of a batch attends only to its own subject's demos, and each image's noise comes from its
request's seed, so an image does not depend on what it was batched with. A job whose subject vanished, whose stored photos cannot be read, or
whose controls the checkpoint lacks fails alone; the rest of its batch is drawn. Denoising runs in a
thread, off the replica's event loop. A batch is cut into denoising loops of at most
``max_batch_rows`` UNet rows (images x guidance branches), so memory per loop is bounded.

``generate_stream`` streams: a job that asks for ``progress`` receives ``{"step", "steps"}`` events
while its loop runs (the web page's progress bar), then, like every job, one result
``{"status", ...}``; ``generate`` answers the result alone (no stream to pay for).
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from ray import serve

from ..utils.images import encode_png
from .batcher import Batcher
from .schemas import CONTROLS
from .store import SubjectError, SubjectStore


def job_rows(job: dict) -> int:
    """UNet rows a job adds to a denoising loop: its images times the guidance branches."""
    return job["num_images"] * (2 if job.get("guidance_mode") == "interleaved" else 3)


class FeatureCache:
    """Demo features of recently used subjects, least recently used out first, bounded by bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes, self.entries = max_bytes, 0, OrderedDict()

    @staticmethod
    def size(feats) -> int:
        return sum(t.numel() * t.element_size() for t in feats.tokens.values()) + feats.valid.numel()

    def get(self, key):
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        return None

    def put(self, key, feats) -> None:
        self.pop(key)
        self.entries[key] = feats
        self.bytes += self.size(feats)
        while self.bytes > self.max_bytes and self.entries:
            self.pop(next(iter(self.entries)))

    def pop(self, key) -> None:
        if key in self.entries:
            self.bytes -= self.size(self.entries.pop(key))


@serve.deployment(name="Generator")
class Generator:
    """One replica: the pipeline, and the demo features of recently used subjects."""

    def __init__(self, checkpoint: str, store: dict, cache_bytes: int = 256 * 1024**2, use_gpu: bool = False,
                 max_batch_size: int = 8, scheduler: str = "ddim", max_batch_rows: int = 48, dtype: str = "fp32",
                 warmup: bool = True, knowledge_base: str | None = None):
        import torch
        from PIL import Image

        from ..model.loading import torch_dtype
        from ..model.pipeline import load_pipeline
        from ..utils.storage import content_id

        torch.set_num_threads(1)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(checkpoint).set_scheduler(scheduler).to(self.device)
        if dtype != "fp32":  # as loaded otherwise (a cast to fp32 would warn about modules kept in fp32)
            self.pipe.to(torch_dtype(dtype))
        self.pipe.set_progress_bar_config(disable=True)
        if warmup:  # the first request should not pay for lazy initialisation (kernels, allocators, caches)
            self.pipe("warm-up", [Image.new("RGB", (64, 64), "gray")], num_inference_steps=2, output_type="np")
        self.store = SubjectStore(**store)
        self.cache, self.checkpoint, self.max_batch_rows = FeatureCache(cache_bytes), checkpoint, max_batch_rows
        self.checkpoint_id = content_id(checkpoint)
        self.stats = {"feature_hits": 0, "feature_misses": 0, "batches": 0, "rows": 0}
        self.metrics = replica_metrics()
        self.knowledge_base, self.kbs = knowledge_base, {}  # a KB uri ("{tenant}" in it: one per tenant), opened once
        self.batcher = Batcher(self.run_batch, max_batch_size)  # 1 turns batching off (bench/serve_load.py)

    def features(self, tenant: str, subject_id: str):
        """Cached DemoFeatures of a stored subject; None when it is not (or no longer) stored;
        SubjectError when its stored photos cannot be read."""
        if not self.store.exists(tenant, subject_id):
            self.cache.pop(subject_id)  # ids are per tenant: the id alone is the key
            return None
        feats = self.cache.get(subject_id)
        if feats is not None:
            self.stats["feature_hits"] += 1
            self.metrics["cache"].inc(tags={"result": "hit"})
            return feats
        self.stats["feature_misses"] += 1
        self.metrics["cache"].inc(tags={"result": "miss"})
        stored = self.store.get(tenant, subject_id)
        if stored is None:
            return None
        feats = self.pipe.encode_subject(*stored)
        self.cache.put(subject_id, feats)
        return feats

    def retrieve(self, job: dict):
        """(demo features, {"neighbours", "retrieval_s"}) from the tenant's knowledge base (Re-Imagen)."""
        from ..knowledge import KnowledgeBase

        if not self.knowledge_base:
            raise LookupError("this deployment has no knowledge base: register photos, or send them")
        uri = self.knowledge_base.replace("{tenant}", job["tenant"])
        t0 = time.perf_counter()
        if uri not in self.kbs:
            try:
                self.kbs[uri] = KnowledgeBase(uri, device=self.device)
            except FileNotFoundError:
                raise LookupError("no knowledge base has been built for this tenant") from None
        found = self.kbs[uri].search(job["prompt"], job["retrieve"]["k"])
        if not found:
            raise LookupError("the knowledge base is empty")
        feats = self.pipe.encode_subject([n.image for n in found], [n.caption for n in found])
        return feats, {"neighbours": [n.describe() for n in found], "retrieval_s": time.perf_counter() - t0}

    def info(self) -> dict:
        return {"preset": self.pipe.suti_config.name, "checkpoint": self.checkpoint, "checkpoint_id": self.checkpoint_id,
                "dtype": str(self.pipe.dtype).removeprefix("torch."), "device": self.device,
                "controls": list(self.pipe.controls), "scheduler": type(self.pipe.scheduler).__name__,
                "knowledge_base": bool(self.knowledge_base),
                "cache_entries": len(self.cache.entries), "cache_bytes": self.cache.bytes, **self.stats}

    async def generate(self, job: dict) -> dict:
        """The job's result."""
        async for item in self.generate_stream(job):  # one item: the job asks for no progress
            result = item
        return result

    async def generate_stream(self, job: dict):
        """Progress events (when the job asks), then its result. Both methods feed the same batches."""
        if not await asyncio.to_thread(Attempts.start, job["id"]):
            yield {"status": 503, "detail": f"this request stopped the {Attempts.MAX} replicas that drew it "
                                            "(a crash or an out-of-memory kill): it is not drawn again"}
            return
        async for item in self.batcher.submit(job, progress=bool(job.get("progress"))):
            yield item
        await asyncio.to_thread(Attempts.end, job["id"])

    def run_batch(self, jobs: list[dict], report=None) -> list[dict]:
        """Jobs with the same sampling settings share denoising loops; a failing job fails alone.
        ``report(members, step, steps)`` hears each step of each loop."""
        from ..model.inputs import SuTIInputError

        results: list[dict | None] = [None] * len(jobs)
        feats: list = [None] * len(jobs)
        retrieved: list = [None] * len(jobs)
        for i, job in enumerate(jobs):
            try:  # a control this checkpoint lacks, or an unreadable edge map, fails this job only
                self.pipe.prepare_controls(1, **{c: job.get(c) for c in CONTROLS})
                if job.get("retrieve"):
                    feats[i], retrieved[i] = self.retrieve(job)
                elif job.get("subject_id"):
                    feats[i] = self.features(job["tenant"], job["subject_id"])
                else:
                    feats[i] = self.pipe.encode_subject(job["photos"], job.get("captions"))
                if feats[i] is None:
                    results[i] = {"status": 404, "detail": "unknown subject_id"}
            except LookupError as e:  # no knowledge base here, or nothing in it
                results[i] = {"status": 422, "detail": str(e.args[0])}
            except SubjectError as e:
                results[i] = {"status": 422, "detail": f"{e}: register the photos again"}
            except SuTIInputError as e:
                results[i] = {"status": 422, "detail": str(e)}
        groups: dict = {}
        for i, job in enumerate(jobs):
            if results[i] is None:
                key = (job["steps"], job["guidance_text"], job["guidance_subject"], job.get("guidance_mode", "branches"))
                groups.setdefault(key, []).append(i)
        for settings, members in groups.items():
            for chunk in self._chunks(members, jobs):
                for i, images, seconds in self._sample([jobs[i] for i in chunk], [feats[i] for i in chunk],
                                                       settings, chunk, report):
                    results[i] = {"status": 200, "images": images, "seconds": seconds, "batch_rows": len(chunk),
                                  **(retrieved[i] or {})}
        self.metrics["batch_rows"].observe(len(jobs))
        self.stats["batches"] += 1
        self.stats["rows"] += len(jobs)
        return results

    def _chunks(self, members: list[int], jobs: list[dict]):
        chunk, rows = [], 0
        for i in members:
            if chunk and rows + job_rows(jobs[i]) > self.max_batch_rows:
                yield chunk
                chunk, rows = [], 0
            chunk.append(i)
            rows += job_rows(jobs[i])
        if chunk:
            yield chunk

    def _sample(self, jobs, feats, settings, indices, report=None):
        import torch

        from ..model.layers import DemoFeatures

        t0 = time.perf_counter()
        k = max(f.valid.shape[1] for f in feats)
        demos = DemoFeatures.cat([pad_demos(f, k).repeat(job["num_images"]) for f, job in zip(feats, jobs)])
        prompts = [job["prompt"] for job in jobs for _ in range(job["num_images"])]
        generators = [torch.Generator(self.device).manual_seed(job["seed"] + n)
                      for job in jobs for n in range(job["num_images"])]
        controls = {}  # one value (or None) per row; a row without a control gets exactly nothing added
        for c in CONTROLS:
            rows = [job.get(c) for job in jobs for _ in range(job["num_images"])]
            controls[c] = rows if any(v is not None for v in rows) else None
        steps, g_text, g_subject, mode = settings
        on_step = None if report is None else (lambda pipe, i, t, tensors: report(indices, i + 1, steps) or {})
        out = self.pipe(prompts, demos, num_inference_steps=steps, guidance_scale_text=g_text,
                        guidance_scale_subject=g_subject, guidance_mode=mode, generator=generators, output_type="np",
                        callback_on_step_end=on_step, **controls).images
        seconds = time.perf_counter() - t0
        self.metrics["sampling_s"].observe(seconds)
        start = 0
        for i, job in zip(indices, jobs):
            yield i, [encode_png((a * 255).round().astype("uint8")) for a in out[start: start + job["num_images"]]], seconds
            start += job["num_images"]


class Attempts:
    """How many replicas started a request, across replicas (Ray's internal KV, in the GCS). A
    replica that dies while drawing never calls ``end``, so a request that kills replicas (a
    segfault, an out-of-memory kill) is drawn at most ``MAX`` times, whoever retries it: the ingress
    once, and Serve's router when a replica dies before confirming it took the request."""

    MAX = 2

    @staticmethod
    def start(job_id: str) -> bool:
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

        key = f"attempts/{job_id}"
        started = int(_internal_kv_get(key, namespace="ray-suti") or 0) + 1
        _internal_kv_put(key, str(started), namespace="ray-suti")
        return started <= Attempts.MAX

    @staticmethod
    def end(job_id: str) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(f"attempts/{job_id}", namespace="ray-suti")


def replica_metrics() -> dict:
    """Prometheus metrics of a model replica (``ray.serve.metrics``; exported by every Ray node)."""
    from ray.serve import metrics

    return {"cache": metrics.Counter("suti_feature_cache", "demo-feature cache lookups", tag_keys=("result",)),
            "batch_rows": metrics.Histogram("suti_batch_requests", "requests per batch",
                                            boundaries=[1, 2, 4, 8, 16, 32]),
            "sampling_s": metrics.Histogram("suti_sampling_seconds", "seconds per denoising loop",
                                            boundaries=[0.1, 0.3, 1, 3, 10, 30, 100])}


def pad_demos(feats, k: int):
    """DemoFeatures with K demos -> k >= K demos, the extra ones switched off (exact: masked keys)."""
    import torch

    from ..model.layers import DemoFeatures

    b, have = feats.valid.shape
    if have == k:
        return feats
    tokens = {}
    for level, t in feats.tokens.items():
        per_demo = t.shape[1] // have
        tokens[level] = torch.cat([t, t.new_zeros(b, (k - have) * per_demo, t.shape[2])], dim=1)
    return DemoFeatures(tokens, torch.cat([feats.valid, feats.valid.new_zeros(b, k - have)], dim=1))

