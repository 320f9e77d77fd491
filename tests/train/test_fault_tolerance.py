"""A training worker process is killed mid-run: Ray Train restarts it, the run resumes from the last
checkpoint (weights, EMA, DeepSpeed's optimizer partitions, data position) and finishes, losing only
the steps since that checkpoint. The run is the hard case: 2 workers under ZeRO-3 (each rank holds
its partitions of the parameters, the optimizer and the EMA), with fewer rows than a batch per
worker (the rows an epoch leaves over carry into the next; with drop_last the workers waited for a
full batch forever), and its last checkpoint holds the whole EMA."""
import glob
import json
import os
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from ray_suti.train.config import TrainConfig
from ray_suti.train.trainer import run_training
from ray_suti.world.oracle import OracleConfig, write_oracle

pytestmark = pytest.mark.slow


def _latest_checkpoint_step(storage: str) -> int:
    steps = []
    for path in glob.glob(os.path.join(storage, "*", "checkpoint_*", "state.json")):
        try:
            steps.append(json.load(open(path))["step"])
        except (OSError, ValueError):
            pass  # being written
    return max(steps, default=0)


def test_killed_worker_resumes_from_last_checkpoint(tmp_path, ray_local):
    from ray._private.state import actors  # the GCS's actor table: the session's Ray runs no dashboard

    data = str(tmp_path / "oracle")
    write_oracle(OracleConfig(out=data, examples=6, examples_per_shard=3), progress=False)  # 3 rows per worker
    storage = str(tmp_path / "runs")
    # decay 0: the EMA is the weights themselves, so the gathered EMA must equal the gathered weights
    cfg = TrainConfig(data=data, steps=9, batch_size=4, noise_repeats=1, num_workers=2, cpus_per_worker=0.5,
                      zero_stage=3, ema_decay=0.0, checkpoint_every=3, report_every=3, probe_every=0, warmup_steps=2,
                      storage_path=storage, name="kill", max_failures=2, shuffle_buffer=16,
                      export_file=str(tmp_path / "final.safetensors"))
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_training(cfg)), daemon=True)
    thread.start()

    deadline = time.time() + 400
    while _latest_checkpoint_step(storage) < 6:
        assert thread.is_alive() and time.time() < deadline, "no checkpoint reached"
        time.sleep(0.2)
    killed_after = _latest_checkpoint_step(storage)
    workers = [a["Pid"] for a in actors().values() if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"]
    assert workers, "no live training worker to kill"
    os.kill(workers[0], signal.SIGKILL)

    thread.join(timeout=600)
    assert not thread.is_alive(), "training did not finish"
    metrics = result["metrics"]
    assert metrics["step"] == cfg.steps  # it finished
    # It restarted from the last committed checkpoint, never from scratch. The newest checkpoint
    # folder we saw on disk may still have been in the report barrier (uploaded, not yet
    # committed) when the kill landed, so the resume point is that one or the one before it.
    assert metrics["resumed_from"] % cfg.checkpoint_every == 0
    assert killed_after - cfg.checkpoint_every <= metrics["resumed_from"] < cfg.steps
    assert metrics["resumed_from"] >= cfg.checkpoint_every
    assert metrics["optimizer_restored"] is True  # Adam's moments came back, not a fresh optimizer
    last = glob.glob(os.path.join(storage, "*", "checkpoint_*", "deepspeed", "state", "*optim_states.pt"))
    assert last, "the checkpoints carry DeepSpeed's optimizer partitions"
    assert os.path.getsize(tmp_path / "final.safetensors") > 1_000_000
    final = max(glob.glob(os.path.join(storage, "kill", "checkpoint_*", "state.json")), key=lambda p: json.load(open(p))["step"])
    weights = load_file(os.path.join(os.path.dirname(final), "model.safetensors"))
    ema = load_file(os.path.join(os.path.dirname(final), "ema.safetensors"))
    assert json.load(open(final))["step"] == cfg.steps and ema and set(ema) <= set(weights)
    for name, value in ema.items():
        assert value.shape == weights[name].shape, name
        torch.testing.assert_close(value, weights[name].float(), rtol=0, atol=1e-6)
