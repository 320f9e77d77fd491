import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ray_suti.utils.local_cluster import free_port  # noqa: F401  (tests import it from here)

from .browser import browser  # noqa: F401  (a fixture: the web page's tests, in any package)

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Every Ray the suite starts (inherited): a node's log monitor globs the log folder every 0.1 s
# below 1,000 files, and every 0.5 s above; 0.5 s always (an idle node's monitor 0.009 -> 0.005 cores)
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
# Ray Data's default Parquet path (V2) starts a listing task and footer-reading actors per read, new
# processes each (~1.3 s of CPU apiece, ~30 reads a suite); the suite's own Rays read through V1,
# Ray's other supported path. The runs made as a user makes them keep Ray's default (AS_A_USER).
os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")
AS_A_USER = {"RAY_DATA_USE_DATASOURCE_V2": "1"}  # the demo's and the rehearsal's runs: V2 end to end

REPO = Path(__file__).resolve().parents[1]
DREAMBENCH = REPO.parent / "shared" / "data" / "dreambench-sample"


def pytest_report_header(config):
    """Said at the top of every run (CI's log included): whether the DreamBench tests can run."""
    found = DREAMBENCH.is_dir() and any(DREAMBENCH.glob("*/*.jpg"))
    return f"DreamBench sample: {'found at ' + str(DREAMBENCH) if found else 'ABSENT (' + str(DREAMBENCH) + '): its tests skip'}"


# Lanes for `make test` (two xdist workers; see pytest_xdist_make_scheduler). The modules that start
# no Ray at all run beside the Ray tests, at the least CPU share (a test here that starts Ray fails):
WITHOUT_RAY = ("tests/model/", "tests/apprentice/test_dreambooth.py", "tests/apprentice/test_prompts.py",
               "tests/bench/", "tests/data/test_captions.py", "tests/data/test_records.py",
               "tests/data/test_train_clip_render.py", "tests/data/test_urls.py",
               "tests/serving/test_batcher.py", "tests/serving/test_store.py", "tests/test_client.py",
               "tests/test_cluster_config.py", "tests/test_dockerfiles.py", "tests/test_k8s_manifests.py",
               "tests/test_package.py", "tests/train/test_adapter_only.py", "tests/train/test_data.py",
               "tests/train/test_loop.py", "tests/train/test_memory.py", "tests/train/test_resume.py",
               "tests/train/test_zero3_ema.py", "tests/utils/test_local_cluster.py", "tests/utils/test_publish.py",
               "tests/utils/test_storage.py", "tests/world/test_controls.py")


def lane(nodeid: str) -> str:
    """"ray" (the session's Ray, then the two-node cluster's tests, last) or "without_ray": each
    runs on one worker, in order."""
    return "without_ray" if nodeid.startswith(WITHOUT_RAY) else "ray"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's load-scope scheduling with the lanes as scopes: a scope runs on one worker, in order,
    the largest first. So one worker runs the tests without Ray from the start, at the least CPU
    share (``_without_ray_holds``: on the cores the Ray tests leave idle), the other the Ray lane.
    (xdist's own `--dist loadgroup` marks scopes by renaming a test's node id, which pytest 9.2
    ignores.)"""
    from xdist.scheduler import LoadScopeScheduling

    if config.getvalue("dist") != "load":  # another --dist asked for
        return None

    class LaneScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return lane(nodeid)

    return LaneScheduling(config, log)


def pytest_collection_modifyitems(session, config, items):
    """The tests that join an early run come after the rest (the later they join, the more of their
    run was done beside the others), then the two-node cluster's tests (its nodes then live only
    while they run; idle they still cost ~0.07 cores)."""
    def rank(item) -> int:
        return 2 if "ray_cluster" in item.fixturenames else int("early_run" in item.fixturenames)

    items.sort(key=rank)  # stable: the order is kept otherwise
    for item in items:
        if "ray_cluster" in item.fixturenames and lane(item.nodeid) != "ray":
            raise pytest.UsageError(f"{item.nodeid} uses ray_cluster: it belongs in the Ray lane, not WITHOUT_RAY")


MODEL_LIBRARIES = ("torch", "transformers", "diffusers", "open_clip")


def model_libraries_loaded_by(code: str, *args: str) -> list[str]:
    """The model libraries a fresh interpreter has imported after running ``code`` (with ``args`` as
    ``sys.argv[1:]``): what a process Ray starts, or a CLI call, pays for before any work."""
    probe = f"import sys\n{code}\nprint(*sorted(set({MODEL_LIBRARIES!r}) & set(sys.modules)))"
    return subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True).stdout.split()


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def _without_ray_holds(request):
    """A WITHOUT_RAY module runs beside the Ray lane: it must not start a Ray of its own. Under
    xdist its worker takes the least CPU share at its first such test (``_to_background``)."""
    if "PYTEST_XDIST_WORKER" in os.environ and lane(request.node.nodeid) == "without_ray":
        _to_background()
    before = _ray_is_up()
    yield
    if request.node.nodeid.startswith(WITHOUT_RAY) and _ray_is_up() and not before:
        pytest.fail(f"{request.node.nodeid} is listed in WITHOUT_RAY but started Ray")


@dataclass
class EarlyRun:
    process: subprocess.Popen
    folder: Path  # where it writes, its stdout.txt and stderr.txt included

    def join(self, timeout: float = 1500) -> str:
        """Waits for it to end; its stdout. Fails with the end of its stderr unless it exited 0."""
        code = self.process.wait(timeout=timeout)
        assert code == 0, f"exit {code}: " + (self.folder / "stderr.txt").read_text()[-3000:]
        return (self.folder / "stdout.txt").read_text()


class EarlyRuns(dict):
    """Slow, self-contained runs started with the first test: a test module's ``start_early(folder)``
    (a Popen of a command, its output to files in ``folder``) when one of its tests asks for
    ``early_run``. They run beside the tests, in a session of their own (so, with Linux's autogroup
    scheduling, with a share of the cores equal to the rest of the suite's, or the least share for
    a ``background`` one), and fill the share of the two cores the rest leaves idle; their tests
    join them where they stand. A background run starts no Ray: at the least share beside a busy
    Ray lane, a node missed the 30 s Ray gives a raylet to register (the rehearsal, session 21)."""

    def __init__(self, modules: dict, tmp_path_factory):
        super().__init__()
        self.modules, self.tmp_path_factory = modules, tmp_path_factory  # name -> (module, its lane)

    def start(self, name: str) -> EarlyRun:
        if name not in self:
            folder = self.tmp_path_factory.mktemp(name.rsplit(".", 1)[-1])
            self[name] = EarlyRun(self.modules[name][0].start_early(folder), folder)
        return self[name]


@pytest.fixture(scope="session")
def early_runs(request, tmp_path_factory):
    """The session's early runs (``EarlyRuns``); whatever still runs at the end is stopped."""
    modules = {}
    for item in request.session.items:
        module = getattr(item, "module", None)
        if "early_run" in getattr(item, "fixturenames", ()) and module.__name__ not in modules:
            modules[module.__name__] = (module, lane(item.nodeid))
    runs = EarlyRuns(modules, tmp_path_factory)
    yield runs
    for run in runs.values():
        if run.process.poll() is None:
            os.killpg(run.process.pid, signal.SIGKILL)


