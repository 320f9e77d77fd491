"""The multi-node rehearsal as a user runs it (`python -m ray_suti.utils.rehearsal`): a two-node
cluster of its own, real jobs submitted to the head, every path a file:// URI as on a cluster with
object storage; each stage's work lands on both nodes."""
import json
import os
import sys

import pyarrow.parquet as pq
import pytest

from ray_suti import SuTIPipeline

from ..conftest import AS_A_USER, start_early_command

pytestmark = pytest.mark.slow


def start_early(folder):
    """The rehearsal, ~150 s of CPU, started with the session beside the other tests (tests/conftest.py,
    ``early_runs``) at the Ray lane's share: its nodes then register in time (at the least share beside
    the busy lane, a node missed Ray's 30 s for a raylet to register, session 21). The test joins it."""
    cmd = [sys.executable, "-m", "ray_suti.utils.rehearsal", "--out", str(folder / "rehearsal"), "--pages", "20",
           "--train-steps", "2", "--json", str(folder / "result.json")]
    return start_early_command(cmd, folder, env={**os.environ, **AS_A_USER})


def test_every_stage_runs_work_on_both_nodes(early_run):
    early_run.join(timeout=1800)
    out, result = early_run.folder / "rehearsal", json.loads((early_run.folder / "result.json").read_text())
    assert result["nodes"] == {"head": 2, "worker": 2}
    for stage in ("world", "build_dataset", "train"):
        info = result["stages"][stage]
        assert info["status"] == "SUCCEEDED"
        assert set(info["tasks_and_actors_per_node"]) == {"head", "worker"}, (stage, info)

    truth = pq.read_table(out / "world" / "truth", columns=["page_index"]).column(0).to_pylist()
    assert pq.read_table(out / "clusters" / "clusters").num_rows == len(set(truth)) == 20  # one cluster a page
    assert json.loads((out / "clusters" / "stats.json").read_text())["records_in"] == len(truth)

    model = SuTIPipeline.from_pretrained(str(out / "model.safetensors"))  # exported through URIs
    assert SuTIPipeline.single_file_metadata(str(out / "model.safetensors"))["step"] == "2"
    assert SuTIPipeline.from_pretrained(str(out / "model")).suti_config == model.suti_config
    model.set_progress_bar_config(disable=True)
    assert model("a toy on the beach", num_inference_steps=2).images[0].size == (32, 32)
