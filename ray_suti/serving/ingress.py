"""The HTTP ingress: auth, body limits, request checks and the subject store, in front of the model.

Every route but ``/healthz`` wants ``Authorization: Bearer <key>`` unless the app was built for
anonymous local use (``auth.py``); the key names the caller's tenant, whose subjects are the only
ones it sees. Decoding, storage I/O and waiting on the model happen off the event loop. A full
model queue answers 503 with ``Retry-After``; a request that takes longer than the app's timeout
answers 504. Errors are JSON ``{"detail": ...}``.
"""

import asyncio
import base64
import binascii
import html
import io
import json
import os
import re
import time
import uuid

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ValidationError
from ray import serve

from ..utils.images import encode_png
from .auth import DEFAULT_TENANT, Credentials
from .schemas import MAX_BODY_BYTES, MAX_IMAGES, GenerateRequest, SubjectRequest
from .store import QuotaError, SubjectError, SubjectStore

OPEN_PATHS = ("/healthz", "/")  # and the page's files under /web/: they hold no data
WEB_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
REPLICA: dict = {}  # this process's credentials and request counter, for the middleware


def start_replica(credentials: Credentials) -> None:
    """Called from the replica's constructor. A module function, so it writes this module's
    ``REPLICA``: Serve ships the Ingress class by value, with copies of the globals it names."""
    from ray.serve import metrics

    REPLICA["credentials"] = credentials
    REPLICA["requests"] = metrics.Counter("suti_requests", "API requests by route and status",
                                          tag_keys=("route", "status"))
RETRY_AFTER_S = 2

api = FastAPI(title="ray-suti", version="1",
              description="Subject-driven generation in context: register 1-5 photos of a subject, then draw "
                          "it anywhere a prompt says. Send `Authorization: Bearer <key>`. Errors are JSON "
                          "`{\"detail\": ...}` with a 4xx status (503 when busy: retry after `Retry-After`).")


@api.middleware("http")
async def authenticate(request: Request, call_next):
    """Every route, /docs and /openapi.json included, except the open ones."""
    credentials = REPLICA.get("credentials")
    path, prefix = request.scope["path"], request.scope.get("root_path", "")
    path = path.removeprefix(prefix) or "/"  # the route inside the app, whatever its route_prefix
    tenant = DEFAULT_TENANT if path in OPEN_PATHS or path.startswith("/web/") else (
        credentials.tenant(request.headers.get("authorization")) if credentials else None)
    if tenant is None:
        response = JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
    else:
        request.state.tenant = tenant
        response = await call_next(request)
    if "requests" in REPLICA:  # by route template, so ids do not make a series each
        route = request.scope.get("route")
        REPLICA["requests"].inc(tags={"route": f"{request.method} {getattr(route, 'path', 'unmatched')}",
                                      "status": str(response.status_code)})
    return response


def error(status: int, message: str, **headers) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers or None)


def busy(message: str = "the model is busy: try again shortly") -> JSONResponse:
    return error(503, message, **{"Retry-After": str(RETRY_AFTER_S)})


def decode_base64(items: list[str]) -> list[bytes]:
    try:
        return [base64.b64decode(s, validate=True) for s in items]
    except (binascii.Error, ValueError):
        raise SubjectError("images must be base64 strings") from None


async def read_multipart(request: Request, body: bytes) -> tuple[list[bytes], list[str] | None]:
    form = await read_form(request, body)
    files = form.getlist("images")
    if not files or any(isinstance(f, str) for f in files):
        raise SubjectError("send the photos as multipart files named 'images'")
    captions = [c for c in form.getlist("captions") if isinstance(c, str)] or None
    return [await f.read() for f in files], captions


