"""The real Serve app over real HTTP, with the committed tiny model and DreamBench photos as demos."""
import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from ray_suti.utils.images import encode_png

from ..conftest import REPO
from .conftest import AS_A, AS_B, CHECKPOINT, KEY_A, generate, photos, register

pytestmark = pytest.mark.slow


def test_a_latent_model_serves_the_same_api(url, dreambench_dir):
    r = generate(f"{url}/latent", images=[base64.b64encode(b).decode() for b in photos(dreambench_dir, "dog2", 2)],
                 accept="image/png")
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    assert requests.get(f"{url}/latent/v1/model", timeout=30).json()["dtype"] == "bfloat16"


def test_register_generate_and_delete(url, dreambench_dir):
    r = register(url, photos(dreambench_dir, "dog2"), ["a dog", "a dog", "a dog on grass"])
    assert r.status_code == 201, r.text
    subject = r.json()["subject_id"]
    assert register(url, photos(dreambench_dir, "dog2"), ["a dog", "a dog", "a dog on grass"]).json()["subject_id"] == subject
    as_json = requests.post(f"{url}/v1/subjects", json={"images": [base64.b64encode(b).decode() for b in photos(
        dreambench_dir, "can", 2)]}, timeout=60)
    assert as_json.status_code == 201 and as_json.json()["subject_id"] != subject

    png = generate(url, subject_id=subject, accept="image/png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (32, 32)
    assert generate(url, subject_id=subject, accept="image/png").content == png.content  # same seed, same image
    assert generate(url, seed=1, subject_id=subject, accept="image/png").content != png.content
    many = generate(url, subject_id=subject, num_images=2).json()
    assert len(many["images"]) == 2 and many["seed"] == 0 and base64.b64decode(many["images"][0]) == png.content
    inline = generate(url, images=[base64.b64encode(b).decode() for b in photos(dreambench_dir, "dog2")],
                      captions=["a dog", "a dog", "a dog on grass"], accept="image/png")
    assert inline.status_code == 200 and inline.content == png.content  # the same subject, not stored

    assert requests.delete(f"{url}/v1/subjects/{subject}", timeout=30).status_code == 204
    assert generate(url, subject_id=subject).status_code == 404
    assert requests.delete(f"{url}/v1/subjects/{subject}", timeout=30).status_code == 404


def test_a_feature_cache_miss_recomputes_from_the_stored_photos(url, dreambench_dir, small_store):
    small = f"{url}/small"  # an app whose cache holds one subject; its store is a URI
    a, b = (register(small, photos(dreambench_dir, name, 2)).json()["subject_id"] for name in ("dog2", "can"))
    [tenant_folder] = small_store.iterdir()
    assert sorted(p.name for p in (tenant_folder / a).iterdir()) == ["0.png", "1.png", "meta.json"]
    assert requests.get(f"{small}/v1/model", timeout=30).json()["scheduler"] == "DPMSolverMultistepScheduler"
    misses = lambda: requests.get(f"{small}/v1/model", timeout=30).json()["feature_misses"]  # noqa: E731
    before = misses()
    first = generate(small, subject_id=a, accept="image/png").content
    assert generate(small, subject_id=a, accept="image/png").content == first and misses() == before + 1  # a hit
    generate(small, subject_id=b, accept="image/png")  # evicts a
    again = generate(small, subject_id=a, accept="image/png").content
    assert misses() == before + 3 and again == first


def test_spatial_controls_change_the_image_and_bad_ones_get_422(url, dreambench_dir):
    from ray_suti.utils.images import encode_png
    from ray_suti.world import Context, heldout_seeds
    from ray_suti.world.controls import controls_of

    assert requests.get(f"{url}/v1/model", timeout=30).json()["controls"] == ["box", "keypoints", "edges"]
    subject = register(url, photos(dreambench_dir, "dog2", 2)).json()["subject_id"]
    wanted = controls_of(heldout_seeds(1)[0], Context(position="left", size="small"), 32)
    edges = base64.b64encode(encode_png((wanted["edges"] * 255).astype("uint8"))).decode()
    plain = generate(url, seed=3, subject_id=subject, accept="image/png")
    controlled = generate(url, seed=3, subject_id=subject, accept="image/png", box=wanted["box"].tolist(),
                          keypoints=wanted["keypoints"].tolist(), edges=edges)
    assert plain.status_code == controlled.status_code == 200 and plain.content != controlled.content
    assert generate(url, seed=3, subject_id=subject, accept="image/png").content == plain.content  # none: unchanged
    for bad, reason in ((dict(box=[0.5, 0.1, 0.2, 0.6]), "0 <= x0 < x1"), (dict(box=[0.1, 0.1, 0.5]), "box"),
                        (dict(keypoints=[[0.1, 0.2]]), "keypoints"), (dict(keypoints=[[0.1, 2.0], [0, 0]]), "keypoints"),
                        (dict(edges="%%%"), "base64"), (dict(edges=base64.b64encode(b"hello").decode()), "edges")):
        r = generate(url, subject_id=subject, **bad)
        assert r.status_code == 422 and reason in r.text, (bad, r.status_code, r.text)


def test_batched_requests_of_different_subjects_do_not_mix(url, dreambench_dir):
    subjects = [register(url, photos(dreambench_dir, name, n)).json()["subject_id"]
                for name, n in (("dog2", 3), ("can", 2), ("clock", 1))]
    alone = [generate(url, seed=7, subject_id=s, accept="image/png").content for s in subjects]
    together, rows = [None] * 6, []

    def call(i):
        r = generate(url, seed=7, subject_id=subjects[i % 3])
        together[i] = base64.b64decode(r.json()["images"][0])
        rows.append(r.json()["timings"]["batch_rows"])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(rows) > 1  # some requests really shared a batch
    # Each row gets its own subject: the same image as alone, up to float rounding (a batch of other
    # sizes and padded demos sums in another order: ~1e-6, at most one level in 8-bit), far from the others.
    pixels = lambda png: np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)  # noqa: E731
    for i, png in enumerate(together):
        assert np.abs(pixels(png) - pixels(alone[i % 3])).max() <= 1
        assert all(np.abs(pixels(png) - pixels(alone[j])).max() > 8 for j in range(3) if j != i % 3)


