"""The local multi-node cluster's start-up waits (`ray_suti.utils.local_cluster`); the real clusters
run in tests/conftest.py's `ray_cluster` and the multi-node rehearsal."""
import subprocess

import pytest
from ray.util.state.exception import ServerUnavailable

from ray_suti.utils.local_cluster import LocalCluster


class StartingDashboard(LocalCluster):
    """No Ray: each node a sleeping process, and a state API that refuses the first ``refusals``
    counts (as the dashboard's state module does while it starts), then counts the live nodes."""

    def __init__(self, refusals: int):
        self.procs, self.workers, self.temp_dir, self.address, self.refusals = [], 0, "/tmp", "", refusals
        self._start("head", [], 1, None)

    def _start(self, name, args, cpus, resources):
        self.procs.append(subprocess.Popen(["sleep", "60"]))

    def alive_nodes(self):
        if self.refusals:
            self.refusals -= 1
            raise ServerUnavailable("Failed to connect to API server.")
        return [{"node": i} for i, proc in enumerate(self.procs) if proc.poll() is None]


def test_a_worker_joins_though_the_state_api_refuses_at_first():
    cluster = StartingDashboard(refusals=2)
    try:
        cluster.add_worker(timeout_s=30)
        assert cluster.refusals == 0 and cluster.workers == 1
    finally:
        cluster.stop()


def test_a_state_api_that_never_answers_fails_at_the_deadline():
    cluster = StartingDashboard(refusals=10**6)
    try:
        with pytest.raises(RuntimeError, match="worker node did not join"):
            cluster.add_worker(timeout_s=2)
    finally:
        cluster.stop()
