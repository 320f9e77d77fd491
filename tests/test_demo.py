"""`ray-suti demo --preset smoke`: every stage end to end, as a user runs it; a rerun reuses every
stage, and with `--keep-serving` then runs `ray-suti serve` on the trained model until Ctrl-C."""
import json
import os
import signal
import subprocess
import sys

import pytest
import requests
from PIL import Image

from ray_suti.demo import PRESETS, Stages, demo_config, run_demo
from ray_suti.utils.console import Console

from .conftest import AS_A_USER, REPO, free_port, start_early_command

STAGES = ["world", "build_dataset", "pretrain", "apprentice", "train", "evaluate synthetic", "serve"]


def demo_command(out, *extra):
    return [sys.executable, "-m", "ray_suti.cli", "demo", "--preset", "smoke", "--out", str(out), *extra]


ENV = {**os.environ, **AS_A_USER, "RAY_ADDRESS": "local"}  # its own Ray, as on a newcomer's machine


def start_early(folder):
    """The first run, every stage from nothing, started with the session beside the other tests
    (tests/conftest.py, ``early_runs``); the test below joins it."""
    return start_early_command(demo_command(folder / "demo"), folder, env=ENV)


@pytest.mark.slow
def test_smoke_demo_runs_every_stage_keeps_serving_and_a_rerun_reuses_them(tmp_path, early_run, monkeypatch, capsys):
    out, stdout = early_run.folder / "demo", early_run.join()
    errors = (early_run.folder / "stderr.txt").read_text()
    record = json.loads((out / "demo.json").read_text())
    assert list(record["seconds"]) == STAGES  # in pipeline order, each really ran
    # One line per stage with its key figure; Ray's and the libraries' output in the log file only.
    for i, stage in enumerate(STAGES):
        assert f"[{i + 1}/{len(STAGES)}] {stage}" in stdout and record["figures"][stage] in stdout
    assert "dB vs" in record["figures"]["evaluate synthetic"] and "web pages" in record["figures"]["world"]
    assert "| suti |" in stdout and "Served one request" in stdout
    assert len(stdout.splitlines()) < 60 and errors == "", errors[-2000:]
    log = (out / "logs" / "demo.log").read_text()
    assert "Started a local Ray instance" in log and "Started a local Ray instance" not in stdout
    assert "(pid=" not in stdout and "(pid=" in log  # the workers' output, forwarded by Ray
    assert (out / "world" / "preview.png").exists() and (out / "clusters" / "stats.json").exists()
    assert any((out / "apprentice" / "examples").glob("*.parquet"))
    for model in ("base", "suti"):
        assert (out / "models" / f"{model}.safetensors").stat().st_size > 1_000_000
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["config"]["checkpoint"].endswith("suti.safetensors") and results["methods"]["suti"]["n"] == 4
    assert Image.open(out / "serve" / "generated.png").size == (32, 32)
    assert Image.open(out / "serve" / "contact.png").width > 4 * 128  # three photos and the drawing
    assert json.loads((out / "serve" / "request.json").read_text())["png_bytes"] > 0

    # a rerun (after a crash, or to see the report again) reuses every stage and starts no Ray
    def no_ray(*args, **kwargs):
        raise AssertionError("a rerun that reuses every stage started Ray")

    with monkeypatch.context() as patch:
        patch.setattr("ray_suti.utils.ray_utils.init_ray", no_ray)  # read where each stage would run
        capsys.readouterr()
        run_demo(demo_config("smoke", str(out)), Console(None))
    assert capsys.readouterr().out.count("(reused)") == len(STAGES)
    assert json.loads((out / "demo.json").read_text())["seconds"] == record["seconds"]

    # `--keep-serving` then serves the trained model: `ray-suti serve`, the whole round through the CLI's client
    port = free_port()
    serving = subprocess.Popen(demo_command(out, "--keep-serving", "--port", str(port)), cwd=REPO, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url, lines = f"http://127.0.0.1:{port}", []
    try:
        for line in serving.stdout:  # the stages (reused), the report, then the page's URL
            lines.append(line)
            if "open http://" in line:
                break
        assert f"open {url}/" in lines[-1], "".join(lines)
        assert "".join(lines).count("(reused)") == len(STAGES)  # the CLI's rerun, too, reuses every stage
        assert requests.get(f"{url}/", timeout=30).status_code == 200
        listed = requests.get(f"{url}/v1/subjects", timeout=30).json()["subjects"]
        assert len(listed) == 1  # the demo's subject

        client = [sys.executable, "-m", "ray_suti.cli", "client", "--url", url]
        run = lambda *a: json.loads(subprocess.run(client + list(a), cwd=REPO, check=True, capture_output=True,  # noqa: E731
                                                   text=True, timeout=120).stdout)
        demos = [str(out / "serve" / f"demo_{i}.png") for i in range(3)]
        subject = run("register", *demos, "--caption", *["a toy"] * 3)["subject_id"]
        made = run("generate", "a toy on a shelf", "--subject-id", subject, "--steps", "4", "--seed", "1",
                   "--out", str(tmp_path / "toy.png"))
        assert made["seed"] == 1 and Image.open(made["images"][0]).size == (32, 32)
        assert {m["subject_id"] for m in run("list")["subjects"]} == {subject, listed[0]["subject_id"]}
        assert run("delete", subject) == {"deleted": True}
    finally:
        serving.send_signal(signal.SIGINT)
        rest, serve_errors = serving.communicate(timeout=120)
    assert serving.returncode == 0, "".join(lines)[-3000:] + rest[-3000:] + serve_errors[-3000:]
    assert "stopped" in rest
    assert json.loads((out / "demo.json").read_text())["seconds"] == record["seconds"]
    assert (out / "logs" / "demo.log").read_text().startswith(log)  # the log is appended to
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=5)


def test_a_folder_of_another_run_is_refused(tmp_path):
    Stages(demo_config("smoke", str(tmp_path)), STAGES, Console(None))
    (tmp_path / "demo.json").write_text(json.dumps({"settings": {"pages": 1}, "seconds": {}}))
    with pytest.raises(ValueError, match="other settings"):
        Stages(demo_config("smoke", str(tmp_path)), STAGES, Console(None))
    with pytest.raises(ValueError, match="unknown demo preset"):
        demo_config("huge")
    assert PRESETS["smoke"].pages < PRESETS["default"].pages