def test_bad_input_gets_a_json_4xx(url, dreambench_dir):
    good = photos(dreambench_dir, "dog2", 1)
    cases = [
        (register(url, [b"<html>not an image</html>"]), 422),
        (register(url, good * 6), 422),
        (register(url, [good[0][:200]]), 422),  # truncated
        (requests.post(f"{url}/v1/subjects", json={"images": ["%%%"]}, timeout=30), 422),
        (requests.post(f"{url}/v1/subjects", json={"images": "abc"}, timeout=30), 422),
        (requests.post(f"{url}/v1/generate", data="{not json", timeout=30), 400),
        (requests.post(f"{url}/v1/generate", data="[" * 100_000, timeout=30), 400),  # any depth
        (requests.post(f"{url}/v1/subjects", data='{"images": ' + "[" * 50_000 + "]" * 50_000 + "}", timeout=30), 400),
        (generate(url, subject_id="../../etc/passwd"), 404),
        (generate(url, subject_id="0" * 64), 404),
        (generate(url, subject_id="0" * 64, steps=1000), 422),
        (generate(url, subject_id="0" * 64, prompt=7), 422),
        (generate(url, subject_id="0" * 64, seed="7"), 422),
        (generate(url, prompt="x"), 422),  # neither subject_id nor images
        (generate(url, subject_id="0" * 64, extra=1), 422),
        (generate(url, subject_id="0" * 64, num_images=2, accept="image/png"), 406),
        (requests.post(f"{url}/v1/generate", data=b"x" * 2_100_000, timeout=30), 413),
    ]
    bomb = io.BytesIO()
    Image.new("1", (8000, 7000)).save(bomb, format="PNG")  # 56 MP: 168 MB once decoded, 30 KB on the wire
    cases.append((register(url, [bomb.getvalue()]), 422))
    for response, status in cases:
        assert response.status_code == status, (status, response.text)
        assert "detail" in response.json()
    assert generate(url, images=[base64.b64encode(good[0]).decode()], accept="image/png").status_code == 200


