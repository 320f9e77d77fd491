"""The README's local-head commands, run as written: the token, `ray start --head`, the client's auth
setting and address, `ray job submit`, `ray stop`.

Only what a shared test machine needs changes: free ports instead of 6379/8265, `--block` and a
temp dir so the test stops the head it started by its handle (`ray stop` would end every Ray on
the machine), and a fresh HOME so the head's token file is the test's own.
"""
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from ray_suti.utils.local_cluster import free_port

from .conftest import REPO

pytestmark = pytest.mark.slow
MARKER = "<!-- tests/test_readme.py runs this block -->"


def readme_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    assert MARKER in text, f"README.md lost the block marked {MARKER}"
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER):], re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_the_readme_local_head_sequence_runs_as_written(tmp_path):
    lines = readme_block()
    at = next(i for i, line in enumerate(lines) if line.startswith("ray start --head"))
    before, start, rest = lines[:at], lines[at], lines[at + 1:]
    assert rest[-1] == "ray stop"
    gcs, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(HOME=str(tmp_path / "home"), PATH=f"{os.path.dirname(sys.executable)}:{env['PATH']}")
    work = tmp_path / "work"  # the jobs write runs/ here, not into the repository
    work.mkdir()
    (work / "jobs").symlink_to(REPO / "jobs")
    for line in before:
        subprocess.run(["bash", "-c", line], env=env, cwd=work, check=True, timeout=60)
    assert (tmp_path / "home" / ".ray" / "auth_token").exists()
    temp_dir = tempfile_dir()
    ports = [f"--port={gcs}", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}"] + [
        f"{flag}={free_port()}" for flag in ("--ray-client-server-port", "--runtime-env-agent-port",
                                             "--node-manager-port", "--object-manager-port", "--metrics-export-port",
                                             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port")]
    head = subprocess.Popen(shlex.split(start) + ["--block", *ports], env=env, cwd=work, start_new_session=True,
                            stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_for_dashboard(f"http://127.0.0.1:{dash}", head, tmp_path / "head.log")
        client_env = dict(env)
        for line in rest[:-1]:
            line = line.replace("8265", str(dash))
            if line.startswith("export "):
                client_env.update(kv.split("=", 1) for kv in shlex.split(line)[1:])
                continue
            if line.startswith("ray job submit"):  # why the README sets RAY_AUTH_MODE: without it, no token is sent
                bare = {k: v for k, v in client_env.items() if k != "RAY_AUTH_MODE"}
                refused = subprocess.run(shlex.split(line), env=bare, cwd=work, capture_output=True, text=True,
                                         timeout=120)
                assert refused.returncode != 0 and "no authentication token" in refused.stdout + refused.stderr
            proc = subprocess.run(shlex.split(line), env=client_env, cwd=work, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, line + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
        assert (work / "runs" / "world" / "world.json").exists()
    finally:
        head.terminate()  # the README's `ray stop`, for this head only
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit


def wait_for_dashboard(url: str, head: subprocess.Popen, log, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # up, and asking for the token
            return
        except Exception:
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray head did not start:\n{open(log).read()[-3000:]}")
            time.sleep(1)


def test_the_readme_python_example_runs_as_written(tmp_path, dreambench_dir, monkeypatch):
    """Only the paths change: a Stable Diffusion-shaped folder and its SuTI adapter built from the
    tiny latent preset, and DreamBench's dog photos for dog/."""
    import torch
    from diffusers import StableDiffusionPipeline

    from ray_suti import SuTIPipeline

    text = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("## From Python"):], re.S).group(1)
    suti = SuTIPipeline.from_preset("tiny-latent")
    suti.save_pretrained(str(tmp_path / "full"))
    suti.save_suti_adapter(str(tmp_path / "suti.safetensors"), dtype=torch.float32)
    StableDiffusionPipeline.from_pretrained(str(tmp_path / "full"), safety_checker=None,
                                            requires_safety_checker=False).save_pretrained(str(tmp_path / "sd"))
    for written, ours in (("path/to/stable-diffusion-v1-5", tmp_path / "sd"),
                          ("suti-sd15.safetensors", tmp_path / "suti.safetensors"), ("dog/", dreambench_dir / "dog2")):
        assert f'"{written}' in code, f"the README's Python example no longer mentions {written}"
        code = code.replace(f'"{written}', f'"{ours}/' if written.endswith("/") else f'"{ours}')
    monkeypatch.chdir(REPO)  # the example names checkpoints/ from the repository's root
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert len(scope["images"]) == 1 and scope["images"][0].size == (64, 64)
