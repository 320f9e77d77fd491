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
        self.workers = 0
        try:
            self._start_node("head", self._head_args, head_cpus, head_resources, self._dashboard_answers,
                             timeout_s, "ray head did not start")
        except RuntimeError:
            self.stop()
            raise

    def _head_args(self) -> list[str]:
        """Fresh ports for each try: a port a killed try held may still be taken."""
        self.gcs_port, dash = free_port(), free_port()
        self.address, self.dashboard = f"127.0.0.1:{self.gcs_port}", f"http://127.0.0.1:{dash}"
        return ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                "--include-dashboard=true", f"--temp-dir={self.temp_dir}",
                *self._ports(["--ray-client-server-port", "--runtime-env-agent-port"])]

    def _dashboard_answers(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
            return True
        except Exception:
            return False

    @staticmethod
    def _ports(flags: list[str]) -> list[str]:
        return [f"{flag}={free_port()}" for flag in flags]

    def _start(self, name: str, args: list[str], cpus: int, resources: dict | None) -> subprocess.Popen:
        cmd = [_ray_cli(), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0",
               *self._ports(["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                             "--dashboard-agent-grpc-port", "--metrics-export-port"]), *args]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        log = open(os.path.join(self.temp_dir, f"{name}.log"), "a")  # every try's output
        # A process group of its own (stopped as one; a terminal's Ctrl-C goes to the caller alone),
        # in the caller's session: where Linux shares the CPU by session, the nodes share the caller's.
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, process_group=0))
        return self.procs[-1]

    def _start_node(self, name: str, args, cpus: int, resources: dict | None, ready, timeout_s: float,
                    failure: str) -> None:
        """`ray start` of one node (``args()`` for each try), waiting until ``ready()``. A `ray start`
        that gives up is started again until the deadline: its raylet must register with the GCS
        within 30 s (a constant in Ray), which a node starved of CPU on a loaded machine can miss."""
        deadline = time.time() + timeout_s
        proc = self._start(name, args(), cpus, resources)
        while not ready():
            if time.time() > deadline:
                raise RuntimeError(f"{failure} in {timeout_s:.0f} s; see {self.temp_dir}/{name}.log")
            if proc.poll() is not None:  # it gave up: whatever it left of its node goes before the next try
                self._kill(proc)
                self.procs.remove(proc)
                proc = self._start(name, args(), cpus, resources)
            time.sleep(1)

    def add_worker(self, cpus: int = 1, resources: dict | None = None, timeout_s: float = 120) -> None:
        """Starts one more node and waits until the cluster counts it alive."""
        self.workers += 1
        name, tries = f"worker{self.workers}", []

        def args() -> list[str]:  # a name per try: a given-up try's raylet may count as alive a while
            tries.append(name if not tries else f"{name}-try{len(tries) + 1}")
            return [f"--address={self.address}", f"--node-name={tries[-1]}"]

        self._start_node(name, args, cpus, resources, lambda: self._counts(tries[-1]), timeout_s,
                         "worker node did not join")

    def _counts(self, name: str) -> bool:
        """Whether the cluster counts node ``name`` alive. The dashboard answers before its state API
        does (a module process of its own, slower still on a busy machine): a refusal is a no for now."""
        from ray.util.state.exception import ServerUnavailable

        try:
            return any(node["node_name"] == name for node in self.alive_nodes())
        except ServerUnavailable:
            return False

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
                self._kill(proc)
        self.procs.clear()

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        """``proc`` and what is left of its process group."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the group is gone already
        proc.wait()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
