import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
DREAMBENCH = REPO.parent / "shared" / "data" / "dreambench-sample"


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
        pytest.skip(f"DreamBench sample not found at {DREAMBENCH} (it lives in ../shared, outside the repo)")
    return DREAMBENCH
