"""Retrieval from a knowledge base (``index.py``): a prompt's nearest image-text pairs, one page's.

Candidates come from three searches in LanceDB: the prompt's CLIP text embedding against the image
embeddings (text-to-image) and the caption embeddings (text-to-text), and BM25 full-text search on
the captions. A name CLIP never learned ("the Zorvik mug") is a word of the prompt that few
captions contain, repeated on the pages it is on: BM25 alone would let five context words outweigh
it, so entries that contain a name get their own term (``_names``). Each candidate scores

    w_image * cos(q, image) + w_text * cos(q, caption) + w_words * bm25 / best bm25
        + w_name * (weight of its strongest name / the prompt's strongest)

pages score by their best entry, and the neighbours are the best page's top ``k`` entries, so the
demos show one subject.
"""
from __future__ import annotations

import io
import re
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
    def __init__(self, uri: str, device: str = "cpu", candidates: int = 50, weights: tuple = (0.5, 0.5, 1.0, 2.0),
                 name_max_df: int = 32, exact: bool = False):
        import lancedb

        self.meta = read_meta(uri)
        if self.meta is None:
            raise FileNotFoundError(f"{uri} holds no knowledge base ({META} missing): build one with `ray-suti index`")
        self.uri, self.device, self.candidates, self.weights = uri, device, candidates, weights
        self.name_max_df, self.exact = name_max_df, exact  # exact: scan every vector, even with an index
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
            search = self.table.search(query, vector_column_name=column).distance_type("cosine")
            search = search.bypass_vector_index() if self.exact else search
            hits = search.select(["id", "_distance"]).limit(self.candidates).to_arrow()
            ids.update(hits["id"].to_pylist())
        words, names = self._words(prompt), self._names(prompt)
        ids.update(words)
        ids.update(names)
        if not ids:
            return []
        candidates = self._rows(f"id IN ({quote_list(ids)})")
        scores = self._score(candidates, query, words, names)
        best_page = candidates["page"][int(np.argmax(scores))]
        page = self._rows(f"page = {quote(best_page)}")  # the whole page: its best entries may not be candidates
        page_scores = self._score(page, query, words, names)
        order = np.argsort(-page_scores, kind="stable")[:k]
        images = self._images([page["id"][i] for i in order])
        return [Neighbour(page["id"][i], best_page, page["caption"][i], float(page_scores[i]), images[page["id"][i]])
                for i in order]

    def _fts(self, text: str, limit: int, columns=("id", "_score")):
        try:
            return self.table.search(text, query_type="fts").select(list(columns)).limit(limit).to_arrow()
        except (ValueError, RuntimeError):  # text the query parser refuses: no lexical evidence
            return None

    def _words(self, prompt: str) -> dict[str, float]:
        """BM25 scores of the captions matching the prompt's words, scaled to [0, 1]."""
        hits = self._fts(prompt, self.candidates)
        if hits is None or hits.num_rows == 0:
            return {}
        scores = np.asarray(hits["_score"].to_pylist(), dtype=np.float64)
        return dict(zip(hits["id"].to_pylist(), scores / max(scores.max(), 1e-9)))

    def _names(self, prompt: str) -> dict[str, float]:
        """Entries whose caption holds one of the prompt's names, scored by their strongest name's
        weight over the prompt's strongest. A name is a word on at most ``name_max_df`` captions; its
        weight is its IDF times its repeats per page: a product page names its product in every
        caption, while a rare context word ("posterised" in a small KB) is spread over pages. One
        full-text query per word, so matching uses the index's own tokenizer and stemmer."""
        rows = max(len(self), 1)
        found: list[tuple[float, set]] = []  # (weight, ids) per name
        for word in dict.fromkeys(re.findall(r"[^\W_]{3,}", prompt.lower())):
            hits = self._fts(word, self.name_max_df + 1, ["id", "page", "_score"])
            if hits is not None and 0 < hits.num_rows <= self.name_max_df:
                repeats = hits.num_rows / len(set(hits["page"].to_pylist()))
                found.append(((np.log(rows / hits.num_rows) + 1.0) * repeats, set(hits["id"].to_pylist())))
        strongest = max((weight for weight, _ in found), default=1.0)
        return {i: max(w for w, ids in found if i in ids) / strongest for i in set().union(*(ids for _, ids in found))}

    def _rows(self, where: str) -> dict:
        table = self.table.search().where(where).select(["id", "page", "caption", "image_emb", "text_emb"]) \
            .limit(None).to_arrow()
        return {"id": table["id"].to_pylist(), "page": table["page"].to_pylist(),
                "caption": table["caption"].to_pylist(),
                "image_emb": np.stack(table["image_emb"].to_numpy(zero_copy_only=False)),
                "text_emb": np.stack(table["text_emb"].to_numpy(zero_copy_only=False))}

    def _score(self, rows: dict, query: np.ndarray, words: dict[str, float], names: dict[str, float]) -> np.ndarray:
        w_image, w_text, w_words, w_name = self.weights
        lexical = np.array([words.get(i, 0.0) for i in rows["id"]])
        named = np.array([names.get(i, 0.0) for i in rows["id"]])
        return (w_image * rows["image_emb"] @ query + w_text * rows["text_emb"] @ query + w_words * lexical
                + w_name * named)

    def _images(self, ids: list[str]) -> dict:
        from PIL import Image

        table = self.table.search().where(f"id IN ({quote_list(ids)})").select(["id", "image"]).limit(None).to_arrow()
        return {i: Image.open(io.BytesIO(data)).convert("RGB")
                for i, data in zip(table["id"].to_pylist(), table["image"].to_pylist())}


def quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def quote_list(values) -> str:
    return ", ".join(quote(v) for v in values)
