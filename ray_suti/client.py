"""A Python client for the HTTP API (``ray_suti/serving/app.py``): photos in, PIL images out.

    from ray_suti.client import SuTIClient

    client = SuTIClient("http://127.0.0.1:8000", token=os.environ.get("SUTI_API_TOKEN"))
    subject = client.register(["dog/00.jpg", "dog/01.jpg"], captions=["a dog", "a dog"])
    images = client.generate("a dog on the beach", subject_id=subject, seed=0).images

A busy server (503) and dropped connections are retried with exponential backoff, waiting at
least what ``Retry-After`` asks; anything else that is not a success raises ``SuTIAPIError`` with
the server's status and reason.
"""
from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
from PIL import Image


class SuTIAPIError(RuntimeError):
    def __init__(self, status: int, detail: str):
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail


@dataclass
class Generated:
    images: list[Image.Image]
    seed: int
    timings: dict = field(default_factory=dict)


def _photo_bytes(photo) -> bytes:
    """A path, bytes or a PIL image -> encoded bytes (PIL images as PNG)."""
    if isinstance(photo, (bytes, bytearray)):
        return bytes(photo)
    if isinstance(photo, Image.Image):
        buf = io.BytesIO()
        photo.save(buf, format="PNG")
        return buf.getvalue()
    return Path(photo).read_bytes()


class SuTIClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", token: str | None = None, timeout_s: float = 300.0,
                 retries: int = 5, backoff_s: float = 1.0):
        self.base_url, self.timeout, self.retries, self.backoff = base_url.rstrip("/"), timeout_s, retries, backoff_s
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def _request(self, method: str, path: str, ok=(200,), **kwargs) -> requests.Response:
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2**attempt
            try:
                r = self.session.request(method, f"{self.base_url}{path}", timeout=self.timeout, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as e:
                if attempt == self.retries:
                    raise SuTIAPIError(0, f"no answer from {self.base_url}: {type(e).__name__}") from None
            else:
                if r.status_code in ok:
                    return r
                if r.status_code != 503 or attempt == self.retries:
                    try:
                        detail = r.json()["detail"]
                    except (ValueError, KeyError, TypeError):
                        detail = r.text[:500]
                    raise SuTIAPIError(r.status_code, detail if isinstance(detail, str) else str(detail))
                after = r.headers.get("Retry-After", "")
                wait = max(wait, float(after) if after.isdigit() else 0.0)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def health(self) -> bool:
        return self._request("GET", "/healthz").json().get("ok", False)

    def model(self) -> dict:
        return self._request("GET", "/v1/model").json()

    def register(self, photos: list, captions: list[str] | None = None) -> str:
        """1-5 photos (paths, bytes or PIL images) -> the subject's id."""
        files = [("images", (f"{i}.img", _photo_bytes(p), "application/octet-stream")) for i, p in enumerate(photos)]
        data = [("captions", c) for c in captions or []]
        return self._request("POST", "/v1/subjects", ok=(201,), files=files, data=data).json()["subject_id"]

    def generate(self, prompt: str, subject_id: str | None = None, photos: list | None = None,
                 captions: list[str] | None = None, **settings) -> Generated:
        """Draw a registered subject (or photos sent along, not stored). ``settings``: num_images,
        steps, guidance_text, guidance_subject, guidance_mode, seed, box, keypoints, edges (as the API)."""
        body = {"prompt": prompt, **{k: v for k, v in settings.items() if v is not None}}
        if subject_id is not None:
            body["subject_id"] = subject_id
        if photos is not None:
            body["images"] = [base64.b64encode(_photo_bytes(p)).decode() for p in photos]
            if captions is not None:
                body["captions"] = captions
        if body.get("edges") is not None:  # an outline image: a path, bytes or a PIL image
            body["edges"] = base64.b64encode(_photo_bytes(body["edges"])).decode()
        out = self._request("POST", "/v1/generate", json=body).json()
        images = [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in out["images"]]
        return Generated(images, out["seed"], out.get("timings", {}))

    def list(self, page_size: int = 100):
        """Every subject of yours (metadata dicts), fetched a page at a time."""
        after = ""
        while True:
            page = self._request("GET", "/v1/subjects", params={"limit": page_size, "after": after}).json()
            yield from page["subjects"]
            if not page["next"]:
                return
            after = page["next"]

    def get(self, subject_id: str) -> dict:
        return self._request("GET", f"/v1/subjects/{subject_id}").json()

    def delete(self, subject_id: str) -> bool:
        """True when deleted, False when there was no such subject."""
        try:
            self._request("DELETE", f"/v1/subjects/{subject_id}", ok=(204,))
            return True
        except SuTIAPIError as e:
            if e.status == 404:
                return False
            raise

