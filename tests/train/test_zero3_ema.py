"""Under ZeRO-3 each rank keeps the EMA of its own parameter partitions and the whole EMA is
gathered only for a checkpoint: the partitions reassemble exactly, and a 2-worker run's checkpoint
holds an EMA of the right shapes and values. The same run trains on fewer rows than a batch."""
import glob
import os
import threading
import types

import pytest
import torch
from safetensors.torch import load_file

from ray_suti.train import loop
from ray_suti.train.config import TrainConfig
from ray_suti.train.trainer import run_training
from ray_suti.world.oracle import OracleConfig, write_oracle


def test_partitions_reassemble_the_whole_tensor(monkeypatch):
    whole = torch.randn(3, 5)  # 15 values over 2 ranks: chunks of 8, the last padded with a zero
    param = types.SimpleNamespace(ds_numel=15, ds_shape=(3, 5), ds_tensor=types.SimpleNamespace(ds_numel=8))
    parts = [loop._partition(whole, param, rank, 2) for rank in (0, 1)]
    assert [p.shape for p in parts] == [(8,), (8,)] and parts[1][-1] == 0
    monkeypatch.setattr(torch.distributed, "gather", lambda t, out, dst: [o.copy_(p) for o, p in zip(out or [], parts)])
    assert torch.equal(loop._gather_ema({"w": parts[0]}, [("w", param)], 0, 2, "cpu")["w"], whole)
    assert loop._gather_ema({"w": parts[1]}, [("w", param)], 1, 2, "cpu") is None  # only rank 0 holds it


@pytest.mark.slow
def test_zero3_run_on_fewer_rows_than_a_batch_ends_and_its_checkpoint_holds_the_whole_ema(tmp_path, ray_local):
    """Two workers, 3 rows each and a batch of 8 (a few apprenticeship examples): the rows an epoch
    leaves over carry into the next, so the run reaches its last step (with drop_last the workers
    waited for a full batch forever)."""
    data = str(tmp_path / "oracle")
    write_oracle(OracleConfig(out=data, examples=6, examples_per_shard=3), progress=False)
    # decay 0: the EMA is the weights themselves, so the gathered EMA must equal the gathered weights
    cfg = TrainConfig(data=data, steps=4, batch_size=8, noise_repeats=1, num_workers=2, cpus_per_worker=0.5,
                      zero_stage=3, ema_decay=0.0, checkpoint_every=4, report_every=1, probe_every=0, warmup_steps=1,
                      storage_path=str(tmp_path / "runs"), name="z3")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_training(cfg)), daemon=True)
    thread.start()
    thread.join(timeout=420)
    assert not thread.is_alive(), "training did not finish"
    assert result["metrics"]["step"] == 4
    (checkpoint,) = [os.path.dirname(p) for p in glob.glob(str(tmp_path / "runs" / "z3" / "checkpoint_*" / "state.json"))]
    weights, ema = load_file(os.path.join(checkpoint, "model.safetensors")), load_file(os.path.join(checkpoint, "ema.safetensors"))
    assert ema and set(ema) <= set(weights)
    for name, value in ema.items():
        assert value.shape == weights[name].shape, name
        torch.testing.assert_close(value, weights[name].float(), rtol=0, atol=1e-6)
