"""Registered subjects, per tenant, in a folder or object storage (s3://...), by content hash.

A subject is its photos (checked, shrunk to at most ``max_side`` pixels a side, re-encoded as PNG)
and captions, under ``<root>/<tenant folder>/<id>/``; its id is the SHA-256 of the tenant and that
content, so registering the same photos twice gives the same id and costs nothing, and two tenants
never share an id (nor can one derive another's). The tenant folder is a hash of the tenant's name:
nothing from a request becomes a path, and ids are checked against ``^[0-9a-f]{64}$`` first.

``meta.json`` (captions, sizes, bytes, times) is written last and each file is written whole (see
utils.storage), so a subject is either complete or absent. Deleting removes the folder (people can
take their photos back). Quotas (subjects and bytes per tenant) are checked against a listing of
the tenant's folder at registration; two registrations racing past the limit can both land.
Subjects with a time-to-live answer as absent once expired and are removed when next touched.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import time

import numpy as np
from PIL import Image

from ..utils import storage
from ..utils.images import encode_png, inspect_image

ID = re.compile(r"^[0-9a-f]{64}$")


class SubjectError(ValueError):
    """A request's photos or captions cannot make a subject (the API answers 422)."""


class QuotaError(SubjectError):
    """A tenant is at its subject or byte quota (the API answers 429)."""


class SubjectStore:
    def __init__(self, root: str, max_images: int = 5, max_side: int = 1024, max_subjects: int = 1000,
                 max_bytes: int = 2 * 1024**3, ttl_s: float | None = None):
        self.root, self.max_images = root, max_images
        self.max_side, self.max_subjects, self.max_bytes, self.ttl_s = max_side, max_subjects, max_bytes, ttl_s

    def _tenant_root(self, tenant: str) -> str:
        return storage.join(self.root, "t-" + hashlib.sha256(tenant.encode()).hexdigest()[:24])

    def _folder(self, tenant: str, subject_id: str) -> str | None:
        if not (isinstance(subject_id, str) and ID.match(subject_id)):
            return None
        return storage.join(self._tenant_root(tenant), subject_id)

    def check(self, data: bytes) -> Image.Image:
        """Encoded photo -> RGB image at most ``max_side`` a side, or SubjectError (not an image,
        truncated, or outside utils.images' limits: the size is read from the header, before decoding)."""
        if not isinstance(data, (bytes, bytearray)):
            raise SubjectError("not image bytes")
        img, reason = inspect_image(bytes(data))
        if reason:
            raise SubjectError(reason.replace("_", " "))
        img = img.convert("RGB")
        if max(img.size) > self.max_side:
            scale = self.max_side / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
        return img

    def put(self, tenant: str, images: list[bytes], captions: list[str] | None = None) -> str:
        if not 1 <= len(images) <= self.max_images:
            raise SubjectError(f"give 1 to {self.max_images} images, got {len(images)}")
        captions = list(captions or [""] * len(images))
        if len(captions) != len(images) or not all(isinstance(c, str) and len(c) <= 300 for c in captions):
            raise SubjectError("captions must be one string (at most 300 characters) per image")
        pngs, sizes = [], []
        for i, data in enumerate(images):
            try:
                img = self.check(data)
            except SubjectError as e:
                raise SubjectError(f"image {i}: {e}") from None
            pngs.append(encode_png(np.asarray(img)))
            sizes.append(list(img.size))
        digest = hashlib.sha256(b"tenant\0" + tenant.encode() + b"\0")
        for png, caption in zip(pngs, captions):
            digest.update(hashlib.sha256(png).digest() + hashlib.sha256(caption.encode()).digest())
        subject_id = digest.hexdigest()
        if self.meta(tenant, subject_id) is not None:  # the same photos again
            return subject_id
        count, used = self.usage(tenant)
        size = sum(map(len, pngs))
        if count + 1 > self.max_subjects:
            raise QuotaError(f"subject quota reached ({self.max_subjects} subjects): delete some first")
        if used + size > self.max_bytes:
            raise QuotaError(f"storage quota reached ({used + size} of {self.max_bytes} bytes): delete some first")
        folder, now = self._folder(tenant, subject_id), time.time()
        for i, png in enumerate(pngs):
            storage.write_bytes(storage.join(folder, f"{i}.png"), png)
        meta = {"captions": captions, "sizes": sizes, "bytes": size, "created": now,
                "expires": now + self.ttl_s if self.ttl_s else None}
        storage.write_bytes(storage.join(folder, "meta.json"), json.dumps(meta).encode())  # last: now it exists
        return subject_id

    def meta(self, tenant: str, subject_id: str) -> dict | None:
        """The subject's metadata, or None when it is not stored (or expired: then it is removed)."""
        folder = self._folder(tenant, subject_id)
        if folder is None:
            return None
        try:
            meta = json.loads(storage.read_bytes(storage.join(folder, "meta.json")))
        except (FileNotFoundError, OSError):
            return None
        if meta.get("expires") and meta["expires"] < time.time():
            self._remove(folder)
            return None
        return {"subject_id": subject_id, "num_images": len(meta["captions"]), **meta}

    def exists(self, tenant: str, subject_id: str) -> bool:
        return self.meta(tenant, subject_id) is not None

    def get(self, tenant: str, subject_id: str) -> tuple[list[Image.Image], list[str]] | None:
        meta = self.meta(tenant, subject_id)
        if meta is None:
            return None
        folder = self._folder(tenant, subject_id)
        try:
            images = [Image.open(io.BytesIO(storage.read_bytes(storage.join(folder, f"{i}.png")))).convert("RGB")
                      for i in range(meta["num_images"])]
        except (OSError, ValueError, SyntaxError) as e:  # deleted meanwhile, or a torn file
            raise SubjectError(f"subject {subject_id[:12]}... cannot be read ({type(e).__name__})") from None
        return images, meta["captions"]

    def photo(self, tenant: str, subject_id: str, index: int) -> bytes | None:
        """One stored photo's PNG, or None when the subject or that photo is not stored."""
        meta = self.meta(tenant, subject_id)
        if meta is None or not 0 <= index < meta["num_images"]:
            return None
        try:
            return storage.read_bytes(storage.join(self._folder(tenant, subject_id), f"{index}.png"))
        except (FileNotFoundError, OSError):
            return None

    def list(self, tenant: str, limit: int = 50, after: str = "") -> tuple[list[dict], str | None]:
        """One page of the tenant's subjects, in id order, after ``after``; and the cursor of the next."""
        ids = [n for n in storage.listdir(self._tenant_root(tenant)) if ID.match(n) and n > after]
        page = []
        for subject_id in ids:
            meta = self.meta(tenant, subject_id)
            if meta is not None:
                page.append(meta)
            if len(page) == limit:
                break
        more = page and any(n > page[-1]["subject_id"] for n in ids)
        return page, (page[-1]["subject_id"] if more else None)

    def usage(self, tenant: str) -> tuple[int, int]:
        """(subjects, bytes) the tenant holds: one recursive listing."""
        import pyarrow.fs as pafs

        fs, path = storage.resolve(self._tenant_root(tenant))
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        files = [i for i in infos if i.type == pafs.FileType.File]
        return sum(i.base_name == "meta.json" for i in files), sum(i.size or 0 for i in files)

    def delete(self, tenant: str, subject_id: str) -> bool:
        if not self.exists(tenant, subject_id):
            return False
        self._remove(self._folder(tenant, subject_id))
        return True

    @staticmethod
    def _remove(folder: str) -> None:
        try:
            storage.delete_dir(folder)
        except (FileNotFoundError, OSError):  # removed by a concurrent call
            pass
