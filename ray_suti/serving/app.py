"""The Ray Serve application: a FastAPI ingress in front of an autoscaling model deployment.

    POST   /v1/subjects            1..K photos (multipart ``images`` files, or JSON base64) -> subject_id
    POST   /v1/generate            prompt + subject_id (or inline images) -> PNG or JSON (base64 images)
    DELETE /v1/subjects/{id}       photos and cached features gone; the id answers 404 afterwards
    GET    /healthz, /v1/model     liveness; preset and checkpoint id
    GET    /docs, /openapi.json    the schema

Registering a subject costs one check of its photos and a few kilobytes on disk; its demo features
are computed once per replica and kept in a bounded LRU cache (a miss recomputes them from the
stored photos). Concurrent requests are batched (``@serve.batch``); every row of a batch attends
only to its own subject's demos, and each image's noise comes from its request's seed, so an image
does not depend on what it was batched with. Bad input gets a JSON 4xx, never a 500.

Spatial controls ride on /v1/generate, any subset, for checkpoints trained with them (GET /v1/model
lists them): ``box`` [x0, y0, x1, y1] and ``keypoints`` [[x, y] of the subject's top, [x, y] of its
right-hand side] as fractions of the image, ``edges`` a base64 outline image (bright lines on
dark). Malformed controls, or one the checkpoint lacks, answer 422 with the reason.
"""

import asyncio
import base64
import binascii
import hashlib
import io
import json
import os
import time
from collections import OrderedDict
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve

