"""A run from a checkpoint counts its steps on from the checkpoint's (a dataset smaller than a batch
per worker: test_fault_tolerance.py)."""
import pytest

from ray_suti.train.config import TrainConfig
from ray_suti.train.trainer import run_training


def test_steps_that_end_before_the_carried_on_step_fail_before_any_work(tmp_path):
    from ..conftest import REPO

    from ray_suti import SuTIPipeline

    committed = str(REPO / "checkpoints" / "tiny-32.safetensors")  # carries its SuTI step count on
    step = int(SuTIPipeline.single_file_metadata(committed)["step"])
    assert step > 30
    cfg = TrainConfig(data=str(tmp_path), init_from=committed, steps=30, storage_path=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match=f"carries step {step} on"):
        run_training(cfg)  # it used to run zero steps, report nothing and export nothing
