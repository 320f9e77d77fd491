"""Retrieval from a knowledge base (``index.py``): a prompt's nearest image-text pairs, one page's.

Candidates come from three searches in LanceDB: the prompt's CLIP text embedding against the image
embeddings (text-to-image) and the caption embeddings (text-to-text), and BM25 full-text search on
the captions (names CLIP never learned: "the Zorvik mug"). Each candidate scores
``w_image * cos(q, image) + w_text * cos(q, caption) + w_words * bm25 / best bm25``; pages score by
their best entry, and the neighbours are the best page's top ``k`` entries, so the demos show one
subject.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from .index import META, TABLE, read_meta


@dataclass
class Neighbour:
    id: str
    page: str
    caption: str
    score: float
    image: object  # PIL.Image

    def describe(self) -> dict:
        return {"id": self.id, "page": self.page, "caption": self.caption, "score": round(self.score, 4)}


class KnowledgeBase:
    def __init__(self, uri: str, device: str = "cpu", candidates: int = 50, weights: tuple = (0.5, 0.5, 1.0)):
        import lancedb

        self.meta = read_meta(uri)
        if self.meta is None:
            raise FileNotFoundError(f"{uri} holds no knowledge base ({META} missing): build one with `ray-suti index`")
        self.uri, self.device, self.candidates, self.weights = uri, device, candidates, weights
        self.table = lancedb.connect(uri).open_table(TABLE)
        self._clip = None

    def __len__(self) -> int:
        return self.table.count_rows()

    def embed(self, texts: list[str]) -> np.ndarray:
        from ..data.clip import embed_texts, load_clip

        if self._clip is None:
            self._clip = load_clip(self.meta["clip_model"], self.meta["clip_pretrained"], self.device)[0]
        return embed_texts(self._clip, texts, self.meta["clip_model"], self.device).astype(np.float32)

    def search(self, prompt: str, k: int = 3) -> list[Neighbour]:
        """The best page's ``k`` best entries for ``prompt`` (fewer when the page has fewer)."""
        query = self.embed([prompt])[0]
        ids = set()
        for column in ("image_emb", "text_emb"):
            hits = self.table.search(query, vector_column_name=column).distance_type("cosine") \
                .select(["id"]).limit(self.candidates).to_arrow()
            ids.update(hits["id"].to_pylist())
        words = self._words(prompt)
        ids.update(words)
        if not ids:
            return []
        candidates = self._rows(f"id IN ({quote_list(ids)})")
        scores = self._score(candidates, query, words)
        best_page = candidates["page"][int(np.argmax(scores))]
        page = self._rows(f"page = {quote(best_page)}")  # the whole page: its best entries may not be candidates
        page_scores = self._score(page, query, words)
        order = np.argsort(-page_scores, kind="stable")[:k]
        images = self._images([page["id"][i] for i in order])
        return [Neighbour(page["id"][i], best_page, page["caption"][i], float(page_scores[i]), images[page["id"][i]])
                for i in order]

    def _words(self, prompt: str) -> dict[str, float]:
        """BM25 scores of the captions matching the prompt's words, scaled to [0, 1]."""
        try:
            hits = self.table.search(prompt, query_type="fts").select(["id"]).limit(self.candidates).to_arrow()
        except (ValueError, RuntimeError):  # a prompt the query parser refuses: no lexical evidence
            return {}
        if hits.num_rows == 0:
            return {}
        scores = np.asarray(hits["_score"].to_pylist(), dtype=np.float64)
        return dict(zip(hits["id"].to_pylist(), scores / max(scores.max(), 1e-9)))

    def _rows(self, where: str) -> dict:
        table = self.table.search().where(where).select(["id", "page", "caption", "image_emb", "text_emb"]) \
            .limit(None).to_arrow()
        return {"id": table["id"].to_pylist(), "page": table["page"].to_pylist(),
                "caption": table["caption"].to_pylist(),
                "image_emb": np.stack(table["image_emb"].to_numpy(zero_copy_only=False)),
                "text_emb": np.stack(table["text_emb"].to_numpy(zero_copy_only=False))}

    def _score(self, rows: dict, query: np.ndarray, words: dict[str, float]) -> np.ndarray:
        w_image, w_text, w_words = self.weights
        lexical = np.array([words.get(i, 0.0) for i in rows["id"]])
        return w_image * rows["image_emb"] @ query + w_text * rows["text_emb"] @ query + w_words * lexical

    def _images(self, ids: list[str]) -> dict:
        from PIL import Image

        table = self.table.search().where(f"id IN ({quote_list(ids)})").select(["id", "image"]).limit(None).to_arrow()
        return {i: Image.open(io.BytesIO(data)).convert("RGB")
                for i, data in zip(table["id"].to_pylist(), table["image"].to_pylist())}


def quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def quote_list(values) -> str:
    return ", ".join(quote(v) for v in values)
