"""A real multi-node Ray cluster on one machine: `ray start --head` and `ray start --address` nodes
on 127.0.0.1, each with its own resources, stopped through their own processes (never `ray stop`,
which would end every Ray on the machine). Used by the tests and the multi-node rehearsal."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    local = os.path.join(os.path.dirname(sys.executable), "ray")
    return local if os.path.exists(local) else shutil.which("ray") or "ray"


class LocalCluster:
    """``with LocalCluster(head_cpus=2) as c: c.add_worker(cpus=2); ...`` -> c.address (GCS) and
    c.dashboard (for ``ray job submit``)."""

    def __init__(self, head_cpus: int = 2, head_resources: dict | None = None, timeout_s: float = 120):
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths have a length limit
        # No drain on stop: Ray's SIGTERM handler otherwise waits up to 30 s for the node's actors
        # (meant for Serve replicas on Kubernetes; here it only delayed every test session's end).
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.procs: list[subprocess.Popen] = []
        self.gcs_port, dash = free_port(), free_port()
        self.address, self.dashboard = f"127.0.0.1:{self.gcs_port}", f"http://127.0.0.1:{dash}"
        self._start("head", ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", "--include-dashboard=true", f"--temp-dir={self.temp_dir}",
                             *self._ports(["--ray-client-server-port", "--runtime-env-agent-port"])],
                    head_cpus, head_resources)
        deadline = time.time() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
                break
            except Exception:
                if self.procs[0].poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"ray head did not start; see {self.temp_dir}/head.log")
                time.sleep(1)
        self.workers = 0

    @staticmethod
    def _ports(flags: list[str]) -> list[str]:
        return [f"{flag}={free_port()}" for flag in flags]

    def _start(self, name: str, args: list[str], cpus: int, resources: dict | None) -> None:
        cmd = [_ray_cli(), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0",
               *self._ports(["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                             "--dashboard-agent-grpc-port", "--metrics-export-port"]), *args]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        log = open(os.path.join(self.temp_dir, f"{name}.log"), "w")
        # A process group of its own (stopped as one; a terminal's Ctrl-C goes to the caller alone),
        # in the caller's session: where Linux shares the CPU by session, the nodes share the caller's.
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, process_group=0))

    def add_worker(self, cpus: int = 1, resources: dict | None = None, timeout_s: float = 120) -> None:
        """Starts one more node and waits until the cluster counts it. The dashboard answers before
        its state API does (a module process of its own, slower still on a busy machine), so until
        the deadline an unanswered count is one more wait."""
        from ray.util.state.exception import ServerUnavailable

        self.workers += 1
        self._start(f"worker{self.workers}", [f"--address={self.address}"], cpus, resources)
        deadline = time.time() + timeout_s
        while True:
            try:
                if len(self.alive_nodes()) >= 1 + self.workers:
                    return
            except ServerUnavailable:
                pass
            if self.procs[-1].poll() is not None or time.time() > deadline:
                raise RuntimeError(f"worker node did not join; see {self.temp_dir}/worker{self.workers}.log")
            time.sleep(1)

    def alive_nodes(self) -> list:
        """The nodes alive now (Ray's state API: node_id, resources_total, ...)."""
        from ray.util.state import list_nodes

        return list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")])

    def stop(self) -> None:
        for proc in reversed(self.procs):  # workers first, the head last
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
