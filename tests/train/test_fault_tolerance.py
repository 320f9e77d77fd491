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
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ray_suti.train.config import TrainConfig
from ray_suti.train.trainer import run_training
from ray_suti.world.oracle import OracleConfig, write_oracle

from ..conftest import start_early_command

pytestmark = pytest.mark.slow


def _latest_checkpoint_step(storage: str) -> int:
    steps = []
    for path in glob.glob(os.path.join(storage, "*", "checkpoint_*", "state.json")):
        try:
            steps.append(json.load(open(path))["step"])
        except (OSError, ValueError):
            pass  # being written
    return max(steps, default=0)


START_EARLY_WITH = "tests/model/"  # with the rehearsal: one-process tests from there on leave cores idle


def start_early(folder):
    """Self-contained, ~130 s of CPU on an embedded Ray of its own: it runs in the background
    (tests/conftest.py, ``EarlyRuns``) on the share of the cores the other tests leave idle."""
    return start_early_command([sys.executable, "-m", "tests.train.test_fault_tolerance", str(folder)], folder,
                               background=True, env={**os.environ, "RAY_ADDRESS": "local"})


def kill_a_worker_mid_run(folder: Path) -> None:
    """The run, with one training worker killed once a checkpoint past step 3 is on disk; writes the
    run's metrics and the step of the newest checkpoint seen at the kill to ``folder``/result.json.
    ``python -m tests.train.test_fault_tolerance FOLDER``."""
    from ray._private.state import actors  # the GCS's actor table (no dashboard needed)

    from ray_suti.utils.ray_utils import init_ray

    init_ray(num_cpus=2, dashboard=False)
    data = str(folder / "oracle")
    write_oracle(OracleConfig(out=data, examples=6, examples_per_shard=3), progress=False)  # 3 rows per worker
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_training(run_config(folder))), daemon=True)
    thread.start()

    deadline = time.time() + 1200  # in the background it may wait minutes for a core
    storage = str(folder / "runs")
    while _latest_checkpoint_step(storage) < 6:
        assert thread.is_alive() and time.time() < deadline, "no checkpoint reached"
        time.sleep(0.2)
    killed_after = _latest_checkpoint_step(storage)
    workers = [a["Pid"] for a in actors().values() if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"]
    assert workers, "no live training worker to kill"
    os.kill(workers[0], signal.SIGKILL)

    thread.join(timeout=1200)
    assert not thread.is_alive(), "training did not finish"
    (folder / "result.json").write_text(json.dumps({"metrics": result["metrics"], "killed_after": killed_after}))


def run_config(folder: Path) -> TrainConfig:
    # decay 0: the EMA is the weights themselves, so the gathered EMA must equal the gathered weights
    return TrainConfig(data=str(folder / "oracle"), steps=9, batch_size=4, noise_repeats=1, num_workers=2,
                       cpus_per_worker=0.5, zero_stage=3, ema_decay=0.0, checkpoint_every=3, report_every=3,
                       probe_every=0, warmup_steps=2, storage_path=str(folder / "runs"), name="kill", max_failures=2,
                       shuffle_buffer=16, export_file=str(folder / "final.safetensors"))


def test_killed_worker_resumes_from_last_checkpoint(early_run):
    early_run.join(timeout=1800)
    folder, cfg = early_run.folder, run_config(early_run.folder)
    result = json.loads((folder / "result.json").read_text())
    metrics, killed_after, storage = result["metrics"], result["killed_after"], str(folder / "runs")
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
    assert os.path.getsize(folder / "final.safetensors") > 1_000_000
    final = max(glob.glob(os.path.join(storage, "kill", "checkpoint_*", "state.json")), key=lambda p: json.load(open(p))["step"])
    weights = load_file(os.path.join(os.path.dirname(final), "model.safetensors"))
    ema = load_file(os.path.join(os.path.dirname(final), "ema.safetensors"))
    assert json.load(open(final))["step"] == cfg.steps and ema and set(ema) <= set(weights)
    for name, value in ema.items():
        assert value.shape == weights[name].shape, name
        torch.testing.assert_close(value, weights[name].float(), rtol=0, atol=1e-6)


if __name__ == "__main__":  # the early run of test_killed_worker_resumes_from_last_checkpoint
    kill_a_worker_mid_run(Path(sys.argv[1]))
