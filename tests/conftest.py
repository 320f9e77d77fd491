import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
DREAMBENCH = REPO.parent / "shared" / "data" / "dreambench-sample"


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole session, stopped by its own handle at the end."""
    import ray

    from ray_suti.utils.ray_utils import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def dreambench_dir():
    if not DREAMBENCH.is_dir():
        pytest.skip(f"DreamBench sample not found at {DREAMBENCH} (it lives in ../shared, outside the repo)")
    return DREAMBENCH


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_head():
    """A real `ray start --head --block` on 127.0.0.1, stopped through its own process (never
    `ray stop`, which would end every Ray on the machine). Yields the dashboard address."""
    import subprocess
    import tempfile
    import time
    import urllib.request

    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    dash = free_port()
    ports = {flag: free_port() for flag in ("--port", "--node-manager-port", "--object-manager-port",
                                            "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                            "--metrics-export-port", "--ray-client-server-port",
                                            "--runtime-env-agent-port")}
    cmd = [str(REPO / ".venv" / "bin" / "ray") if (REPO / ".venv" / "bin" / "ray").exists() else "ray",
           "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", "--num-cpus=2", f"--temp-dir={temp_dir}", "--include-dashboard=true",
           *[f"{k}={v}" for k, v in ports.items()]]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    log = open(os.path.join(temp_dir, "head.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"ray head did not start; see {temp_dir}/head.log")
            time.sleep(1)
    yield address
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
