"""One synthetic crawl and one knowledge base built from it (incrementally), shared by the tests here."""
import glob

import pandas as pd
import pyarrow.parquet as pq
import pytest

from ray_suti.knowledge import IndexConfig, run_index
from ray_suti.world.crawl import WorldConfig, generate_world


@pytest.fixture(scope="package")
def crawl(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate_world(WorldConfig(out=str(out), pages=24, pages_per_shard=12, seed=3, image_size=32), progress=False)
    return out / "web"


@pytest.fixture(scope="package")
def kb_builds(ray_local, crawl, tmp_path_factory):
    """The KB's folder is built in three runs: the first shard, the whole crawl, the whole crawl again."""
    path = str(tmp_path_factory.mktemp("kb") / "kb")
    shards = sorted(glob.glob(str(crawl / "*.parquet")))
    assert len(shards) == 2
    # the second run with 2 embedding actors: on this 2-CPU cluster a pool holding every CPU deadlocked the read
    runs = [run_index(IndexConfig(input=source, output=path, embed_concurrency=actors))
            for source, actors in ((shards[0], 1), (str(crawl), 2), (str(crawl), 1))]
    return path, runs


@pytest.fixture(scope="package")
def kb_path(kb_builds):
    return kb_builds[0]


def good_records(files) -> pd.DataFrame:
    from ray_suti.utils.images import inspect_image

    rows = pd.concat([pq.read_table(f).to_pandas() for f in files])
    return rows[[not inspect_image(b, min_side=8)[1] for b in rows["image"]]]


@pytest.fixture(scope="package")
def catalogue_kb(ray_local, kb_path, tmp_path_factory):
    """The crawl plus a catalogue of held-out subjects under made-up names, in one KB: a copy of the
    crawl's KB with the catalogue indexed into it."""
    import shutil

    from ray_suti.world.catalogue import CatalogueConfig, write_catalogue

    out = tmp_path_factory.mktemp("catalogue")
    entries = write_catalogue(CatalogueConfig(out=str(out / "catalogue"), num_subjects=8, image_size=32))
    path = str(out / "kb")
    shutil.copytree(kb_path, path)
    run_index(IndexConfig(input=str(out / "catalogue" / "web"), output=path))
    return path, entries
