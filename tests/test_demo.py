"""`ray-suti demo --preset smoke`: every stage end to end, as a user runs it, then a rerun that reuses them."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from ray_suti.demo import PRESETS, Stages, demo_config

from .conftest import REPO

STAGES = ["world", "build_dataset", "pretrain", "apprentice", "train", "evaluate synthetic", "serve"]


def run_demo(out, *extra):
    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own Ray, as on a newcomer's machine
    return subprocess.run([sys.executable, "-m", "ray_suti.cli", "demo", "--preset", "smoke", "--out", str(out),
                           *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_smoke_demo_runs_every_stage_and_a_rerun_reuses_them(tmp_path):
    out = tmp_path / "demo"
    first = run_demo(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    record = json.loads((out / "demo.json").read_text())
    assert list(record["seconds"]) == STAGES  # in pipeline order, each really ran
    assert "| suti |" in first.stdout and "Served one request" in first.stdout
    assert (out / "world" / "preview.png").exists() and (out / "clusters" / "stats.json").exists()
    assert any((out / "apprentice" / "examples").glob("*.parquet"))
    for model in ("base", "suti"):
        assert (out / "models" / f"{model}.safetensors").stat().st_size > 1_000_000
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["config"]["checkpoint"].endswith("suti.safetensors") and results["methods"]["suti"]["n"] == 4
    assert Image.open(out / "serve" / "generated.png").size == (32, 32)
    assert json.loads((out / "serve" / "request.json").read_text())["png_bytes"] > 0

    again = run_demo(out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert all(f"[demo] {stage}: reusing" in again.stdout for stage in STAGES)
    assert json.loads((out / "demo.json").read_text())["seconds"] == record["seconds"]


def test_a_folder_of_another_run_is_refused(tmp_path):
    Stages(demo_config("smoke", str(tmp_path)))
    (tmp_path / "demo.json").write_text(json.dumps({"settings": {"pages": 1}, "seconds": {}}))
    with pytest.raises(ValueError, match="other settings"):
        Stages(demo_config("smoke", str(tmp_path)))
    with pytest.raises(ValueError, match="unknown demo preset"):
        demo_config("huge")
    assert PRESETS["smoke"].pages < PRESETS["default"].pages