class Failure(Exception):
    """A request that cannot be drawn: the status and the reason, shaped by the route that answers."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                      413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                      503: "server_error", 504: "server_error"}


def openai_error(status: int, message: str, param: str | None = None) -> JSONResponse:
    """OpenAI's error shape, so the ``openai`` package raises its usual exceptions."""
    body = {"error": {"message": message, "type": OPENAI_ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": None}}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(body, status_code=400 if status == 422 else status, headers=headers)


def web_file(name: str) -> bytes:
    from importlib.resources import files

    return (files("ray_suti.serving") / "web" / name).read_bytes()


def thumbnail(png: bytes, side: int) -> bytes:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img.thumbnail((side, side), Image.LANCZOS)
    return encode_png(np.asarray(img))


def resize_png(png: bytes, side: int) -> bytes:
    """An image drawn at the model's size -> ``side`` x ``side`` (OpenAI's ``size``)."""
    img = Image.open(io.BytesIO(png))
    return encode_png(np.asarray(img.resize((side, side), Image.LANCZOS)))


async def read_form(request: Request, body: bytes):
    from starlette.requests import Request as StarletteRequest

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    return await StarletteRequest(request.scope, replay).form(max_files=MAX_IMAGES + 1, max_fields=MAX_IMAGES + 8)


async def answer(stream, on_progress) -> dict:
    """The last item of a Generator.generate_stream (the result), passing progress events on."""
    async for item in stream:
        if item is None:
            continue
        if "status" in item:
            return item
        if on_progress is not None:
            await on_progress(item)
    return {"status": 503, "detail": "the model replica ended the request without an answer"}


def drawn(req: GenerateRequest, job: dict, result: dict, t0: float) -> dict:
    """The JSON answer of a drawn request."""
    answer = {"images": [base64.b64encode(png).decode() for png in result["images"]], "seed": job["seed"],
              "subject_id": req.subject_id,
              "timings": {"sampling_s": round(result["seconds"], 4), "total_s": round(time.perf_counter() - t0, 4),
                          "batch_rows": result["batch_rows"]}}
    if "neighbours" in result:  # Re-Imagen: which knowledge-base entries were the demos
        answer["neighbours"] = result["neighbours"]
        answer["timings"]["retrieval_s"] = round(result["retrieval_s"], 4)
    return answer


def json_body(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, generator, store: dict, credentials: dict, max_body_bytes: int = MAX_BODY_BYTES,
                 request_timeout_s: float = 300.0):
        self.generator, self.max_body_bytes, self.timeout = generator, max_body_bytes, request_timeout_s
        self.store = SubjectStore(**store)
        start_replica(Credentials.load(**credentials))  # read here: secrets never travel in the config

    async def _body(self, request: Request) -> bytes | JSONResponse:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return error(413, f"request body over {self.max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                return error(413, f"request body over {self.max_body_bytes} bytes")
        return bytes(body)

    async def _parse(self, request: Request, model: type[BaseModel]):
        body = await self._body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            return model.model_validate(json.loads(body))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[... of any depth
            return error(400, "body must be JSON")
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
            return error(422, problems[:2000])

    async def _call_model(self, job: dict, on_progress=None) -> dict:
        """The model's answer, or 503 when its queue is full or no replica answers, 504 past the
        timeout. A replica lost while holding the request (node loss, scale-down, a crash) costs one
        retry on another, never more: a request that kills replicas takes at most two with it.
        ``on_progress(event)`` hears the sampling steps (the job then asks for them)."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        job = {**job, "progress": on_progress is not None}
        for attempt in range(2):
            if on_progress is None:
                response = self.generator.generate.remote(job)
                waiting = response
            else:
                response = self.generator.options(stream=True).generate_stream.remote(job)
                waiting = answer(response, on_progress)
            try:
                return await asyncio.wait_for(waiting, self.timeout)
            except asyncio.TimeoutError:
                response.cancel()
                return {"status": 504, "detail": f"generation took longer than {self.timeout:g} s"}
            except (BackPressureError, DeploymentUnavailableError):
                return {"status": 503, "detail": "the model is busy: try again shortly"}
            except (RayActorError, ActorDiedError, ActorUnavailableError):
                if attempt:
                    return {"status": 503, "detail": "the model replica stopped while drawing this request"}
                await asyncio.sleep(0.5)

    @api.get("/", include_in_schema=False)
    async def page(self, request: Request):
        """The web page (``web/``): it asks for a key when the API wants one. Its links are relative
        to the app's route prefix."""
        base = html.escape(request.scope.get("root_path", "").rstrip("/") + "/", quote=True)
        page = (await asyncio.to_thread(web_file, "index.html")).decode().replace("__BASE__", base)
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @api.get("/web/{name}", include_in_schema=False)
    async def web_asset(self, name: str):
        if name not in WEB_FILES:
            return error(404, "no such file")
        return Response(await asyncio.to_thread(web_file, name), media_type=WEB_FILES[name],
                        headers={"Cache-Control": "no-cache"})

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"ok": True}

    @api.get("/v1/model")
    async def model(self):
        return await self.generator.info.remote()

    @api.post("/v1/subjects", openapi_extra=json_body(SubjectRequest),
              summary="Register a subject: 1-5 photos as multipart `images` files (optional `captions` fields) "
                      "or JSON base64")
    async def add_subject(self, request: Request):
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                body = await self._body(request)  # the cap holds before any parsing
                if isinstance(body, JSONResponse):
                    return body
                images, captions = await read_multipart(request, body)
            else:
                parsed = await self._parse(request, SubjectRequest)
                if isinstance(parsed, JSONResponse):
                    return parsed
                images, captions = decode_base64(parsed.images), parsed.captions
            subject_id = await asyncio.to_thread(self.store.put, request.state.tenant, images, captions)
        except QuotaError as e:
            return error(429, str(e))
        except SubjectError as e:
            return error(422, str(e))
        return JSONResponse({"subject_id": subject_id, "num_images": len(images)}, status_code=201)

    @api.get("/v1/subjects", summary="Your subjects, a page at a time (`limit`, then `after` = the `next` cursor)")
    async def list_subjects(self, request: Request, limit: int = 50, after: str = ""):
        if not 1 <= limit <= 500:
            return error(422, "limit must be between 1 and 500")
        page, cursor = await asyncio.to_thread(self.store.list, request.state.tenant, limit, after)
        return {"subjects": page, "next": cursor}

    @api.get("/v1/subjects/{subject_id}")
    async def get_subject(self, subject_id: str, request: Request):
        meta = await asyncio.to_thread(self.store.meta, request.state.tenant, subject_id)
        return meta if meta is not None else error(404, "unknown subject_id")

    @api.get("/v1/subjects/{subject_id}/images/{index}", summary="One stored photo as PNG (`size`: thumbnail side)")
    async def subject_photo(self, subject_id: str, index: int, request: Request, size: int = 0):
        if not 0 <= size <= 1024:
            return error(422, "size must be between 0 (as stored) and 1024")
        png = await asyncio.to_thread(self.store.photo, request.state.tenant, subject_id, index)
        if png is None:
            return error(404, "unknown subject_id or image index")
        if size:
            png = await asyncio.to_thread(thumbnail, png, size)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @api.delete("/v1/subjects/{subject_id}", status_code=204)
    async def delete_subject(self, subject_id: str, request: Request):
        if not await asyncio.to_thread(self.store.delete, request.state.tenant, subject_id):
            return error(404, "unknown subject_id")
        return Response(status_code=204)

    @api.post("/v1/generate", openapi_extra=json_body(GenerateRequest),
              summary="Draw the subject as the prompt says: PNG with `Accept: image/png` (one image), server-sent "
                      "events with `Accept: text/event-stream` (`progress` per step, then `result` or `error`), "
                      "else JSON")
    async def generate(self, request: Request):
        req = await self._parse(request, GenerateRequest)
        if isinstance(req, JSONResponse):
            return req
        accept = request.headers.get("accept", "")
        if "text/event-stream" in accept:
            return StreamingResponse(self._events(req, request.state.tenant), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        want_png = "image/png" in accept
        if want_png and req.num_images != 1:
            return error(406, "image/png holds one image: ask for num_images 1, or JSON")
        t0 = time.perf_counter()
        try:
            job, result = await self._draw(req, request.state.tenant)
        except Failure as e:
            return busy(e.detail) if e.status == 503 else error(e.status, e.detail)
        if want_png:
            return Response(result["images"][0], media_type="image/png", headers={"X-Seed": str(job["seed"])})
        return drawn(req, job, result, t0)

    async def _events(self, req: GenerateRequest, tenant: str):
        """Server-sent events of one request: ``progress`` {step, steps} while sampling, then
        ``result`` (the JSON answer) or ``error`` {status, detail}. A client that leaves cancels it."""
        events: asyncio.Queue = asyncio.Queue()

        async def draw():
            t0 = time.perf_counter()
            try:
                job, result = await self._draw(req, tenant, on_progress=lambda e: events.put(("progress", e)))
                await events.put(("result", drawn(req, job, result, t0)))
            except Failure as e:
                await events.put(("error", {"status": e.status, "detail": e.detail}))
            except Exception as e:  # never leave the stream hanging
                await events.put(("error", {"status": 500, "detail": type(e).__name__}))

        task = asyncio.ensure_future(draw())
        try:
            while True:
                kind, data = await events.get()
                yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                if kind != "progress":
                    return
        finally:
            task.cancel()

    async def _draw(self, req: GenerateRequest, tenant: str, on_progress=None) -> tuple[dict, dict]:
        """(the job, the model's answer) of a checked request; Failure(status, detail) otherwise."""
        job = {"id": uuid.uuid4().hex, "prompt": req.prompt, "num_images": req.num_images, "steps": req.steps,
               "guidance_text": float(req.guidance_text), "guidance_subject": float(req.guidance_subject),
               "guidance_mode": req.guidance_mode, "tenant": tenant,
               "seed": req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1}
        try:
            job.update(await asyncio.to_thread(self._inputs, req, tenant))
        except LookupError:
            raise Failure(404, "unknown subject_id") from None
        except SubjectError as e:
            raise Failure(422, str(e)) from None
        result = await self._call_model(job, on_progress)
        if result["status"] != 200:
            raise Failure(result["status"], result["detail"])
        return job, result

    @api.post("/v1/images/edits", summary="OpenAI Images API: multipart `image[]` (1-5 photos of the subject), "
                                          "`prompt`, `n`, `size`, `response_format` b64_json")
    async def openai_edits(self, request: Request):
        body = await self._openai_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            form = await read_form(request, body)
            files = form.getlist("image[]") or form.getlist("image")
            if not files or any(isinstance(f, str) for f in files):
                return openai_error(400, "send 1-5 photos of the subject as multipart files named image[]", "image")
            fields = {k: form.get(k) for k in ("prompt", "n", "size", "response_format", "seed", "steps")}
            photos = [base64.b64encode(await f.read()).decode() for f in files]
        except (ValueError, KeyError) as e:  # a malformed form
            return openai_error(400, f"malformed multipart form: {e}")
        return await self._openai(request, {**fields, "images": photos})

    @api.post("/v1/images/generations", summary="OpenAI Images API with a `subject_id` extension (a registered "
                                                "subject): `prompt`, `n`, `size`, `response_format` b64_json")
    async def openai_generations(self, request: Request):
        body = await self._openai_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            fields = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return openai_error(400, "body must be JSON")
        if not isinstance(fields, dict):
            return openai_error(400, "body must be a JSON object")
        if not fields.get("subject_id"):
            return openai_error(400, "this server draws subjects: give subject_id (register photos with POST "
                                     "/v1/subjects), or send the photos to /v1/images/edits", "subject_id")
        return await self._openai(request, fields)

    async def _openai_body(self, request: Request) -> bytes | JSONResponse:
        body = await self._body(request)
        return openai_error(413, f"request body over {self.max_body_bytes} bytes") if isinstance(body, JSONResponse) else body

    async def _openai(self, request: Request, fields: dict):
        """OpenAI's fields -> a GenerateRequest, drawn; the answer in OpenAI's response shape."""
        size, response_format = fields.get("size") or "auto", fields.get("response_format") or "b64_json"
        if response_format != "b64_json":
            return openai_error(400, "response_format must be b64_json (this server keeps no image URLs)",
                                "response_format")
        if size != "auto" and not re.fullmatch(r"(\d{2,4})x\1", str(size)):
            return openai_error(400, "size must be auto or square, e.g. 512x512", "size")
        try:
            ints = {k: int(fields[k]) for k in ("n", "seed", "steps") if fields.get(k) not in (None, "")}
            req = GenerateRequest.model_validate(
                {"prompt": fields.get("prompt"), "num_images": ints.get("n", 1), "seed": ints.get("seed"),
                 "steps": ints.get("steps", 25), "subject_id": fields.get("subject_id"), "images": fields.get("images")})
        except (ValueError, TypeError) as e:  # pydantic's ValidationError is a ValueError
            message = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'body'}: {x['msg']}" for x in e.errors()) \
                if isinstance(e, ValidationError) else str(e)
            return openai_error(400, message.replace("num_images", "n")[:2000])
        try:
            _, result = await self._draw(req, request.state.tenant)
        except Failure as e:
            return openai_error(e.status, e.detail)
        pngs = result["images"] if size == "auto" else [resize_png(p, int(size.split("x")[0])) for p in result["images"]]
        return {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(p).decode()} for p in pngs]}

    def _inputs(self, req: GenerateRequest, tenant: str) -> dict:
        """The job's subject and controls, checked (in a thread: decoding and storage I/O)."""
        job = {"box": req.box, "keypoints": req.keypoints}
        if req.retrieve is not None:
            job["retrieve"] = {"k": req.retrieve.k}
        elif req.subject_id is not None:
            if not self.store.exists(tenant, req.subject_id):
                raise LookupError(req.subject_id)
            job["subject_id"] = req.subject_id
        else:
            photos = [self.store.check(data) for data in decode_base64(req.images)]
            if req.captions is not None and len(req.captions) != len(photos):
                raise SubjectError("captions must be one string per image")
            job.update(photos=photos, captions=req.captions)
        if req.edges is not None:
            try:
                job["edges"] = self.store.check(decode_base64([req.edges])[0])
            except SubjectError as e:
                raise SubjectError(f"edges: {e}") from None
        return job
