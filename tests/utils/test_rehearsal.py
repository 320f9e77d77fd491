"""The multi-node rehearsal on the tests' two-node cluster: real jobs submitted to the head, every
path a file:// URI as on a cluster with object storage; each stage's work lands on both nodes."""
import json

import pyarrow.parquet as pq
import pytest

from ray_suti import SuTIPipeline
from ray_suti.utils.rehearsal import rehearse

pytestmark = pytest.mark.slow


def test_every_stage_runs_work_on_both_nodes(tmp_path, ray_cluster):
    out = tmp_path / "rehearsal"
    result = rehearse(str(out), pages=20, train_steps=2, cluster=ray_cluster)
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
