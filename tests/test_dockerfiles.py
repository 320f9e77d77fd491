"""The Docker images, checked without Docker: every file they copy exists, the base images are
pinned, and the command the CPU image runs parses with the real CLI and serves off loopback with keys."""
import json
import shlex

import pytest

from .conftest import REPO

DOCKERFILES = ["Dockerfile", "k8s/Dockerfile"]


def instructions(path: str) -> list[tuple[str, str]]:
    lines, out = (REPO / path).read_text().splitlines(), []
    joined = ""
    for line in lines:
        if line.strip().startswith("#") or not line.strip():
            continue
        joined += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            op, _, arg = joined.strip().partition(" ")
            out.append((op.upper(), arg.strip()))
            joined = ""
    return out


@pytest.mark.parametrize("path", DOCKERFILES)
def test_a_dockerfile_copies_files_that_exist_from_a_pinned_base(path):
    steps = instructions(path)
    assert steps[0][0] == "FROM" and ":" in steps[0][1] and not steps[0][1].endswith(":latest")
    ignored = (REPO / ".dockerignore").read_text().split()
    for op, arg in steps:
        assert op in {"FROM", "WORKDIR", "RUN", "COPY", "ENV", "EXPOSE", "VOLUME", "CMD"}, op
        if op == "COPY":
            sources = [a for a in shlex.split(arg) if not a.startswith("--")][:-1]
            for src in sources:
                assert src == "." or (REPO / src).exists(), f"{path}: COPY {src}: not in the repo"
                assert src not in ignored
        if op == "RUN" and "pip install" in arg:
            assert all("==" in p for p in shlex.split(arg) if p.startswith(("torch", "torchvision")))


def test_the_cpu_image_serves_the_embedded_default_with_keys(monkeypatch):
    from ray_suti.cli import LOOPBACK, build_parser

    steps = dict(instructions("Dockerfile"))
    command = json.loads(steps["CMD"])
    assert command[0] == "ray-suti"  # the console script pyproject.toml installs
    args = build_parser().parse_args(command[1:])
    assert args.command == "serve" and args.host not in LOOPBACK and str(args.port) == steps["EXPOSE"]
    assert (REPO / args.checkpoint).is_file() and args.store.startswith(steps["VOLUME"])
    monkeypatch.delenv("SUTI_API_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="needs credentials"):  # `docker run` without a key refuses to start
        args.func(args)