from .store import SubjectError, SubjectStore

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_PIXELS = 4096 * 4096  # per photo, before decoding (decompression bombs)
MAX_IMAGES = 5
TOKEN_ENV = "SUTI_API_TOKEN"
CONTROLS = ("box", "keypoints", "edges")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(min_length=1, max_length=500)
    subject_id: str | None = Field(default=None, description="from POST /v1/subjects")
    images: list[str] | None = Field(default=None, min_length=1, max_length=MAX_IMAGES,
                                     description="base64 photos, instead of a subject_id")
    captions: list[str] | None = Field(default=None, max_length=MAX_IMAGES)
    num_images: int = Field(default=1, ge=1, le=4)
    steps: int = Field(default=25, ge=1, le=100)
    guidance_text: float = Field(default=1.5, ge=0.0, le=20.0)
    guidance_subject: float = Field(default=1.5, ge=0.0, le=20.0)
    guidance_mode: Literal["branches", "interleaved", "reimagen"] = Field(
        default="branches", description="interleaved: separate scales for two UNet passes a step instead of three")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="same seed, same image")
    box: list[float] | None = Field(default=None, min_length=4, max_length=4,
                                    description="where and how large: [x0, y0, x1, y1], fractions of the image")
    keypoints: list[list[float]] | None = Field(
        default=None, min_length=2, max_length=2,
        description="which way up: [[x, y] of the subject's top], [x, y] of its right-hand side]], fractions of the image")
    edges: str | None = Field(default=None, description="the outline: a base64 image, bright lines on dark")

    @model_validator(mode="after")
    def one_subject(self):
        if (self.subject_id is None) == (self.images is None):
            raise ValueError("give exactly one of subject_id or images")
        if not self.prompt.strip():
            raise ValueError("prompt must not be blank")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise ValueError("box must be [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        if self.keypoints is not None and not all(len(p) == 2 and all(0 <= v <= 1 for v in p) for p in self.keypoints):
            raise ValueError("keypoints must be two [x, y] points with coordinates in [0, 1]")
        return self


class SubjectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    images: list[str] = Field(min_length=1, max_length=MAX_IMAGES, description="base64 photos")
    captions: list[str] | None = Field(default=None, max_length=MAX_IMAGES)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def _b64(items: list[str]) -> list[bytes]:
    try:
        return [base64.b64decode(s, validate=True) for s in items]
    except (binascii.Error, ValueError):
        raise SubjectError("images must be base64 strings")


def _png(image01: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.round(image01 * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@serve.deployment(name="Generator")
class Generator:
    """One replica: the pipeline, and the demo features of recently used subjects."""

    def __init__(self, checkpoint: str, store_root: str, cache_size: int = 256, use_gpu: bool = False,
                 max_batch_size: int = 8, scheduler: str = "ddim"):
        import torch

        from ..model.pipeline import load_pipeline
        from ..utils.storage import local_copy

        torch.set_num_threads(1)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(checkpoint).set_scheduler(scheduler).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.store = SubjectStore(store_root, MAX_IMAGES, MAX_PIXELS)
        self.cache: OrderedDict = OrderedDict()
        self.cache_size, self.checkpoint = cache_size, checkpoint
        self.checkpoint_id = _file_id(local_copy(checkpoint))  # the fetched copy when it is a URI
        self.stats = {"feature_hits": 0, "feature_misses": 0, "batches": 0, "rows": 0}
        self.generate.set_max_batch_size(max_batch_size)  # 1 turns batching off (bench/serve_load.py)

    def features(self, subject_id: str):
        """Cached DemoFeatures of a stored subject, or None when it is not (or no longer) stored."""
        if not self.store.exists(subject_id):
            self.cache.pop(subject_id, None)
            return None
        if subject_id in self.cache:
            self.stats["feature_hits"] += 1
            self.cache.move_to_end(subject_id)
            return self.cache[subject_id]
        self.stats["feature_misses"] += 1
        images, captions = self.store.get(subject_id)
        feats = self.pipe.encode_subject(images, captions)
        self.cache[subject_id] = feats
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return feats

    def info(self) -> dict:
        return {"preset": self.pipe.suti_config.name, "checkpoint": self.checkpoint, "checkpoint_id": self.checkpoint_id,
                "controls": list(self.pipe.controls), "scheduler": type(self.pipe.scheduler).__name__,
                "cache_entries": len(self.cache), **self.stats}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def generate(self, jobs: list[dict]) -> list[dict]:
        return self.run_batch(jobs)

    def run_batch(self, jobs: list[dict]) -> list[dict]:
        """Jobs with the same sampling settings share one denoising loop; the rest run apart."""
        from ..model.inputs import SuTIInputError

        results: list[dict | None] = [None] * len(jobs)
        feats = []
        for i, job in enumerate(jobs):
            try:  # a control this checkpoint lacks, or an unreadable edge map, fails this job only
                self.pipe.prepare_controls(1, **{c: job.get(c) for c in CONTROLS})
            except SuTIInputError as e:
                results[i] = {"status": 422, "detail": str(e)}
                feats.append(None)
                continue
            f = (self.features(job["subject_id"]) if job.get("subject_id")
                 else self.pipe.encode_subject(job["photos"], job.get("captions")))
            feats.append(f)
            if f is None:
                results[i] = {"status": 404, "detail": "unknown subject_id"}
        groups: dict = {}
        for i, job in enumerate(jobs):
            if results[i] is None:
                key = (job["steps"], job["guidance_text"], job["guidance_subject"], job.get("guidance_mode", "branches"))
                groups.setdefault(key, []).append(i)
        for settings, members in groups.items():
            for i, images, seconds in self._sample([jobs[i] for i in members], [feats[i] for i in members],
                                                   settings, members):
                results[i] = {"status": 200, "images": images, "seconds": seconds, "batch_rows": len(members)}
        self.stats["batches"] += 1
        self.stats["rows"] += len(jobs)
        return results

    def _sample(self, jobs, feats, settings, indices):
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
        out = self.pipe(prompts, demos, num_inference_steps=steps, guidance_scale_text=g_text,
                        guidance_scale_subject=g_subject, guidance_mode=mode, generator=generators, output_type="np",
                        **controls).images
        seconds = time.perf_counter() - t0
        start = 0
        for i, job in zip(indices, jobs):
            yield i, [_png(a) for a in out[start: start + job["num_images"]]], seconds
            start += job["num_images"]


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


async def _multipart(request: Request, body: bytes) -> tuple[list[bytes], list[str] | None]:
    from starlette.requests import Request as StarletteRequest

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    form = await StarletteRequest(request.scope, replay).form(max_files=MAX_IMAGES + 1, max_fields=MAX_IMAGES + 1)
    files = form.getlist("images")
    if not files or any(isinstance(f, str) for f in files):
        raise SubjectError("send the photos as multipart files named 'images'")
    captions = [c for c in form.getlist("captions") if isinstance(c, str)] or None
    return [await f.read() for f in files], captions


def _file_id(path: str) -> str:
    if not os.path.isfile(path):
        return path  # a preset name or a folder
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


api = FastAPI(title="ray-suti", version="1",
              description="Subject-driven generation in context: register 1-5 photos of a subject, then draw "
                          "it anywhere a prompt says. Errors are JSON `{\"detail\": ...}` with a 4xx status.")


def _json_body(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, generator, store_root: str, max_body_bytes: int = MAX_BODY_BYTES, token: str | None = None):
        self.generator, self.max_body_bytes = generator, max_body_bytes
        self.store = SubjectStore(store_root, MAX_IMAGES, MAX_PIXELS)
        self.token = os.environ.get(TOKEN_ENV, "") if token is None else token

    def _denied(self, request: Request) -> JSONResponse | None:
        if self.token and request.headers.get("authorization", "") != f"Bearer {self.token}":
            return _error(401, "missing or wrong bearer token")
        return None

    async def _body(self, request: Request) -> bytes | JSONResponse:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return _error(413, f"request body over {self.max_body_bytes} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                return _error(413, f"request body over {self.max_body_bytes} bytes")
        return body

    async def _parse(self, request: Request, model: type[BaseModel]):
        body = await self._body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            return model.model_validate(json.loads(body))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "body must be JSON")
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
            return _error(422, problems[:2000])

    async def _call_model(self, job: dict, attempts: int = 3) -> dict:
        """A replica that dies mid-request (crash, node loss, scale-down) costs a retry, not an error:
        the handle routes the retry to a live replica."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        for attempt in range(attempts):
            try:
                return await self.generator.generate.remote(job)
            except (RayActorError, ActorDiedError, ActorUnavailableError):
                if attempt == attempts - 1:
                    return {"status": 503, "detail": "no model replica answered; try again"}
                await asyncio.sleep(0.5 * (attempt + 1))

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"ok": True}

    @api.get("/v1/model")
    async def model(self, request: Request):
        if denied := self._denied(request):
            return denied
        return await self.generator.info.remote()

    @api.post("/v1/subjects", openapi_extra=_json_body(SubjectRequest),
              summary="Register a subject: 1-5 photos as multipart `images` files (optional `captions` fields) "
                      "or JSON base64")
    async def add_subject(self, request: Request):
        if denied := self._denied(request):
            return denied
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                body = await self._body(request)  # the cap holds before any parsing
                if isinstance(body, JSONResponse):
                    return body
                images, captions = await _multipart(request, body)
            else:
                parsed = await self._parse(request, SubjectRequest)
                if isinstance(parsed, JSONResponse):
                    return parsed
                images, captions = _b64(parsed.images), parsed.captions
            subject_id = await asyncio.to_thread(self.store.put, images, captions)
        except SubjectError as e:
            return _error(422, str(e))
        return JSONResponse({"subject_id": subject_id, "num_images": len(images)}, status_code=201)

    @api.delete("/v1/subjects/{subject_id}", status_code=204)
    async def delete_subject(self, subject_id: str, request: Request):
        if denied := self._denied(request):
            return denied
        if not self.store.delete(subject_id):
            return _error(404, "unknown subject_id")
        return Response(status_code=204)

    @api.post("/v1/generate", openapi_extra=_json_body(GenerateRequest),
              summary="Draw the subject as the prompt says: PNG with `Accept: image/png` (one image), else JSON")
    async def generate(self, request: Request):
        if denied := self._denied(request):
            return denied
        req = await self._parse(request, GenerateRequest)
        if isinstance(req, JSONResponse):
            return req
        want_png = "image/png" in request.headers.get("accept", "")
        if want_png and req.num_images != 1:
            return _error(406, "image/png holds one image: ask for num_images 1, or JSON")
        job = {"prompt": req.prompt, "num_images": req.num_images, "steps": req.steps,
               "guidance_text": float(req.guidance_text), "guidance_subject": float(req.guidance_subject),
               "guidance_mode": req.guidance_mode,
               "seed": req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1}
        if req.subject_id is not None:
            if not self.store.exists(req.subject_id):
                return _error(404, "unknown subject_id")
            job["subject_id"] = req.subject_id
        else:
            try:
                photos = [self.store.check(data) for data in _b64(req.images)]
            except SubjectError as e:
                return _error(422, str(e))
            if req.captions is not None and len(req.captions) != len(photos):
                return _error(422, "captions must be one string per image")
            job.update(photos=photos, captions=req.captions)
        job.update(box=req.box, keypoints=req.keypoints)
        if req.edges is not None:
            try:
                job["edges"] = self.store.check(_b64([req.edges])[0])
            except SubjectError as e:
                return _error(422, f"edges: {e}")
        t0 = time.perf_counter()
        result = await self._call_model(job)
        if result["status"] != 200:
            return _error(result["status"], result["detail"])
        if want_png:
            return Response(result["images"][0], media_type="image/png", headers={"X-Seed": str(job["seed"])})
        return {"images": [base64.b64encode(png).decode() for png in result["images"]], "seed": job["seed"],
                "subject_id": req.subject_id,
                "timings": {"sampling_s": round(result["seconds"], 4),
                            "total_s": round(time.perf_counter() - t0, 4), "batch_rows": result["batch_rows"]}}


def build_app(checkpoint: str = "checkpoints/tiny-32.safetensors", store: str = "runs/subjects",
              min_replicas: int = 1, max_replicas: int = 2, target_ongoing_requests: float = 2.0,
              num_gpus: float = 0.0, num_cpus: float = 1.0, cache_size: int = 256, token: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES, max_batch_size: int = 8, downscale_delay_s: float = 10.0,
              scheduler: str = "ddim"):
    """The application graph (``serve run serve.app:build``). ``token`` (default: the environment's
    SUTI_API_TOKEN) makes every API route but /healthz require ``Authorization: Bearer <token>``.
    ``scheduler`` "dpm++" with ~10 steps per request is 2.6x faster than DDIM 25 at the same
    fidelity on tiny-32 (bench/personalize_vs_dreambooth.py)."""
    from ..model.pipeline import resolve_checkpoint
    from ..model.schedulers import scheduler_class
    from ..utils.storage import is_uri

    checkpoint = resolve_checkpoint(checkpoint)  # a preset, a URI or an absolute path
    scheduler_class(scheduler)  # refuses names outside diffusers' allow-listed schedulers
    store = store if is_uri(store) else os.path.abspath(store)  # shared storage: every replica sees every subject
    generator = Generator.options(
        autoscaling_config={"min_replicas": min_replicas, "max_replicas": max_replicas,
                            "target_ongoing_requests": target_ongoing_requests,
                            "upscale_delay_s": 2.0, "downscale_delay_s": downscale_delay_s},
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
    ).bind(checkpoint, store, cache_size, num_gpus > 0, max_batch_size, scheduler)
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(generator, store, max_body_bytes, token)
