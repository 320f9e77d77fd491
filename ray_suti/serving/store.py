"""Registered subjects in a folder or object storage (s3://...), by content hash.

A subject is its photos (re-encoded as PNG after checks) and captions; its id is the SHA-256 of
those, so registering the same photos twice gives the same id and costs nothing. Ids are checked
against ``^[0-9a-f]{64}$`` before any path is built: nothing from a request becomes a file name.
Deleting a subject removes its folder (people can take their photos back). Every replica of every
node sees the same subjects when the root is shared storage. A subject is readable once its
``captions.json`` exists, which is written last, each file whole (see utils.storage).
"""
from __future__ import annotations

import hashlib
import io
import json
import re

from PIL import Image

from ..utils import storage
from ..utils.images import inspect_image

ID = re.compile(r"^[0-9a-f]{64}$")


class SubjectError(ValueError):
    """A request's photos or captions cannot make a subject (the API answers 4xx)."""


class SubjectStore:
    def __init__(self, root: str, max_images: int = 5, max_pixels: int = 4096 * 4096, min_side: int = 16):
        self.root, self.max_images, self.max_pixels, self.min_side = root, max_images, max_pixels, min_side

    def _folder(self, subject_id: str) -> str | None:
        return storage.join(self.root, subject_id) if isinstance(subject_id, str) and ID.match(subject_id) else None

    def put(self, images: list[bytes], captions: list[str] | None = None) -> str:
        if not 1 <= len(images) <= self.max_images:
            raise SubjectError(f"give 1 to {self.max_images} images, got {len(images)}")
        captions = list(captions or [""] * len(images))
        if len(captions) != len(images) or not all(isinstance(c, str) and len(c) <= 300 for c in captions):
            raise SubjectError("captions must be one string (at most 300 characters) per image")
        pngs = []
        for i, data in enumerate(images):
            try:
                img = self.check(data)
            except SubjectError as e:
                raise SubjectError(f"image {i}: {e}") from None
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            pngs.append(buf.getvalue())
        digest = hashlib.sha256()
        for png, caption in zip(pngs, captions):
            digest.update(hashlib.sha256(png).digest() + hashlib.sha256(caption.encode()).digest())
        subject_id = digest.hexdigest()
        if not self.exists(subject_id):  # a concurrent registration of it writes the same bytes
            folder = self._folder(subject_id)
            for i, png in enumerate(pngs):
                storage.write_bytes(storage.join(folder, f"{i}.png"), png)
            storage.write_bytes(storage.join(folder, "captions.json"), json.dumps(captions).encode())
        return subject_id

    def check(self, data: bytes) -> Image.Image:
        """Encoded photo -> RGB image, or SubjectError (not an image, truncated, too small or too many
        pixels: the size is read from the header, before decoding)."""
        if not isinstance(data, (bytes, bytearray)):
            raise SubjectError("not image bytes")
        img, reason = inspect_image(bytes(data), min_side=self.min_side, max_pixels=self.max_pixels)
        if reason:
            raise SubjectError(reason.replace("_", " "))
        return img.convert("RGB")

    def exists(self, subject_id: str) -> bool:
        folder = self._folder(subject_id)
        return folder is not None and storage.is_file(storage.join(folder, "captions.json"))

    def get(self, subject_id: str) -> tuple[list[Image.Image], list[str]] | None:
        if not self.exists(subject_id):
            return None
        folder = self._folder(subject_id)
        try:
            captions = json.loads(storage.read_bytes(storage.join(folder, "captions.json")))
            images = [Image.open(io.BytesIO(storage.read_bytes(storage.join(folder, f"{i}.png")))).convert("RGB")
                      for i in range(len(captions))]
        except FileNotFoundError:  # deleted meanwhile
            return None
        return images, captions

    def delete(self, subject_id: str) -> bool:
        if not self.exists(subject_id):
            return False
        storage.delete_dir(self._folder(subject_id))
        return True