@pytest.fixture(autouse=True)
def start_early_runs(request, early_runs):
    """The first test starts the early runs; under xdist, the first test of a lane those of its lane
    (two workers must not start the same run; a lane runs on one worker)."""
    here = lane(request.node.nodeid)
    for name, (module, where) in early_runs.modules.items():
        if "PYTEST_XDIST_WORKER" not in os.environ or where == here:
            early_runs.start(name)


def start_early_command(command: list, folder: Path, background: bool = False, **popen) -> subprocess.Popen:
    """An early run's process (see ``EarlyRuns``): its own session and process group, its output in
    ``folder``/stdout.txt and stderr.txt. A ``background`` run gets the least CPU share: nice 19, and
    for its session's autogroup too (where Linux groups by session, nice counts only inside a group)."""
    with open(folder / "stdout.txt", "w") as out, open(folder / "stderr.txt", "w") as err:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err, start_new_session=True, **popen)
    if background:  # right away: the children it starts later inherit both
        _least_share(process.pid)
    return process


def _least_share(pid: int) -> None:
    os.setpriority(os.PRIO_PROCESS, pid, 19)
    try:
        Path(f"/proc/{pid}/autogroup").write_text("19")
    except OSError:
        pass  # no autogroup scheduling here: nice alone does it


def _to_background() -> None:
    """This process, once: a session of its own (an autogroup of its own) at the least share."""
    if os.getsid(0) != os.getpid():
        os.setsid()
        _least_share(os.getpid())


@pytest.fixture
def early_run(request, early_runs) -> EarlyRun:
    return early_runs.start(request.module.__name__)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole session, stopped by its own handle at the end. No dashboard:
    no test reads it (metrics come from the node's agent), and it would poll all session long."""
    import ray

    from ray_suti.utils.ray_utils import init_ray

    init_ray(num_cpus=2, dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def dreambench_dir():
    if not DREAMBENCH.is_dir():
        message = f"DreamBench sample not found at {DREAMBENCH} (it lives in ../shared, outside the repo)"
        if os.environ.get("CI"):  # CI runs every test: a machine without the sample is a broken CI machine
            pytest.fail(message)
        pytest.skip(message)
    return DREAMBENCH


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node cluster: `ray start --head` and one `ray start --address` worker node on
    127.0.0.1 (2 CPUs each), stopped through their own processes (never `ray stop`, which would end
    every Ray on the machine), for the tests that submit jobs (the multi-node rehearsal starts one of
    its own, as a user's run does)."""
    from ray_suti.utils.local_cluster import LocalCluster

    # Its nodes inherit this process's share: at the least (the without-Ray worker's), beside the
    # busy Ray lane, a worker node once took over 120 s to join (CI).
    if os.getpriority(os.PRIO_PROCESS, 0) > os.getpriority(os.PRIO_PROCESS, os.getppid()):
        pytest.fail("the two-node cluster would start at the least CPU share: it belongs in the Ray lane")
    with LocalCluster(head_cpus=2) as cluster:
        cluster.add_worker(cpus=2)
        yield cluster


@pytest.fixture(scope="session")
def ray_head(ray_cluster):
    """The shared cluster's dashboard address, for `ray job submit --address`."""
    return ray_cluster.dashboard
