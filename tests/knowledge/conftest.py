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
    runs = [run_index(IndexConfig(input=source, output=path)) for source in (shards[0], str(crawl), str(crawl))]
    return path, runs


@pytest.fixture(scope="package")
def kb_path(kb_builds):
    return kb_builds[0]


def good_records(files) -> pd.DataFrame:
    from ray_suti.utils.images import inspect_image

    rows = pd.concat([pq.read_table(f).to_pandas() for f in files])
    return rows[[not inspect_image(b, min_side=8)[1] for b in rows["image"]]]
