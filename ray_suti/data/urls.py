"""Page URLs as crawls write them -> one key per page.

The same page reaches a crawl spelled many ways: ``HTTPS://WWW.Shop.example/items/7/``,
``https://www.shop.example/items/7#gallery``, ``...?utm_source=feed``. Grouping by the raw string
would split one page's photos into several clusters, so URLs are normalised first: scheme and host
lower-cased, default ports, fragments, tracking query parameters and a trailing slash dropped, the
remaining query parameters sorted. Path case is kept (paths are case-sensitive on most servers).
"""
from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

TRACKING_PREFIXES = ("utm_",)
TRACKING_PARAMS = frozenset({"fbclid", "gclid", "dclid", "msclkid", "mc_cid", "mc_eid", "igshid", "yclid",
                             "_ga", "_gl", "ref_src", "spm"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_page_url(url: str | None) -> str | None:
    """A canonical key for the page, or None when there is no usable URL."""
    if not url or not isinstance(url, str) or not url.strip():
        return None
    try:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").lower().rstrip(".")
        port = parts.port
    except ValueError:  # e.g. a port that is not a number
        return None
    if not scheme or not host:
        return None
    netloc = host if port in (None, DEFAULT_PORTS.get(scheme)) else f"{host}:{port}"
    path = parts.path.rstrip("/") or ""
    query = sorted((k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                   if not k.lower().startswith(TRACKING_PREFIXES) and k.lower() not in TRACKING_PARAMS)
    return urlunsplit((scheme, netloc, path, urlencode(query), ""))
