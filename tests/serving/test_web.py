"""The web page in a real headless Chromium (Debian's chromium + chromium-driver, installed by
`make test`): key, upload, generate with step progress, delete, as a person would."""
import base64
import os
from pathlib import Path

import pytest
import requests

from ..browser import wait_for
from .conftest import KEY_C, generate

pytestmark = pytest.mark.slow
AS_C = {"Authorization": f"Bearer {KEY_C}"}


def screenshot(driver, name):
    """Into $RAY_SUTI_SCREENSHOTS (docs/images when refreshing the docs' pictures)."""
    folder = os.environ.get("RAY_SUTI_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / name))


def test_a_person_registers_draws_and_deletes_in_the_browser(url, browser, dreambench_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    page = f"{url}/locked"  # the app that wants keys: the page must ask for one
    find = lambda css: browser.find_element(By.CSS_SELECTOR, css)  # noqa: E731
    browser.get(page)
    wait_for(browser, lambda d: find("#token-box").is_displayed())
    assert "API key" in find("#error").text
    find("#token").send_keys(KEY_C + Keys.TAB)  # change event: stored, then connected
    wait_for(browser, lambda d: "tiny-32" in find("#model").text)
    assert not find("#error").is_displayed()

    photos = sorted((dreambench_dir / "dog2").glob("*.jpg"))[:3]
    find("#photos").send_keys("\n".join(str(p) for p in photos))
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#previews img")) == 3)
    find("#register").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".subject.selected .thumbs img")) == 3)
    [subject] = [s["subject_id"] for s in requests.get(f"{page}/v1/subjects", headers=AS_C, timeout=30).json()["subjects"]]
    assert find(".subject.selected").get_attribute("data-id") == subject
    thumbs_loaded = "return [...document.querySelectorAll('.subject img')].every(i => i.complete && i.naturalWidth > 0)"
    wait_for(browser, lambda d: d.execute_script(thumbs_loaded))

    # Record every progress text the page shows (a MutationObserver: steps come faster than polling).
    browser.execute_script("""window.seen = []; new MutationObserver(() => window.seen.push(
        document.getElementById('progress-text').textContent)).observe(document.getElementById('progress-text'),
        {childList: true, characterData: true, subtree: true});""")
    find("#prompt").send_keys("a dog on the beach")
    for field, value in (("#steps", "12"), ("#seed", "7")):
        find(field).clear()
        find(field).send_keys(value)
    find("#generate").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#results img"))
    seen = browser.execute_script("return window.seen")
    assert "step 12 of 12" in seen and any(s.startswith("step ") and s != "step 12 of 12" for s in seen), seen
    src = find("#results img").get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    same = generate(page, seed=7, subject_id=subject, steps=12, prompt="a dog on the beach", headers=AS_C,
                    accept="image/png")
    assert base64.b64decode(src.split(",", 1)[1]) == same.content  # what the API draws for these settings
    assert "seed 7" in find("#results figcaption").text

    # Draw a box where the subject should go: the request carries it, the image follows it.
    find("#controls summary").click()
    ActionChains(browser).move_to_element_with_offset(find("#layout"), -50, -40).click_and_hold() \
        .move_by_offset(60, 90).release().perform()
    box = browser.execute_script("return state.box.map(v => Math.round(v * 1000) / 1000)")
    assert 0.2 < box[0] < box[2] < 0.7 and 0.2 < box[1] < box[3] < 0.8, box
    find("#generate").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results img")) == 2)
    boxed = base64.b64decode(find("#results img").get_attribute("src").split(",", 1)[1])  # the newest comes first
    assert boxed != same.content
    assert boxed == generate(page, seed=7, subject_id=subject, steps=12, prompt="a dog on the beach", box=box,
                             headers=AS_C, accept="image/png").content
    screenshot(browser, "web-page.png")

    find("#steps").clear()
    find("#steps").send_keys("500")  # past the API's limit: the page shows why, nothing else changes
    find("#generate").click()
    wait_for(browser, lambda d: find("#error").is_displayed())
    assert "422" in find("#error").text and "steps" in find("#error").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results img")) == 2

    find(".subject.selected .delete").click()
    wait_for(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, ".subject"))
    assert requests.get(f"{page}/v1/subjects", headers=AS_C, timeout=30).json()["subjects"] == []
    assert find("#generate").get_attribute("disabled") is not None  # nothing left to draw
