"""Full-state checkpoints: a run killed mid-way and resumed from its last checkpoint goes on as if
it had never stopped (same batches, noise, Adam moments and warm-up), and a checkpoint of another
configuration is refused by name."""
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from ray_suti import SuTIPipeline
from ray_suti.train.checkpoint import load_optimizer, trainable_state
from ray_suti.train.config import TrainConfig
from ray_suti.train.step import check_ema, restore_weights, start_pipeline
from ray_suti.world.oracle import OracleConfig, write_oracle_shard

from ..conftest import start_early_command

pytestmark = pytest.mark.slow
# The resumed steps must equal the uninterrupted run's: same inputs and state, same float operations
# on one CPU thread. The tolerance only absorbs the 7 printed digits.
TOLERANCE = 1e-6


def _train(root, name: str, *extra: str, kill_at_step: int | None = None) -> dict[int, float]:
    """Runs the one-process trainer; with ``kill_at_step``, SIGKILLs it once that step is printed."""
    args = [sys.executable, "-m", "ray_suti.train.local", "--data", str(root / "data"), "--steps", "10",
            "--batch-size", "4", "--noise-repeats", "1", "--checkpoint-every", "4", "--report-every", "1",
            "--probe-every", "0", "--warmup-steps", "6", "--loader-workers", "0", "--storage-path",
            str(root / "runs"), "--name", name, *extra]
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


def uninterrupted_killed_and_resumed(root: Path) -> None:
    """The three runs, as a process of its own (``python -m tests.train.test_resume FOLDER``): the
    uninterrupted run beside the one killed at step 6 (one thread each: both cores), then the killed
    run resumed from its checkpoint 4; their losses by step in FOLDER/losses.json."""
    os.makedirs(root / "data")
    for shard in range(3):  # 3 files of 10 rows: batches cross files and epochs
        write_oracle_shard(OracleConfig(out=str(root / "data"), examples=30, examples_per_shard=10), shard)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(_train, root, "whole")
        before = _train(root, "killed", kill_at_step=6)  # checkpoint 4 written, steps 5-6 lost
        whole = running.result()
    left = sorted(p.name for p in (root / "runs" / "killed").glob("checkpoint_*"))  # what the kill left
    after = _train(root, "killed", "--resume-from", str(root / "runs" / "killed" / "checkpoint_0000004"))
    (root / "losses.json").write_text(json.dumps({"whole": whole, "before": before, "after": after,
                                                  "checkpoints_left_by_the_kill": left}))


def start_early(folder):
    """The runs (~30 s of two processes) go in the background from the session's start
    (tests/conftest.py, ``EarlyRuns``); the test below joins them."""
    return start_early_command([sys.executable, "-m", "tests.train.test_resume", str(folder)], folder, background=True)


def test_killed_run_resumes_exactly_where_it_stopped(early_run):
    early_run.join(timeout=900)
    root = early_run.folder
    runs = json.loads((root / "losses.json").read_text())
    whole, before, after = ({int(step): loss for step, loss in runs[r].items()} for r in ("whole", "before", "after"))
    assert sorted(whole) == list(range(1, 11))
    assert runs["checkpoints_left_by_the_kill"] == ["checkpoint_0000004"]  # steps 5-6 lost
    checkpoint = root / "runs" / "killed" / "checkpoint_0000004"
    assert (checkpoint / "optimizer.safetensors").exists()
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == 4 and state["data_position"] == 4 and state["warm_from"] == 0
    assert any(k.endswith("::exp_avg_sq") for k in load_optimizer(str(checkpoint)))

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


if __name__ == "__main__":  # the early run of test_killed_run_resumes_exactly_where_it_stopped
    uninterrupted_killed_and_resumed(Path(sys.argv[1]))