def test_health_model_and_docs(url):
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"ok": True}
    info = requests.get(f"{url}/v1/model", timeout=30).json()
    assert info["preset"] == "tiny-32" and len(info["checkpoint_id"]) == 16
    schema = requests.get(f"{url}/openapi.json", timeout=30).json()
    assert {"/v1/subjects", "/v1/generate", "/v1/subjects/{subject_id}", "/healthz", "/v1/model"} <= set(schema["paths"])
    assert "prompt" in json.dumps(schema["paths"]["/v1/generate"])
    assert requests.get(f"{url}/docs", timeout=30).status_code == 200


def test_every_route_but_healthz_wants_a_key(url):
    locked = f"{url}/locked"
    schema = requests.get(f"{locked}/openapi.json", headers=AS_A, timeout=30).json()
    routes = [(method.upper(), path.replace("{subject_id}", "0" * 64).replace("{index}", "0"))
              for path, ops in schema["paths"].items() for method in ops]
    routes += [("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json"), ("GET", "/nowhere"),
               ("GET", "/"), ("GET", "/web/app.js"), ("GET", "/web/style.css"), ("GET", "/web/index.html")]
    assert len(routes) >= 15
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": f"Basic {KEY_A}"}):
            r = requests.request(method, f"{locked}{path}", headers=headers, timeout=30)
            want = 200 if path in ("/healthz", "/", "/web/app.js", "/web/style.css", "/web/index.html") else 401
            assert r.status_code == want, (method, path, headers, r.status_code)
            if want == 401:
                assert r.headers["WWW-Authenticate"] == "Bearer" and "detail" in r.json()
    assert requests.get(f"{locked}/v1/model", headers=AS_A, timeout=30).status_code == 200
    assert requests.get(f"{locked}/docs", headers=AS_B, timeout=30).status_code == 200


def test_tenants_see_only_their_own_subjects_and_have_quotas(url, dreambench_dir):
    locked = f"{url}/locked"
    a = register(locked, photos(dreambench_dir, "dog2", 2), headers=AS_A).json()["subject_id"]
    b = register(locked, photos(dreambench_dir, "dog2", 2), headers=AS_B).json()["subject_id"]
    assert a != b  # the same photos: another id in another tenant
    for subject, mine, theirs in ((a, AS_A, AS_B), (b, AS_B, AS_A)):
        assert requests.get(f"{locked}/v1/subjects/{subject}", headers=mine, timeout=30).json()["num_images"] == 2
        assert requests.get(f"{locked}/v1/subjects/{subject}", headers=theirs, timeout=30).status_code == 404
        assert generate(locked, subject_id=subject, headers=theirs).status_code == 404
        assert requests.delete(f"{locked}/v1/subjects/{subject}", headers=theirs, timeout=30).status_code == 404
        listed = requests.get(f"{locked}/v1/subjects", headers=mine, timeout=30).json()
        assert [m["subject_id"] for m in listed["subjects"]] == [subject] and listed["next"] is None
    assert generate(locked, subject_id=a, headers=AS_A, accept="image/png").status_code == 200
    assert register(locked, photos(dreambench_dir, "can", 1), headers=AS_A).status_code == 201
    over = register(locked, photos(dreambench_dir, "clock", 1), headers=AS_A)  # a third subject: over quota
    assert over.status_code == 429 and "quota" in over.json()["detail"]
    assert register(locked, photos(dreambench_dir, "clock", 1), headers=AS_B).status_code == 201  # B has room
    assert requests.delete(f"{locked}/v1/subjects/{a}", headers=AS_A, timeout=30).status_code == 204
    assert register(locked, photos(dreambench_dir, "clock", 1), headers=AS_A).status_code == 201
    page = requests.get(f"{locked}/v1/subjects?limit=1", headers=AS_A, timeout=30).json()
    assert len(page["subjects"]) == 1 and page["next"] == page["subjects"][0]["subject_id"]
    assert requests.get(f"{locked}/v1/subjects?limit=0", headers=AS_A, timeout=30).status_code == 422
    for tenant in (AS_A, AS_B):  # the tenants' quotas left as found: other tests register on them
        for listed in requests.get(f"{locked}/v1/subjects", headers=tenant, timeout=30).json()["subjects"]:
            assert requests.delete(f"{locked}/v1/subjects/{listed['subject_id']}", headers=tenant,
                                   timeout=30).status_code == 204


