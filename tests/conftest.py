import os
from pathlib import Path

import pytest

from ray_suti.utils.local_cluster import free_port  # noqa: F401  (tests import it from here)

from .browser import browser  # noqa: F401  (a fixture: the web page's tests, in any package)

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
DREAMBENCH = REPO.parent / "shared" / "data" / "dreambench-sample"


def pytest_report_header(config):
    """Said at the top of every run (CI's log included): whether the DreamBench tests can run."""
    found = DREAMBENCH.is_dir() and any(DREAMBENCH.glob("*/*.jpg"))
    return f"DreamBench sample: {'found at ' + str(DREAMBENCH) if found else 'ABSENT (' + str(DREAMBENCH) + '): its tests skip'}"


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole session, stopped by its own handle at the end."""
    import ray

    from ray_suti.utils.ray_utils import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def dreambench_dir():
    if not DREAMBENCH.is_dir():
        message = f"DreamBench sample not found at {DREAMBENCH} (it lives in ../shared, outside the repo)"
        if os.environ.get("CI"):  # CI runs every test: a machine without the sample is a broken CI machine
            pytest.fail(message)
        pytest.skip(message)
    return DREAMBENCH


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node cluster: `ray start --head` and one `ray start --address` worker node on
    127.0.0.1 (2 CPUs each), stopped through their own processes (never `ray stop`, which would end
    every Ray on the machine). Shared by the tests that submit jobs, the multi-node rehearsal's among them."""
    from ray_suti.utils.local_cluster import LocalCluster

    with LocalCluster(head_cpus=2) as cluster:
        cluster.add_worker(cpus=2)
        yield cluster


@pytest.fixture(scope="session")
def ray_head(ray_cluster):
    """The shared cluster's dashboard address, for `ray job submit --address`."""
    return ray_cluster.dashboard
