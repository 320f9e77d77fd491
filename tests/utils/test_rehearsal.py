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


# The suite leaves cores idle from there on: one process, from its one-process tests; with a worker
# for those (xdist), the Ray lane from its serving tests
START_EARLY_WITH = ("tests/model/", "tests/serving/test_app.py")


def start_early(folder):
    """Self-contained, ~150 s of CPU: it runs in the background (tests/conftest.py, ``EarlyRuns``)
    from the model tests on, on the share of the cores the other tests leave idle."""
    cmd = [sys.executable, "-m", "ray_suti.utils.rehearsal", "--out", str(folder / "rehearsal"), "--pages", "20",
           "--train-steps", "2", "--json", str(folder / "result.json")]
    return start_early_command(cmd, folder, background=True, env={**os.environ, **AS_A_USER})


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
