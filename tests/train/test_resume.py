"""Full-state checkpoints: a run killed mid-way and resumed from its last checkpoint goes on as if
it had never stopped (same batches, noise, Adam moments and warm-up), and a checkpoint of another
configuration is refused by name."""
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ray_suti import SuTIPipeline
from ray_suti.train.checkpoint import load_optimizer, trainable_state
from ray_suti.train.config import TrainConfig
from ray_suti.train.step import check_ema, restore_weights, start_pipeline
from ray_suti.world.oracle import OracleConfig, write_oracle_shard

pytestmark = pytest.mark.slow
# The resumed steps must equal the uninterrupted run's: same inputs and state, same float operations
# on one CPU thread. The tolerance only absorbs the 7 printed digits.
TOLERANCE = 1e-6


def _train(tmp_path, name: str, *extra: str, kill_at_step: int | None = None) -> dict[int, float]:
    """Runs the one-process trainer; with ``kill_at_step``, SIGKILLs it once that step is printed."""
    args = [sys.executable, "-m", "ray_suti.train.local", "--data", str(tmp_path / "data"), "--steps", "10",
            "--batch-size", "4", "--noise-repeats", "1", "--checkpoint-every", "4", "--report-every", "1",
            "--probe-every", "0", "--warmup-steps", "6", "--loader-workers", "0", "--storage-path",
            str(tmp_path / "runs"), "--name", name, *extra]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    losses = {}
    for line in proc.stdout:
        if line.startswith("{\"step\""):
            row = json.loads(line)
            losses[row["step"]] = row["loss"]
            if row["step"] == kill_at_step:
                proc.send_signal(signal.SIGKILL)
                break
    assert proc.wait(timeout=300) in (0, -signal.SIGKILL), proc.stderr.read()
    return losses


def test_killed_run_resumes_exactly_where_it_stopped(tmp_path):
    os.makedirs(tmp_path / "data")
    for shard in range(3):  # 3 files of 10 rows: batches cross files and epochs
        write_oracle_shard(OracleConfig(out=str(tmp_path / "data"), examples=30, examples_per_shard=10), shard)
    with ThreadPoolExecutor(2) as pool:  # one thread each: the two runs side by side use both cores
        running = pool.submit(_train, tmp_path, "whole")
        before = _train(tmp_path, "killed", kill_at_step=6)  # checkpoint 4 written, steps 5-6 lost
        whole = running.result()
    assert sorted(whole) == list(range(1, 11))
    checkpoint = tmp_path / "runs" / "killed" / "checkpoint_0000004"
    assert (checkpoint / "optimizer.safetensors").exists() and not (tmp_path / "runs" / "killed" / "checkpoint_0000008").exists()
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == 4 and state["data_position"] == 4 and state["warm_from"] == 0
    assert any(k.endswith("::exp_avg_sq") for k in load_optimizer(str(checkpoint)))
    after = _train(tmp_path, "killed", "--resume-from", str(checkpoint))

    assert sorted(after) == list(range(5, 11))
    for step in range(1, 7):
        assert before[step] == pytest.approx(whole[step], rel=TOLERANCE, abs=0)
    for step in range(5, 11):  # the resumed curve is the uninterrupted one
        assert after[step] == pytest.approx(whole[step], rel=TOLERANCE, abs=0), (step, after[step], whole[step])


def test_resuming_from_another_configuration_names_the_keys(tmp_path):
    weights = trainable_state(SuTIPipeline.from_preset("tiny-32").model)
    with_controls = start_pipeline(TrainConfig(controls=("box",))).model
    with pytest.raises(ValueError, match=r"missing suti\.control_encoders\.encoders\.box\..*unexpected none"):
        restore_weights(with_controls, weights, "ckpt")
    plain = SuTIPipeline.from_preset("tiny-32").model
    weights["suti.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected suti\.extra\.weight"):
        restore_weights(plain, weights, "ckpt")
    named = [(n, p) for n, p in plain.named_parameters() if n.startswith("suti.")]
    with pytest.raises(ValueError, match="EMA does not match"):
        check_ema({n: p for n, p in named[1:]}, named, "ckpt")