def test_overload_answers_503_with_retry_after_and_no_other_5xx(url, dreambench_dir):
    """The locked app's model takes one request and queues one: a burst of 8 overflows it."""
    locked = f"{url}/locked"
    [subject] = [s["subject_id"] for s in requests.get(f"{locked}/v1/subjects", headers=AS_B, timeout=30).json()["subjects"]
                 if s["num_images"] == 2] or [register(locked, photos(dreambench_dir, "dog2", 2), headers=AS_B).json()["subject_id"]]
    answers = [None] * 8

    def call(i):
        answers[i] = generate(locked, seed=i, subject_id=subject, steps=40, headers=AS_B)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
    assert all(r.headers["Retry-After"].isdigit() for r in answers if r.status_code == 503)


def test_the_openai_package_draws_through_the_images_api(url, dreambench_dir):
    """The official client, base_url at the server, the API key as its key: edits with the photos,
    generations with a registered subject (the subject_id extension), errors as its exceptions."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/locked/v1", api_key=KEY_A, max_retries=4)
    paths = sorted((dreambench_dir / "dog2").glob("*.jpg"))[:2]
    edited = client.images.edit(image=[open(p, "rb") for p in paths], prompt="a dog on the beach", n=2, size="64x64",
                                response_format="b64_json", extra_body={"seed": 3, "steps": 4})
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in edited.data]
    assert len(images) == 2 and images[0].size == (64, 64) and edited.created > 0
    subject = register(f"{url}/locked", photos(dreambench_dir, "dog2", 2), headers=AS_A).json()["subject_id"]
    try:
        made = client.images.generate(prompt="a photo on the beach", n=1, extra_body={"subject_id": subject, "seed": 0, "steps": 4})
        png = base64.b64decode(made.data[0].b64_json)
        assert png == generate(f"{url}/locked", seed=0, subject_id=subject, headers=AS_A, accept="image/png").content
        with pytest.raises(openai.BadRequestError, match="subject_id"):
            client.images.generate(prompt="a dog")
        with pytest.raises(openai.BadRequestError, match="response_format"):
            client.images.generate(prompt="a dog", response_format="url", extra_body={"subject_id": subject})
        with pytest.raises(openai.NotFoundError, match="unknown subject_id"):
            client.images.generate(prompt="a dog", extra_body={"subject_id": "0" * 64})
        with pytest.raises(openai.BadRequestError, match="n"):
            client.images.generate(prompt="a dog", n=9, extra_body={"subject_id": subject})
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/locked/v1", api_key="not-a-key-0123456789").images.generate(
                prompt="a dog", extra_body={"subject_id": subject})
    finally:  # tenant A's quota left as found
        requests.delete(f"{url}/locked/v1/subjects/{subject}", headers=AS_A, timeout=30)


def test_a_torn_subject_fails_alone_in_its_batch(url, dreambench_dir, main_store):
    from ray_suti.serving.store import SubjectStore

    good = [register(url, photos(dreambench_dir, name, 2)).json()["subject_id"] for name in ("backpack", "can")]
    torn = register(url, photos(dreambench_dir, "backpack", 3)).json()["subject_id"]
    png = SubjectStore(str(main_store))._folder("default", torn) + "/1.png"
    with open(png, "r+b") as f:  # a half-written file, as a crashed copy would leave it
        f.truncate(500)
    subjects = [torn] + good * 2
    answers = [None] * len(subjects)

    def call(i):
        answers[i] = generate(url, seed=11, subject_id=subjects[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(subjects))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers[0].status_code == 422 and "register the photos again" in answers[0].json()["detail"]
    assert all(r.status_code == 200 for r in answers[1:]), [r.text for r in answers]
    assert max(r.json()["timings"]["batch_rows"] for r in answers[1:]) > 1  # they did share batches


def server_sent_events(response) -> list[tuple[str, dict]]:
    events, kind = [], None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((kind, json.loads(line.removeprefix("data: "))))
    return events


def test_progress_streams_as_server_sent_events(url, dreambench_dir):
    subject = register(url, photos(dreambench_dir, "dog2", 2)).json()["subject_id"]
    body = {"prompt": "a photo on the beach", "subject_id": subject, "steps": 6, "seed": 3}
    with requests.post(f"{url}/v1/generate", json=body, headers={"Accept": "text/event-stream"}, stream=True,
                       timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = server_sent_events(r)
    assert [e for kind, e in events[:-1]] == [{"step": i, "steps": 6} for i in range(1, 7)]
    kind, result = events[-1]
    assert kind == "result" and result["seed"] == 3
    same = generate(url, subject_id=subject, steps=6, seed=3, accept="image/png").content
    assert base64.b64decode(result["images"][0]) == same  # streaming changes nothing in the image
    with requests.post(f"{url}/v1/generate", json={**body, "subject_id": "0" * 64},
                       headers={"Accept": "text/event-stream"}, stream=True, timeout=120) as r:
        assert server_sent_events(r) == [("error", {"status": 404, "detail": "unknown subject_id"})]


def test_a_request_that_kills_replicas_takes_at_most_two(url, main_store, tmp_path):
    """A request that crashes every replica it reaches (a segfault, an out-of-memory kill) answers
    503 after two replica deaths, not after all of them: the ingress retries once, Serve's router
    may retry too, and the model replicas count the starts (generator.Attempts)."""
    import os

    from ray import serve

    from ray_suti.serving.batcher import Batcher
    from ray_suti.serving.generator import Generator
    from ray_suti.serving.ingress import Ingress

    killed = tmp_path / "killed.txt"

    class Crashing(Generator.func_or_class):  # the real replica, whose drawing ends its process
        def __init__(self, *args, **kwargs):  # no pipeline to load: it never draws (and restarts fast)
            self.batcher = Batcher(self.run_batch, max_batch_size=8)

        def run_batch(self, jobs, report=None):
            with open(killed, "a") as f:
                f.write(f"{os.getpid()}\n")
            os._exit(1)

    store = dict(root=str(main_store), max_images=5, max_side=1024, max_subjects=10, max_bytes=10**9, ttl_s=None)
    model = serve.deployment(Crashing, name="Generator").options(num_replicas=3, ray_actor_options={"num_cpus": 0})
    serve.run(Ingress.options(ray_actor_options={"num_cpus": 0}).bind(model.bind(CHECKPOINT, store, warmup=False),
                                                                      store, {"allow_anonymous": True}),
              name="crashing", route_prefix="/crashing")
    try:
        photo = base64.b64encode(encode_png(np.full((48, 48, 3), 128, np.uint8))).decode()
        r = generate(f"{url}/crashing", images=[photo])
        assert r.status_code == 503 and r.headers["Retry-After"], r.text
        time.sleep(2)  # a third replica, if one were wrongly handed the request, would be dead by now
        assert len(killed.read_text().split()) == 2
        assert generate(f"{url}/crashing", images=[photo]).status_code == 503  # a new request: new attempts
        assert len(killed.read_text().split()) <= 4
    finally:
        serve.delete("crashing")


def test_the_python_client_does_the_whole_round(url, dreambench_dir):
    from ray_suti.client import SuTIAPIError, SuTIClient

    client = SuTIClient(url)  # the open app (the locked one's tenants are at their quotas by now)
    paths = sorted((dreambench_dir / "backpack").glob("*.jpg"))[:2]
    subject = client.register(paths, captions=["a backpack", "a backpack"])
    other = client.register(sorted((dreambench_dir / "can").glob("*.jpg"))[:1])
    listed = [m["subject_id"] for m in client.list(page_size=1)]  # a page at a time, all of them
    assert {subject, other} <= set(listed) and len(listed) == len(set(listed)) and client.get(subject)["num_images"] == 2
    out = client.generate("a backpack in the snow", subject_id=subject, seed=5, steps=4, num_images=2)
    assert len(out.images) == 2 and out.images[0].size == (32, 32) and out.seed == 5
    raw = generate(url, seed=5, subject_id=subject, accept="image/png", prompt="a backpack in the snow")
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(Image.open(io.BytesIO(raw.content)).convert("RGB")))
    assert client.delete(subject) and not client.delete(subject)
    with pytest.raises(SuTIAPIError) as e:
        SuTIClient(f"{url}/locked", token="not-a-key-0123456789").model()
    assert e.value.status == 401


def test_metrics_reach_the_prometheus_endpoint(url, ray_local):
    """Requests by route and status, cache lookups, batch sizes and sampling time, as Prometheus
    reads them from the node's metrics port (exported every few seconds)."""
    import time

    from ray_suti.utils.images import encode_png
    from ray_suti.world import heldout_seeds, render
    from ray_suti.world.contexts import Context

    seed = heldout_seeds(1)[0]  # rendered photos: this test needs nothing outside the repo
    rendered = [encode_png(render(seed, Context(scene=s), 32)[0]) for s in ("beach", "forest")]
    subject = register(url, rendered).json()["subject_id"]
    assert generate(url, subject_id=subject, seed=1).status_code == 200  # a miss, then a hit
    assert generate(url, subject_id=subject, seed=2).status_code == 200
    assert requests.get(f"{url}/v1/subjects/{subject}", timeout=30).status_code == 200
    assert requests.get(f"{url}/locked/v1/model", timeout=30).status_code == 401
    node = ray_local._private.worker.global_worker.node
    wanted = ['ray_suti_requests_total{', 'route="POST /v1/generate"', 'status="401"', 'route="GET /v1/subjects/{subject_id}"',
              'ray_suti_feature_cache_total{', 'result="hit"', 'result="miss"', "ray_suti_batch_requests_bucket{",
              "ray_suti_sampling_seconds_sum{"]
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:
        text = requests.get(f"http://127.0.0.1:{node.metrics_export_port}/metrics", timeout=30).text
        if all(w in text for w in wanted):
            break
        time.sleep(3)
    assert all(w in text for w in wanted), [w for w in wanted if w not in text]
    assert 'subject_id="' not in text  # routes by template: ids never become series


