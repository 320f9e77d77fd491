"""A dataset smaller than one batch per worker (a few apprenticeship examples) still trains and ends."""
import threading

import pytest

from ray_suti.train.config import TrainConfig
from ray_suti.train.trainer import run_training
from ray_suti.world.oracle import OracleConfig, write_oracle


@pytest.mark.slow
def test_fewer_rows_than_a_batch_per_worker_trains_to_the_last_step(tmp_path, ray_local):
    data = str(tmp_path / "oracle")
    write_oracle(OracleConfig(out=data, examples=6, examples_per_shard=3), progress=False)  # 3 rows per worker
    cfg = TrainConfig(data=data, steps=4, batch_size=8, num_workers=2, cpus_per_worker=0.5, noise_repeats=1,
                      checkpoint_every=4, report_every=1, probe_every=0, warmup_steps=1,
                      storage_path=str(tmp_path / "runs"), name="small")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_training(cfg)), daemon=True)
    thread.start()
    thread.join(timeout=420)  # with drop_last batches the workers waited for a full batch forever
    assert not thread.is_alive(), "training did not finish"
    assert result["metrics"]["step"] == 4


def test_steps_that_end_before_the_carried_on_step_fail_before_any_work(tmp_path):
    from ..conftest import REPO

    from ray_suti import SuTIPipeline

    committed = str(REPO / "checkpoints" / "tiny-32.safetensors")  # carries its SuTI step count on
    step = int(SuTIPipeline.single_file_metadata(committed)["step"])
    assert step > 30
    cfg = TrainConfig(data=str(tmp_path), init_from=committed, steps=30, storage_path=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match=f"carries step {step} on"):
        run_training(cfg)  # it used to run zero steps, report nothing and export nothing
