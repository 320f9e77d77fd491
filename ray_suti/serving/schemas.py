"""The API's request bodies and limits (pydantic: unknown fields and wrong types are refused)."""
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_IMAGES = 5
CONTROLS = ("box", "keypoints", "edges")


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    k: int = Field(default=3, ge=1, le=MAX_IMAGES, description="neighbours from the knowledge base used as demos")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = Field(min_length=1, max_length=500)
    subject_id: str | None = Field(default=None, description="from POST /v1/subjects")
    images: list[str] | None = Field(default=None, min_length=1, max_length=MAX_IMAGES,
                                     description="base64 photos, instead of a subject_id")
    captions: list[str] | None = Field(default=None, max_length=MAX_IMAGES)
    retrieve: RetrieveRequest | None = Field(
        default=None, description="Re-Imagen: the demos are the prompt's nearest pairs in the deployment's knowledge base")
    num_images: int = Field(default=1, ge=1, le=4)
    steps: int = Field(default=25, ge=1, le=100)
    guidance_text: float = Field(default=1.5, ge=0.0, le=20.0)
    guidance_subject: float = Field(default=1.5, ge=0.0, le=20.0)
    guidance_mode: Literal["branches", "interleaved", "reimagen"] = Field(
        default="branches", description="interleaved: separate scales for two UNet passes a step instead of three")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="same seed, same image")
    box: list[float] | None = Field(default=None, min_length=4, max_length=4,
                                    description="where and how large: [x0, y0, x1, y1], fractions of the image")
    keypoints: list[list[float]] | None = Field(
        default=None, min_length=2, max_length=2,
        description="which way up: [[x, y] of the subject's top], [x, y] of its right-hand side]], fractions of the image")
    edges: str | None = Field(default=None, description="the outline: a base64 image, bright lines on dark")

    @model_validator(mode="after")
    def one_subject(self):
        if sum(x is not None for x in (self.subject_id, self.images, self.retrieve)) != 1:
            raise ValueError("give exactly one of subject_id, images or retrieve")
        if not self.prompt.strip():
            raise ValueError("prompt must not be blank")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise ValueError("box must be [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        if self.keypoints is not None and not all(len(p) == 2 and all(0 <= v <= 1 for v in p) for p in self.keypoints):
            raise ValueError("keypoints must be two [x, y] points with coordinates in [0, 1]")
        return self

    def branches(self) -> int:
        """UNet rows a step per image (the guidance branches this request's settings run)."""
        return 2 if self.guidance_mode == "interleaved" else 3


class SubjectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    images: list[str] = Field(min_length=1, max_length=MAX_IMAGES, description="base64 photos")
    captions: list[str] | None = Field(default=None, max_length=MAX_IMAGES)
