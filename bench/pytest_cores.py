"""A pytest plugin: each test's wall seconds and the mean number of busy cores while it ran.

    PYTHONPATH=bench CORES_LOG=runs/test-cores.txt make test PYTEST_ARGS="-p pytest_cores"

Busy cores come from /proc/stat (the whole machine, so the test's Ray processes count too); one
line per test: ``wall  cores  nodeid``, appended to ``CORES_LOG``. Sort it to see which tests leave
a core idle.
"""
import os
import time

_started: dict = {}


def _busy_ticks() -> int:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


# Under xdist the controller logs every test (the workers would log theirs twice).
_IN_A_WORKER = "PYTEST_XDIST_WORKER" in os.environ


def pytest_runtest_logstart(nodeid, location):
    if _IN_A_WORKER:
        return
    _started[nodeid] = (time.time(), _busy_ticks())


def pytest_runtest_logfinish(nodeid, location):
    if _IN_A_WORKER:
        return
    t0, busy0 = _started.pop(nodeid)
    wall = time.time() - t0
    cores = (_busy_ticks() - busy0) / os.sysconf("SC_CLK_TCK") / wall if wall > 0 else 0.0
    with open(os.environ.get("CORES_LOG", "test-cores.txt"), "a") as f:
        f.write(f"{wall:8.1f} {cores:5.2f} {nodeid}\n")
