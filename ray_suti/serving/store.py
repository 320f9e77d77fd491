"""Registered subjects on disk, by content hash.

A subject is its photos (re-encoded as PNG after checks) and captions; its id is the SHA-256 of
those, so registering the same photos twice gives the same id and costs nothing. Ids are checked
against ``^[0-9a-f]{64}$`` before any path is built: nothing from a request becomes a file name.
Deleting a subject removes its folder (people can take their photos back).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile

from PIL import Image

from ..utils.images import inspect_image

ID = re.compile(r"^[0-9a-f]{64}$")


class SubjectError(ValueError):
    """A request's photos or captions cannot make a subject (the API answers 4xx)."""


class SubjectStore:
    def __init__(self, root: str, max_images: int = 5, max_pixels: int = 4096 * 4096, min_side: int = 16):
        self.root, self.max_images, self.max_pixels, self.min_side = root, max_images, max_pixels, min_side
        os.makedirs(root, exist_ok=True)

    def _folder(self, subject_id: str) -> str | None:
        return os.path.join(self.root, subject_id) if isinstance(subject_id, str) and ID.match(subject_id) else None

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
        folder = self._folder(subject_id)
        if not os.path.isdir(folder):
            tmp = tempfile.mkdtemp(prefix=".new-", dir=self.root)  # written whole, then renamed into place
            for i, png in enumerate(pngs):
                with open(os.path.join(tmp, f"{i}.png"), "wb") as f:
                    f.write(png)
            with open(os.path.join(tmp, "captions.json"), "w") as f:
                json.dump(captions, f)
            try:
                os.rename(tmp, folder)
            except OSError:  # registered meanwhile by another request: same content
                shutil.rmtree(tmp, ignore_errors=True)
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
        return folder is not None and os.path.isdir(folder)

    def get(self, subject_id: str) -> tuple[list[Image.Image], list[str]] | None:
        folder = self._folder(subject_id)
        if folder is None or not os.path.isdir(folder):
            return None
        with open(os.path.join(folder, "captions.json")) as f:
            captions = json.load(f)
        images = [Image.open(os.path.join(folder, f"{i}.png")).convert("RGB") for i in range(len(captions))]
        return images, captions

    def delete(self, subject_id: str) -> bool:
        folder = self._folder(subject_id)
        if folder is None or not os.path.isdir(folder):
            return False
        shutil.rmtree(folder)
        return True
