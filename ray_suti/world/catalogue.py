"""A shop catalogue of held-out subjects, each sold under a made-up name: Re-Imagen's test bed.

Each held-out subject gets a name ("Zorvik") that no training caption, prompt or alt text
contains, and one catalogue page of ``photos_per_page`` photos captioned with it ("a Zorvik mug on a
wooden table"). Only retrieval can tell the model what a "Zorvik mug" looks like: the name is never
trained, the class word is shared with thousands of other subjects.

The pages are written in the crawl's web-pairs schema (``web/catalogue.parquet``), so ``ray-suti
index`` reads them like any crawl; ``catalogue.json`` holds the truth: each subject's seed, name,
page and photo keys and contexts.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..utils.images import encode
from .contexts import VOCABULARY, Context
from .crawl import WEB_SCHEMA
from .oracle import draw_case
from .render import render
from .subjects import CLASS_WORDS, Subject, heldout_seeds

ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kl", "m", "n", "p", "pl", "qu", "r", "s", "sk", "t", "tr",
          "v", "vr", "z", "zh")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
CODAS = ("", "k", "l", "n", "r", "x", "sh", "nd", "rk", "lv")


@dataclass(frozen=True)
class CatalogueConfig:
    out: str = field(default="runs/catalogue", metadata={"help": "output folder (web/ and catalogue.json)"})
    num_subjects: int = field(default=50, metadata={"help": "held-out subjects (heldout_seeds(n)), one page each"})
    photos_per_page: int = field(default=4, metadata={"help": "catalogue photos per subject"})
    image_size: int = field(default=64, metadata={"help": "photo size in px, as the crawl's"})
    seed: int = field(default=0, metadata={"help": "draws names and photo contexts (not the subjects)"})

    def __post_init__(self):
        if self.num_subjects < 1 or not 1 <= self.photos_per_page <= 8:
            raise ValueError("num_subjects must be positive and photos_per_page in [1, 8]")


def made_up_names(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct two-syllable names, none a word of the world's captions (pure function of seed)."""
    rng = np.random.default_rng([seed, 0x5A4E])
    taken = set(VOCABULARY) | set(CLASS_WORDS)
    names: list[str] = []
    while len(names) < n:
        name = "".join(str(rng.choice(ONSETS)) + str(rng.choice(VOWELS)) + str(rng.choice(CODAS)) for _ in range(2))
        if name not in taken:
            taken.add(name)
            names.append(name.capitalize())
    return names


def page_url(name: str) -> str:
    return f"https://catalogue.example/products/{name.lower()}"


def catalogue_entries(cfg: CatalogueConfig) -> list[dict]:
    """One entry per subject: seed, name, class word, page, photo keys, the photos' contexts and the
    target context of its evaluation case (a scene no catalogue photo shows)."""
    entries = []
    for subject_seed, name in zip(heldout_seeds(cfg.num_subjects), made_up_names(cfg.num_subjects, cfg.seed)):
        rng = np.random.default_rng([cfg.seed, subject_seed])
        photos, target = draw_case(rng, cfg.photos_per_page)
        entries.append({"subject_seed": subject_seed, "name": name,
                        "class_word": Subject.from_seed(subject_seed).class_word, "page_url": page_url(name),
                        "keys": [f"catalogue-{name.lower()}-{i}" for i in range(len(photos))],
                        "contexts": [c.to_json() for c in photos], "target": target.to_json(),
                        "case_seed": int(rng.integers(2**31))})
    return entries


def named(entry: dict) -> str:
    """How the catalogue (and a shopper) calls the subject: "Zorvik mug"."""
    return f"{entry['name']} {entry['class_word']}"


def write_catalogue(cfg: CatalogueConfig) -> list[dict]:
    """Writes ``web/catalogue.parquet`` (web-pairs schema) and ``catalogue.json``; returns the entries."""
    entries = catalogue_entries(cfg)
    rows = []
    for entry in entries:
        for key, context in zip(entry["keys"], entry["contexts"]):
            image, _ = render(entry["subject_seed"], Context.from_json(context), cfg.image_size)
            rows.append({"key": key, "url": f"https://catalogue.example/img/{key}.png", "page_url": entry["page_url"],
                         "caption": Context.from_json(context).prompt(named(entry)), "image": encode(image, "png"),
                         "width": cfg.image_size, "height": cfg.image_size})
    os.makedirs(os.path.join(cfg.out, "web"), exist_ok=True)
    path = os.path.join(cfg.out, "web", "catalogue.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=WEB_SCHEMA), path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(os.path.join(cfg.out, "catalogue.json"), "w") as f:
        json.dump({"config": asdict(cfg), "subjects": entries}, f, indent=2)
    return entries
