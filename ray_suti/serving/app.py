"""The Ray Serve application: a FastAPI ingress in front of an autoscaling model deployment.

    POST   /v1/subjects            1..5 photos (multipart ``images`` files, or JSON base64) -> subject_id
    GET    /v1/subjects            your subjects, paged (``limit``, ``after``)
    GET    /v1/subjects/{id}       one subject's metadata
    DELETE /v1/subjects/{id}       photos and cached features gone; the id answers 404 afterwards
    POST   /v1/generate            prompt + subject_id (or inline images, or "retrieve" from the knowledge base)
                                   -> PNG, JSON (base64 images) or server-sent events with step progress
    GET    /v1/subjects/{id}/images/{n}   a stored photo (``size``: thumbnail side)
    GET    /                       the web page (open: it holds no data; its calls carry the key)
    GET    /v1/model               preset, checkpoint and its content id, controls
    GET    /healthz                liveness (the only route open without a key)
    GET    /docs, /openapi.json    the schema

Files: ``schemas.py`` (request bodies, limits), ``auth.py`` (keys -> tenants), ``store.py`` (subjects
per tenant, quotas), ``ingress.py`` (HTTP), ``generator.py`` (the model replicas). Registering a
subject costs one check of its photos and its PNGs on disk (at most ``max_side`` a side); its demo
features are computed once per replica and kept in a cache bounded by bytes.

Spatial controls ride on /v1/generate, any subset, for checkpoints trained with them (GET /v1/model
lists them): ``box`` [x0, y0, x1, y1] and ``keypoints`` [[x, y] of the subject's top, [x, y] of its
right-hand side] as fractions of the image, ``edges`` a base64 outline image (bright lines on
dark). Malformed controls, or one the checkpoint lacks, answer 422 with the reason.

Capacity: a model replica takes ``max_ongoing_requests = 2 x max_batch_size`` requests (one batch
drawing, the next filling) and queues ``max_queued_requests`` more per handle; past that the API
answers 503 with ``Retry-After``. The autoscaler targets ``target_ongoing_requests`` per replica.
"""
import os

from .auth import Credentials
from .generator import Generator
from .ingress import Ingress
from .schemas import MAX_BODY_BYTES, MAX_IMAGES


def build_app(checkpoint: str = "checkpoints/tiny-32.safetensors", store: str = "runs/subjects",
              min_replicas: int = 1, max_replicas: int = 2, target_ongoing_requests: float = 8.0,
              num_gpus: float = 0.0, num_cpus: float = 1.0, cache_bytes: int = 256 * 1024**2,
              api_keys_file: str | None = None, token_file: str | None = None, allow_anonymous: bool = False,
              token: str | None = None, max_body_bytes: int = MAX_BODY_BYTES, max_batch_size: int = 8,
              max_batch_rows: int = 48, max_queued_requests: int = 64, request_timeout_s: float = 300.0,
              downscale_delay_s: float = 10.0, scheduler: str = "ddim", max_side: int = 1024,
              max_subjects: int = 1000, max_bytes: int = 2 * 1024**3, subject_ttl_s: float | None = None,
              ingress_max_replicas: int = 4, dtype: str = "fp32", warmup: bool = True,
              knowledge_base: str | None = None):
    """The application graph (``serve run serve.app:build``). Credentials (``auth.py``): an
    ``api_keys_file``, a ``token_file``, or ``SUTI_API_TOKEN`` in the replicas' environment; without
    any the build fails unless ``allow_anonymous`` (local use on 127.0.0.1). ``token`` is for Python
    callers only. ``max_subjects`` / ``max_bytes`` are per tenant; ``subject_ttl_s`` makes subjects
    expire. ``dtype`` fp16 / bf16 halves a GPU replica's memory; ``num_gpus`` may be a fraction
    (several small replicas on one GPU). ``scheduler`` "dpm++" with ~10 steps per request matches
    DDIM 25 on tiny-32, faster. ``knowledge_base``: a KB folder or URI (``ray-suti index``) for
    requests with ``"retrieve"``; ``{tenant}`` in it gives each tenant its own."""
    from ..model.loading import resolve_checkpoint
    from ..model.schedulers import check_scheduler
    from ..utils.storage import is_uri

    credentials = dict(api_keys_file=api_keys_file, token_file=token_file, allow_anonymous=allow_anonymous, token=token)
    Credentials.load(**credentials)  # fails here, with where credentials come from, before anything starts
    checkpoint = resolve_checkpoint(checkpoint)  # a preset, a URI or an absolute path
    check_scheduler(scheduler)  # refuses names outside diffusers' allow-listed schedulers
    from ..model.loading import DTYPES

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if knowledge_base and not is_uri(knowledge_base):
        knowledge_base = os.path.abspath(knowledge_base)  # replicas may start elsewhere
    root = store if is_uri(store) else os.path.abspath(store)  # shared storage: every replica sees every subject
    store_cfg = dict(root=root, max_images=MAX_IMAGES, max_side=max_side,
                     max_subjects=max_subjects, max_bytes=max_bytes, ttl_s=subject_ttl_s)
    generator = Generator.options(
        max_ongoing_requests=2 * max_batch_size, max_queued_requests=max_queued_requests,
        autoscaling_config={"min_replicas": min_replicas, "max_replicas": max_replicas,
                            "target_ongoing_requests": target_ongoing_requests,
                            "upscale_delay_s": 2.0, "downscale_delay_s": downscale_delay_s},
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
    ).bind(checkpoint, store_cfg, cache_bytes, num_gpus > 0, max_batch_size, scheduler, max_batch_rows, dtype, warmup,
           knowledge_base)
    return Ingress.options(
        max_ongoing_requests=4 * max_batch_size * max_replicas + max_queued_requests,
        autoscaling_config={"min_replicas": 1, "max_replicas": ingress_max_replicas, "target_ongoing_requests": 64},
        ray_actor_options={"num_cpus": 0},
    ).bind(generator, store_cfg, credentials, max_body_bytes, request_timeout_s)


def serve_until_stopped(app, host: str, port: int, ready) -> None:
    """Runs ``app`` on ``host:port`` until SIGINT or SIGTERM (Ctrl-C, Kubernetes, systemd), then
    shuts Serve down. The handlers only set a flag, so a signal that arrives while the app is still
    deploying also ends cleanly, and a signal disposition inherited as "ignore" (a background job)
    does not make it unstoppable. ``ready(url)`` is called once the app is up."""
    import signal
    import threading

    from ray import serve

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, route_prefix="/")
        ready(f"http://{host}:{port}")
        stop.wait()
    finally:
        serve.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
