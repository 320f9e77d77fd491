"""`ray job submit -- python jobs/train.py ...` against a real local `ray start --head`."""
import os
import subprocess
import sys

import pytest

from ray_suti import SuTIPipeline
from ray_suti.world.oracle import OracleConfig, oracle_example, write_oracle_shard

from ..conftest import REPO

pytestmark = pytest.mark.slow


def test_train_job_runs_on_a_local_head(tmp_path, ray_head):
    """Every path a URI, as on a cluster with object storage and no shared file system."""
    data = tmp_path / "oracle"
    data.mkdir()
    write_oracle_shard(OracleConfig(out=str(data), examples=32, examples_per_shard=32), 0)
    out = tmp_path / "model.safetensors"
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray, "job", "submit", "--address", ray_head, "--", sys.executable, "jobs/train.py", "--data", data.as_uri(),
           "--steps", "4", "--batch-size", "4", "--noise-repeats", "1", "--checkpoint-every", "4", "--report-every", "2",
           "--storage-path", (tmp_path / "runs").as_uri(), "--name", "job", "--export-file", out.as_uri(),
           "--export", (tmp_path / "exported").as_uri()]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in (proc.stdout + proc.stderr)
    assert (tmp_path / "runs" / "job").is_dir()
    pipe = SuTIPipeline.from_pretrained(str(out))
    assert SuTIPipeline.from_pretrained(str(tmp_path / "exported")).suti_config == pipe.suti_config
    assert SuTIPipeline.single_file_metadata(str(out))["step"] == "4"
    pipe.set_progress_bar_config(disable=True)
    example = oracle_example(OracleConfig(), 0)
    assert pipe("a toy", example["demo_images"][:2], num_inference_steps=2).images[0].size == (32, 32)
