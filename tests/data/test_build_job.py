"""`ray job submit -- python jobs/build_dataset.py ...` against a real local `ray start --head`."""
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from ray_suti.world.crawl import WorldConfig, generate_world

from ..conftest import REPO

pytestmark = pytest.mark.slow


def test_build_dataset_job_runs_on_a_local_head(tmp_path, ray_head):
    generate_world(WorldConfig(out=str(tmp_path / "world"), pages=20, image_size=32, pages_per_shard=10,
                               preview_pages=0), progress=False)
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray, "job", "submit", "--address", ray_head, "--", sys.executable, "jobs/build_dataset.py",
           "--input", str(tmp_path / "world" / "web"), "--output", str(tmp_path / "out")]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in (proc.stdout + proc.stderr)
    truth = pq.read_table(tmp_path / "world" / "truth", columns=["page_index"]).column(0).to_pylist()
    clusters = pq.read_table(tmp_path / "out" / "clusters")
    assert clusters.num_rows == len(set(truth)) == 20
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["records_in"] == len(truth)
