"""The local multi-node cluster's start-up waits (`ray_suti.utils.local_cluster`); the real clusters
run in tests/conftest.py's `ray_cluster` and the multi-node rehearsal."""
import subprocess

import pytest
from ray.util.state.exception import ServerUnavailable

from ray_suti.utils.local_cluster import LocalCluster


class StartingCluster(LocalCluster):
    """No Ray: each node a sleeping process named by its `--node-name`, except the first ``give_ups``
    worker starts, which exit at once (a `ray start` that gave up on its raylet), and a state API that
    refuses the first ``refusals`` counts (as the dashboard's state module does while it starts)."""

    def __init__(self, refusals: int = 0, give_ups: int = 0):
        self.procs, self.workers, self.temp_dir, self.address = [], 0, "/tmp", ""
        self.refusals, self.give_ups, self.names = refusals, give_ups, {}
        self._start("head", ["--node-name=head"], 1, None)

    def _start(self, name, args, cpus, resources):
        gives_up = name != "head" and self.give_ups > 0
        self.give_ups -= gives_up
        proc = subprocess.Popen(["true"] if gives_up else ["sleep", "60"], process_group=0)
        name = next(arg.split("=", 1)[1] for arg in args if arg.startswith("--node-name="))
        self.names[proc] = None if gives_up else name  # its node never registers
        self.procs.append(proc)
        return proc

    def alive_nodes(self):
        if self.refusals:
            self.refusals -= 1
            raise ServerUnavailable("Failed to connect to API server.")
        return [{"node_name": self.names[proc]} for proc in self.procs if proc.poll() is None and self.names[proc]]


@pytest.fixture
def starting_cluster():
    clusters = []
    yield lambda **kw: clusters.append(StartingCluster(**kw)) or clusters[-1]
    for cluster in clusters:
        cluster.stop()


def test_a_worker_joins_though_the_state_api_refuses_at_first(starting_cluster):
    cluster = starting_cluster(refusals=2)
    cluster.add_worker(timeout_s=30)
    assert cluster.refusals == 0 and [node["node_name"] for node in cluster.alive_nodes()] == ["head", "worker1"]


def test_a_worker_whose_ray_start_gave_up_is_started_again(starting_cluster):
    cluster = starting_cluster(give_ups=2)
    cluster.add_worker(timeout_s=30)
    assert [node["node_name"] for node in cluster.alive_nodes()] == ["head", "worker1-try3"]
    assert len(cluster.procs) == 2  # the given-up tries are gone


def test_a_state_api_that_never_answers_fails_at_the_deadline(starting_cluster):
    cluster = starting_cluster(refusals=10**6)
    with pytest.raises(RuntimeError, match="worker node did not join in 2 s"):
        cluster.add_worker(timeout_s=2)
