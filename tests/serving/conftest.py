"""The real Serve apps the serving tests share, started once for the package, and their helpers."""
import json

import pytest
import requests
from PIL import Image

from ..conftest import REPO, free_port

CHECKPOINT = str(REPO / "checkpoints" / "tiny-32.safetensors")
KEY_A, KEY_B, KEY_C = "acme-0123456789abcdef", "globex-0123456789abcdef", "initech-0123456789abcdef"
AS_A, AS_B = ({"Authorization": f"Bearer {k}"} for k in (KEY_A, KEY_B))


@pytest.fixture(scope="package")
def small_store(tmp_path_factory):
    return tmp_path_factory.mktemp("small")


@pytest.fixture(scope="package")
def main_store(tmp_path_factory):
    return tmp_path_factory.mktemp("subjects")


def subject_cache_bytes(n_photos: int) -> int:
    """What one subject of ``n_photos`` DreamBench-sized photos takes in a replica's feature cache."""
    from ray_suti.model.pipeline import load_pipeline
    from ray_suti.serving.generator import FeatureCache

    pipe = load_pipeline(CHECKPOINT)
    return FeatureCache.size(pipe.encode_subject([Image.new("RGB", (64, 64))] * n_photos))


@pytest.fixture(scope="package")
def url(ray_local, tmp_path_factory, small_store, main_store):
    from ray import serve

    from ray_suti.serving.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    store = str(main_store)
    keys = tmp_path_factory.mktemp("secrets") / "api-keys.json"
    keys.write_text(json.dumps({KEY_A: "acme", KEY_B: "globex", KEY_C: "initech"}))
    # Half a CPU per model replica: four apps share the 2-CPU test cluster. Deployed together
    # (serve.run_many): their replicas start side by side, not one app after another.
    serve.run_many([
        serve.RunTarget(build_app(CHECKPOINT, store, max_replicas=1, num_cpus=0.5, max_body_bytes=2_000_000,
                            allow_anonymous=True), name="suti", route_prefix="/"),
        # Two tenants, two subjects each at most, a model that takes one request at a time and queues one.
        serve.RunTarget(build_app(CHECKPOINT, store, max_replicas=1, num_cpus=0.5, api_keys_file=str(keys), max_subjects=2,
                            max_batch_size=1, max_queued_requests=1), name="locked", route_prefix="/locked"),
        # Checkpoint and subject store as URIs (file:// goes through the same calls as s3://); a feature
        # cache that holds one two-photo subject.
        serve.RunTarget(build_app((REPO / "checkpoints" / "tiny-32.safetensors").as_uri(), small_store.as_uri(),
                            max_replicas=1, num_cpus=0.5, cache_bytes=subject_cache_bytes(2), scheduler="dpm++",
                            allow_anonymous=True), name="small", route_prefix="/small"),
        # A latent model (tiny VAE) in bfloat16, as a GPU replica would run: demos VAE-encoded, the same API.
        serve.RunTarget(build_app("tiny-latent", store, max_replicas=1, num_cpus=0.25, allow_anonymous=True, dtype="bf16"),
                  name="latent", route_prefix="/latent"),
    ])
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def photos(dreambench_dir, name, n=3):
    return [p.read_bytes() for p in sorted((dreambench_dir / name).glob("*.jpg"))[:n]]


def register(url, images, captions=None, headers=None):
    files = [("images", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    data = [("captions", c) for c in captions or []]
    return requests.post(f"{url}/v1/subjects", files=files, data=data, headers=headers, timeout=60)


def generate(url, seed=0, accept="application/json", headers=None, **body):
    body = {"prompt": "a photo on the beach", "steps": 4, "seed": seed, **body}
    return requests.post(f"{url}/v1/generate", json=body, headers={"Accept": accept, **(headers or {})}, timeout=120)


