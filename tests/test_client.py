"""The Python client against a stand-in server: retries on 503 honour Retry-After, other errors raise.
(Against the real Serve app: tests/serving/test_app.py::test_the_python_client_does_the_whole_round.)"""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ray_suti.client import SuTIAPIError, SuTIClient


class Flaky(BaseHTTPRequestHandler):
    answers: list = []  # (status, headers, body) in turn; the last repeats
    seen: list = []

    def do_GET(self):
        self.seen.append((time.time(), self.headers.get("Authorization")))
        status, headers, body = self.answers[min(len(self.seen) - 1, len(self.answers) - 1)]
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Flaky.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_503_is_retried_after_what_retry_after_asks(server):
    busy = (503, {"Retry-After": "1"}, {"detail": "busy"})
    Flaky.answers = [busy, busy, (200, {}, {"ok": True})]
    assert SuTIClient(server, token="k" * 16, backoff_s=0.01).health()
    (t0, auth), *_, (t2, _) = Flaky.seen
    assert len(Flaky.seen) == 3 and t2 - t0 >= 1.9 and auth == "Bearer " + "k" * 16


def test_a_server_that_stays_busy_or_refuses_raises_with_its_reason(server):
    Flaky.answers = [(503, {"Retry-After": "0"}, {"detail": "the model is busy"})]
    with pytest.raises(SuTIAPIError, match="503: the model is busy"):
        SuTIClient(server, retries=2, backoff_s=0.01).model()
    assert len(Flaky.seen) == 3
    Flaky.seen, Flaky.answers = [], [(429, {}, {"detail": "subject quota reached"})]
    with pytest.raises(SuTIAPIError) as e:
        SuTIClient(server, backoff_s=0.01).model()
    assert e.value.status == 429 and len(Flaky.seen) == 1  # a quota is not retried


def test_no_server_is_an_error_after_the_retries():
    with pytest.raises(SuTIAPIError, match="no answer"):
        SuTIClient("http://127.0.0.1:9", retries=1, backoff_s=0.01, timeout_s=2).health()


def test_cli_habits_version_pipeline_order_and_a_public_host_needing_keys(monkeypatch, capsys):
    """`ray-suti --version`; subcommands in pipeline order; `serve --host` off loopback refuses to
    start without keys, before any Ray starts."""
    from ray_suti import __version__
    from ray_suti.cli import build_parser, main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"ray-suti {__version__}"
    order = list(build_parser()._subparsers._group_actions[0].choices)
    stages = ["world", "build-dataset", "pretrain", "apprentice", "encode", "train", "evaluate", "serve"]
    assert [c for c in order if c in stages] == stages
    monkeypatch.delenv("SUTI_API_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="--host 0.0.0.0: the API needs credentials"):
        main(["serve", "--host", "0.0.0.0", "--replicas", "1"])


def test_the_cli_parser_loads_no_model_stack():
    """Every command builds the parser first: `ray-suti client` (an HTTP client) and `--help` must
    not load torch or the model libraries (seconds of CPU per call)."""
    from .conftest import model_libraries_loaded_by

    assert model_libraries_loaded_by("from ray_suti.cli import build_parser; build_parser()") == []


# Each job's driver, called with inputs that pass its first checks, and the error it stops at
# before any Ray work (a missing folder or file; controls the checkpoint was not trained with).
DRIVERS = {
    "apprentice": ("from ray_suti.apprentice.job import ApprenticeConfig as C, run_apprentice as run; "
                   "run(C(clusters='/nowhere'))", "FileNotFoundError"),
    "encode": ("from ray_suti.encode.job import EncodeConfig as C, run_encode as run; run(C(examples='/nowhere'))",
               "FileNotFoundError"),
    "evaluate": ("from ray_suti.evaluate.synthetic import SyntheticEvalConfig as C, evaluate_synthetic as run; "
                 "run(C(scheduler='euler-a', checkpoint='/nowhere.safetensors'))", "FileNotFoundError"),
    "evaluate-controls": ("from ray_suti.evaluate.controls import ControlsEvalConfig as C, evaluate_controls as run; "
                          "run(C(checkpoint='tiny-32'))", "ValueError"),
    "serve": ("from ray_suti.serving.app import build_app; "
              "build_app(checkpoint='tiny-32', scheduler='dpm++', allow_anonymous=True)", "None"),
    "build-dataset": ("from ray_suti.data.builder import BuildConfig as C, build_dataset as run; "
                      "run(C(input='/nowhere'))", "FileNotFoundError"),
    "index": ("from ray_suti.knowledge import IndexConfig as C, run_index as run; run(C(input='/nowhere'))",
              "FileNotFoundError"),
}


def test_job_drivers_check_their_inputs_without_the_model_stack():
    """A job's driver checks its inputs (checkpoint, scheduler name, controls, CLIP settings)
    before any work starts and leaves the model libraries to its actors and replicas: loading
    them there cost every `ray job submit` 3-15 s of CPU on the head node. One interpreter runs
    the drivers in turn and says where each stopped and what it left loaded."""
    from .conftest import model_libraries_loaded_by

    code = "".join(f"error = None\ntry:\n    {driver}\nexcept Exception as e:\n    error = e\n"
                   f"print({name!r}, type(error).__name__ if error else None, *sorted(set(sys.modules) & {{'torch', 'diffusers'}}), sep=':')\n"
                   for name, (driver, _) in DRIVERS.items())
    loaded = model_libraries_loaded_by(code)  # "name:error[:library...]" per driver, then what is left loaded
    assert loaded == [f"{name}:{error}" for name, (_, error) in DRIVERS.items()]
