import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_suti.apprentice.job import ApprenticeConfig, ExpertWorker, iter_clusters, summarize
from ray_suti.apprentice.prompts import Prompt
from ray_suti.schemas import ICL_CLUSTER_SCHEMA, ICL_V2_SCHEMA
from ray_suti.world import heldout_seeds
from ray_suti.world.oracle import oracle_cluster

from ..conftest import REPO

FAST = dict(clip_pretrained="", dreambooth_steps=3, sample_steps=3, prompts_per_cluster=2, candidates_per_prompt=2,
            clip_i_threshold=0.0)


def write_clusters(path, n: int) -> list[dict]:
    rows = [oracle_cluster(s) for s in heldout_seeds(n)]
    os.makedirs(path, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=ICL_CLUSTER_SCHEMA), os.path.join(path, "part-0.parquet"))
    return rows


class EmptyPrompts:
    def write(self, class_word, captions, n, rng):
        return [Prompt("  ", ("recontext",))] * n


def test_each_cluster_becomes_examples_or_a_skip_with_its_reason(tmp_path):
    cfg = ApprenticeConfig(output=str(tmp_path / "out"), keep_rejected=True, **FAST)
    worker = ExpertWorker(cfg)
    good = oracle_cluster(heldout_seeds(1)[0])
    one_photo = {**good, "cluster_id": "one-photo", "images": good["images"][:1], "captions": good["captions"][:1]}
    unreadable = {**good, "cluster_id": "../../escape", "images": [b"<html>", good["images"][0][:30], good["images"][1]]}
    assert worker.run(one_photo)["reason"] == "too_few_images"
    status = worker.run(unreadable)
    assert status["reason"] == "too_few_images" and status["unreadable_images"] == 2
    assert "/" not in status["file"] and not (tmp_path / "escape.json").exists()  # no input becomes a path
    assert worker.run(good)["status"] == "done"
    worker.writer = EmptyPrompts()
    assert worker.run({**good, "cluster_id": "empty-prompts"})["reason"] == "no_prompts"

    examples = pq.read_table(tmp_path / "out" / "examples").to_pylist() if (tmp_path / "out" / "examples").exists() else []
    rejected = pq.read_table(tmp_path / "out" / "rejected").to_pylist() if (tmp_path / "out" / "rejected").exists() else []
    assert len(examples) + len(rejected) == 4  # 2 prompts x 2 candidates of the one good cluster
    table = pq.read_table(tmp_path / "out" / ("examples" if examples else "rejected"))
    assert table.schema.names == ICL_V2_SCHEMA.names
    for row in examples + rejected:
        assert row["cluster_id"] == good["cluster_id"] and row["expert"] == f"dreambooth-lora:{good['cluster_id']}"
        assert len(row["demo_images"]) == 3 and row["target_prompt"] not in good["captions"] and row["skills"]
        assert (row["clip_i"] >= cfg.clip_i_threshold) == (row in examples)
    stats = summarize(cfg.output)
    assert stats["clusters"] == 4 and stats["clusters_done"] == 1
    assert stats["clusters_skipped"] == {"too_few_images": 2, "no_prompts": 1} and stats["unreadable_images"] == 2
    assert stats["candidates"] == 4 and sum(d["candidates"] for d in stats["per_skill"].values()) >= 4


def test_unreadable_cluster_files_are_clear_errors(tmp_path):
    write_clusters(tmp_path / "ok", 2)
    assert [r["cluster_id"] for r in iter_clusters(str(tmp_path / "ok"))] == [f"subject-{s}" for s in heldout_seeds(2)]
    assert len(list(iter_clusters(str(tmp_path / "ok"), max_clusters=1))) == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (tmp_path / "ok" / "part-0.parquet").read_bytes()
    (bad / "part-0.parquet").write_bytes(data[:-12])  # corrupt footer
    with pytest.raises(ValueError, match="part-0.parquet: not a readable Parquet file"):
        list(iter_clusters(str(bad)))
    pq.write_table(pa.table({"cluster_id": ["x"]}), tmp_path / "cols.parquet")
    with pytest.raises(ValueError, match=r"missing ICL-cluster columns \['captions', 'images'\]"):
        list(iter_clusters(str(tmp_path / "cols.parquet")))
    with pytest.raises(FileNotFoundError):
        list(iter_clusters(str(tmp_path / "empty-dir-does-not-exist") + "/"))


def _statuses(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".json") and not n.startswith(".")) if folder.exists() else []


def _read_output(out) -> tuple[list, list]:
    rows = sorted(pq.read_table(out / "examples").to_pylist(), key=lambda r: r["example_id"])
    statuses = []
    for name in _statuses(out / "status"):
        s = json.loads((out / "status" / name).read_text())
        s.pop("seconds")
        statuses.append(s)
    return rows, statuses


