"""bench/gpu_sd15.py's CPU smoke run: every section measured, positive numbers, no Ray imported."""
import json
import os
import sys

from ..conftest import start_early_command

SECTIONS = ("train", "train_cached_inputs", "train_checkpointing", "train_cached_inputs_checkpointing",
            "demo_encoding", "sampling", "sampling_batch8")
NOT_IMPORTED = ("ray", "deepspeed", "open_clip")


def numbers(tree):
    """Every int/float leaf of a JSON tree (bools and nulls left out)."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def start_early(folder):
    """The smoke run (~30 s of one process) runs in the background from the session's start
    (tests/conftest.py, ``EarlyRuns``); the test below joins it."""
    cmd = [sys.executable, "bench/gpu_sd15.py", "--preset", "tiny-latent", "--steps", "2", "--sample-steps", "2",
           "--device", "cpu", "--out", str(folder / "gpu_sd15.json")]
    return start_early_command(cmd, folder, background=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cpu_smoke_run_measures_every_section(early_run):
    early_run.join(timeout=600)
    out, stderr = early_run.folder / "gpu_sd15.json", (early_run.folder / "stderr.txt").read_text()
    result = json.loads(out.read_text())
    assert result["preset"] == "tiny-latent" and result["device"] == "cpu" and result["dtype"] == "fp32"
    assert all(n > 0 for n in result["parameters"].values())
    assert result["imported"] == {m: False for m in NOT_IMPORTED}  # after the whole run, so not on import either
    for name in SECTIONS:
        section = result["sections"][name]
        assert "error" not in section and "skipped" not in section, (name, section)
        assert numbers(section) and all(n > 0 for n in numbers(section)), (name, section)
        assert f"] {name}: " in stderr  # one human line per section
    for name in SECTIONS[:4]:
        assert result["sections"][name]["examples_per_s"] > 0
    assert "VAE and text encoder not run" in result["sections"]["train_cached_inputs"]["inputs"]
    sampling = result["sections"]["sampling"]
    assert set(sampling["ratio_to_plain_sd"]) == {"suti_cached", "suti_interleaved", "suti_branches"}
    assert set(result["sections"]["sampling_batch8"]["images_per_s"]) == {"plain_sd", "suti_cached", "suti_interleaved"}
    assert result["sections"]["demo_encoding"]["seconds_per_subject"] > 0


def test_a_failing_section_is_recorded_and_the_next_still_runs(tmp_path):
    from bench.gpu_sd15 import Bench, parse_args

    bench = Bench(parse_args(["--device", "cpu", "--out", str(tmp_path / "x.json")]))
    bench.section("broken", lambda: {"x": 1 / 0}, str)
    bench.section("fine", lambda: {"x": 2.0}, str)
    sections = json.loads((tmp_path / "x.json").read_text())["sections"]
    assert sections["broken"] == {"error": "ZeroDivisionError: division by zero"}
    assert sections["fine"]["x"] == 2.0