def test_500_malformed_requests_all_get_a_4xx_and_the_service_still_generates(url, dreambench_dir):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
    values = st.recursive(leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                          max_leaves=8)
    keys = ("prompt", "subject_id", "images", "captions", "num_images", "steps", "guidance_text",
            "guidance_subject", "seed", "extra")
    requests_like = st.fixed_dictionaries({}, optional={k: values for k in keys})
    bodies = st.one_of(requests_like.map(json.dumps), values.map(json.dumps), st.binary(max_size=64))
    seen = []

    @settings(max_examples=500, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(path=st.sampled_from(["/v1/generate", "/v1/subjects"]), body=bodies)
    def malformed(path, body):
        r = requests.post(f"{url}{path}", data=body, headers={"Content-Type": "application/json"}, timeout=30)
        seen.append(r.status_code)
        assert 400 <= r.status_code < 500 and "detail" in r.json(), (path, body, r.status_code, r.text)

    malformed()
    assert len(seen) >= 500
    subject = register(url, photos(dreambench_dir, "can", 2)).json()["subject_id"]
    assert generate(url, subject_id=subject, accept="image/png").status_code == 200


def test_config_file_is_a_valid_serve_config_whose_import_path_builds():
    import importlib
    import sys

    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve" / "config.yaml").read_text()))
    app = config.applications[0]
    assert config.http_options.host == "127.0.0.1" and app.route_prefix == "/"
    module, attr = app.import_path.split(":")
    sys.path.insert(0, str(REPO))
    try:
        built = getattr(importlib.import_module(module), attr)(app.args)
    finally:
        sys.path.remove(str(REPO))
    from ray.serve import Application

    assert isinstance(built, Application)
    from ray_suti.serving.app import build_app

    with pytest.raises(ValueError, match="unknown scheduler"):
        build_app(CHECKPOINT, scheduler="os.system", allow_anonymous=True)
    production = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve" / "config.production.yaml").read_text()))
    assert production.applications[0].import_path == app.import_path
    assert production.applications[0].args["num_gpus"] == 1 and production.applications[0].args["max_replicas"] > 2
