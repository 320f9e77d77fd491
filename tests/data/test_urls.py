import pytest

from ray_suti.data.urls import normalize_page_url
from ray_suti.world.crawl import TRACKING_SUFFIXES, canonical_page_url


@pytest.mark.parametrize("variant", [
    "HTTPS://WWW.SHOP3.EXAMPLE/items/3", "https://www.shop3.example/items/3/", "https://www.shop3.example/items/3#gallery",
    "https://www.shop3.example/items/3?utm_source=feed&utm_medium=email", "https://www.shop3.example:443/items/3",
    "https://www.shop3.example/items/3?fbclid=AbC123", "https://www.shop3.example./items/3?gclid=xyz#top",
])
def test_spellings_of_one_page_share_a_key(variant):
    assert normalize_page_url(variant) == normalize_page_url("https://www.shop3.example/items/3")


def test_every_noise_the_world_adds_is_undone():
    url = canonical_page_url(42)
    scheme, rest = url.split("://")
    for suffix in TRACKING_SUFFIXES:
        for noisy in (url + suffix, f"{scheme.upper()}://{rest.upper().split('/')[0]}/{rest.split('/', 1)[1]}{suffix}"):
            assert normalize_page_url(noisy) == normalize_page_url(url), noisy


def test_different_pages_stay_apart_and_junk_is_refused():
    assert normalize_page_url("https://a.example/items/3") != normalize_page_url("https://a.example/items/4")
    assert normalize_page_url("https://a.example/Items/3") != normalize_page_url("https://a.example/items/3")
    assert normalize_page_url("https://a.example/p?id=1") != normalize_page_url("https://a.example/p?id=2")
    assert normalize_page_url("https://a.example/p?b=2&a=1") == normalize_page_url("https://a.example/p?a=1&b=2")
    assert normalize_page_url("http://a.example:8080/p") != normalize_page_url("http://a.example/p")
    for bad in (None, "", "   ", "not a url", "https://a.example:port/x", 17):
        assert normalize_page_url(bad) is None
