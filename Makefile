# The README's two commands: `make demo` and `make test`. Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
export RAY_AUTH_MODE ?= disabled

.PHONY: setup browser demo test clean
setup: $(VENV)/.installed

# The web page's tests drive Debian's chromium through its chromedriver (no browser downloads).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

# Bytecode is written as modules are first imported, into a tree inside the venv (the repo stays
# clean), whatever PYTHONDONTWRITEBYTECODE the machine sets: the suite imports ~7,000 modules of the
# ~25,000 installed, so compiling on import costs a third of compiling all up front.
export PYTHONPYCACHEPREFIX := $(abspath $(VENV))/pycache
unexport PYTHONDONTWRITEBYTECODE

# uv installs the pins in well under a minute where pip took ~3 (parallel downloads and installs).
# It comes from PyPI into the venv itself, so nothing outside .venv changes.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q uv==0.13.9
	$(VENV)/bin/uv pip install --python $(PY) -q -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/ray-suti demo

# Two xdist workers: the Ray tests on one, those without Ray on the other at the least CPU share (lanes
# in tests/conftest.py; PYTEST_ARGS="-n 0": one process). pytest exits 5 when it collects no test.
test: setup browser
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

clean:
	rm -rf runs .pytest_cache
