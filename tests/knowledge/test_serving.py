"""Re-Imagen over HTTP: "retrieve" draws with the deployment's (or the tenant's) knowledge base."""
import base64
import shutil

import pytest
import requests
import torch

from ray_suti.serving.auth import DEFAULT_TENANT
from ray_suti.utils.images import encode_png

from ..conftest import REPO, free_port

CHECKPOINT = str(REPO / "checkpoints" / "tiny-32.safetensors")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def url(ray_local, kb_path, tmp_path_factory):
    from ray import serve

    from ray_suti.serving.app import build_app

    port, store = free_port(), str(tmp_path_factory.mktemp("subjects"))
    tenants = tmp_path_factory.mktemp("tenant-kbs")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run_many([  # deployed together: the replicas start side by side
        serve.RunTarget(build_app(CHECKPOINT, store, max_replicas=1, num_cpus=0.5, allow_anonymous=True,
                            knowledge_base=kb_path), name="kb", route_prefix="/"),
        serve.RunTarget(build_app(CHECKPOINT, store, max_replicas=1, num_cpus=0.5, allow_anonymous=True,
                            knowledge_base=str(tenants / "{tenant}")), name="per-tenant", route_prefix="/tenant")])
    yield f"http://127.0.0.1:{port}", tenants
    serve.shutdown()


def draw(url, **body):
    body = {"prompt": "a toy on the beach", "steps": 4, "seed": 0, **body}
    return requests.post(f"{url}/v1/generate", json=body, timeout=120)


def test_retrieve_draws_with_the_neighbours_and_says_which(url, kb_path):
    from ray_suti.knowledge import KnowledgeBase
    from ray_suti.model.pipeline import load_pipeline

    base, _ = url
    assert requests.get(f"{base}/v1/model", timeout=30).json()["knowledge_base"] is True
    r = draw(base, retrieve={"k": 2})
    assert r.status_code == 200, r.text
    answer = r.json()
    used = answer["neighbours"]
    assert len(used) == 2 and len({n["page"] for n in used}) == 1 and answer["timings"]["retrieval_s"] > 0
    kb = KnowledgeBase(kb_path)
    found = kb.search("a toy on the beach", 2)
    assert [n["id"] for n in used] == [n.id for n in found]
    pipe = load_pipeline(CHECKPOINT).set_scheduler("ddim")
    pipe.set_progress_bar_config(disable=True)
    same = pipe("a toy on the beach", pipe.encode_subject([n.image for n in found], [n.caption for n in found]),
                num_inference_steps=4, output_type="np", generator=[torch.Generator().manual_seed(0)]).images[0]
    assert base64.b64decode(answer["images"][0]) == encode_png((same * 255).round().astype("uint8"))

    assert draw(base, retrieve={"k": 2}, subject_id="0" * 64).status_code == 422  # one source of demos
    assert draw(base, retrieve={"k": 9}).status_code == 422


def test_a_tenant_without_its_knowledge_base_gets_422_until_it_is_built(url, kb_path):
    base, tenants = url
    r = draw(f"{base}/tenant", retrieve={"k": 2})
    assert r.status_code == 422 and "no knowledge base" in r.json()["detail"]
    shutil.copytree(kb_path, tenants / DEFAULT_TENANT)
    r = draw(f"{base}/tenant", retrieve={"k": 2})
    assert r.status_code == 200 and len(r.json()["neighbours"]) == 2


def test_the_page_draws_from_the_knowledge_base_and_lists_the_neighbours(url, browser):
    from selenium.webdriver.common.by import By

    from ..browser import wait_for

    base, _ = url
    find = lambda css: browser.find_element(By.CSS_SELECTOR, css)  # noqa: E731
    browser.get(f"{base}/")
    wait_for(browser, lambda d: find("#kb-box").is_displayed())
    assert find("#generate").get_attribute("disabled") is not None  # no subject, no knowledge base yet
    find("#use-kb").click()
    find("#prompt").send_keys("a toy on the beach")
    find("#steps").clear()
    find("#steps").send_keys("4")
    find("#generate").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#results .neighbours li"))
    listed = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#results .neighbours li")]
    assert len(listed) == 3 and all(" · " in text for text in listed)
    assert requests.get(f"{base}/v1/subjects", timeout=30).json()["subjects"] == []  # nothing was registered
