"""The multi-node rehearsal: two `ray start` nodes on 127.0.0.1, real jobs submitted to the head."""
import pytest

from ray_suti.utils.rehearsal import rehearse


@pytest.mark.slow
def test_every_stage_runs_work_on_both_nodes(tmp_path):
    result = rehearse(str(tmp_path / "rehearsal"), pages=24, train_steps=2)
    assert result["nodes"] == {"head": 2, "worker": 2}
    for stage in ("world", "build_dataset", "train"):
        info = result["stages"][stage]
        assert info["status"] == "SUCCEEDED"
        assert set(info["tasks_and_actors_per_node"]) == {"head", "worker"}, (stage, info)
    assert (tmp_path / "rehearsal" / "clusters" / "stats.json").exists()