@pytest.mark.slow
def test_a_killed_job_rerun_equals_a_clean_run(tmp_path, ray_head):
    import subprocess
    import sys
    import time
    from concurrent.futures import ThreadPoolExecutor

    clusters = 6  # 2 experts: the stop lands after 2, with 4 to go (with 4 in all, a loaded machine finished them)
    write_clusters(tmp_path / "clusters", clusters)
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    args = ["--clusters", str(tmp_path / "clusters"), "--clip-pretrained", "", "--dreambooth-steps", "5",
            "--sample-steps", "4", "--prompts-per-cluster", "2", "--candidates-per-prompt", "2",
            "--clip-i-threshold", "0.0"]

    def submit(out, *extra, concurrency=2):
        cmd = [ray, "job", "submit", "--address", ray_head, *extra, "--", sys.executable, "jobs/apprentice.py",
               *args, "--concurrency", str(concurrency), "--output", str(out)]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)

    def job(*verb):
        return subprocess.run([ray, "job", *verb, "--address", ray_head], env=env, capture_output=True, text=True,
                              timeout=120)

    first = tmp_path / "interrupted"
    submit(first, "--no-wait", "--submission-id", "apprentice-interrupted")
    status_dir, deadline, killed = first / "status", time.time() + 600, False
    while time.time() < deadline:
        done = len(_statuses(status_dir))
        if done >= 1 and not killed:  # kill an expert actor mid-cluster: Ray restarts it and retries the call
            pids = subprocess.run(["pgrep", "-f", "ray::ExpertWorker"], capture_output=True, text=True).stdout.split()
            if pids:
                os.kill(int(pids[0]), 9)
                killed = True
        if done >= 2:
            break
        time.sleep(0.5)
    assert killed
    job("stop", "apprentice-interrupted")  # at once: a status call first let a loaded machine finish the run
    assert "was stopped" in job("status", "apprentice-interrupted").stdout  # the kill had not ended the job
    assert len(_statuses(status_dir)) < clusters  # stopped midway
    # finish the interrupted run; beside it, a clean run with one expert (what a cluster gives does
    # not depend on which expert draws it, nor on how many there are)
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(submit, first), pool.submit(submit, tmp_path / "clean", concurrency=1)]
        for proc in (run.result() for run in runs):
            assert proc.returncode == 0 and "succeeded" in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    stats = json.loads((first / "stats.json").read_text())
    assert stats["clusters_done"] == clusters and stats["clusters_already_done"] >= 2
    assert not [p for p in first.rglob("*.tmp*")]  # a write cut short by the kill was cleaned up
    assert _read_output(first) == _read_output(tmp_path / "clean")


def test_missing_model_files_fail_before_any_actor_starts(tmp_path):
    from ray_suti.apprentice.job import run_apprentice

    write_clusters(tmp_path / "clusters", 1)
    base = dict(clusters=str(tmp_path / "clusters"), output=str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        run_apprentice(ApprenticeConfig(**base, checkpoint="nowhere.safetensors"))
    with pytest.raises(FileNotFoundError, match="train one"):
        run_apprentice(ApprenticeConfig(**base, clip_pretrained=str(tmp_path / "clip.safetensors")))
    with pytest.raises(ValueError, match="--prompt-writer"):
        run_apprentice(ApprenticeConfig(**base, clip_pretrained="", prompt_writer="nowhere"))


def test_clusters_checkpoint_and_output_may_be_uris(tmp_path, ray_local):
    """Object storage instead of a shared file system: file:// goes through the same pyarrow calls as s3://."""
    from ray_suti.apprentice.job import run_apprentice

    write_clusters(tmp_path / "clusters", 2)
    cfg = ApprenticeConfig(clusters=(tmp_path / "clusters").as_uri(), output=(tmp_path / "out").as_uri(),
                           checkpoint=(REPO / "checkpoints" / "tiny-32.safetensors").as_uri(), concurrency=1, **FAST)
    earlier = set(_experts())  # other tests' runs on the session's Ray
    stats = run_apprentice(cfg, progress=False)
    assert stats["clusters_done"] == 2 and stats["candidates"] == 8
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["clusters_done"] == 2
    assert len(pq.read_table(tmp_path / "out" / "examples")) == stats["kept"] > 0
    started = set(_experts()) - earlier
    assert len(started) == 1 and _wait_until_dead(started)  # stopped when the run returned, garbage or not
    assert run_apprentice(cfg, progress=False)["clusters_already_done"] == 2  # resumes from the URI's status files
    assert set(_experts()) - earlier == started  # with nothing left to do, no expert started


def _experts() -> dict:
    from ray._private.state import actors  # the GCS's actor table: the session's Ray runs no dashboard

    return {a["ActorID"]: a for a in actors().values() if a["ActorClassName"] == "ExpertWorker"}


def _wait_until_dead(experts: set, timeout_s: float = 30) -> bool:
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if all(a["State"] == "DEAD" for actor_id, a in _experts().items() if actor_id in experts):
            return True
        time.sleep(0.2)
    return False
