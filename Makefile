# Everything a fresh machine needs: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint types unit bytecode soak bench systemd-test clean

# The versions tested (constraints.txt). uv installs them in about a third of pip's time (15 s
# against 42 s on a fresh clone here); where uv cannot be had, pip does it. The venv is made
# without pip and the pip of $(PYTHON) installs into it (`--python`, pip 22.3+): bootstrapping
# the venv's own pip (ensurepip) took 6 s, and is done only where $(PYTHON) has no such pip. No
# bytecode is compiled ahead: `make test` compiles what it imports (see bytecode).
$(BIN)/productiv-watcher: pyproject.toml constraints.txt
	$(PYTHON) -m venv --without-pip $(VENV)
	pip="$(PYTHON) -m pip --python $(BIN)/python"; \
	$$pip --version >/dev/null 2>&1 || { $(BIN)/python -m ensurepip >/dev/null && pip="$(BIN)/python -m pip"; }; \
	{ $$pip install --quiet -c constraints.txt uv && \
	  $(BIN)/uv pip install --quiet --python $(BIN)/python -c constraints.txt -e '.[test]'; } || \
	$$pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: $(BIN)/productiv-watcher
	$(BIN)/productiv-watcher demo

# mypy runs beside the first collection (each on one core of 2), then the suite.
test: lint
	$(MAKE) --no-print-directory -j2 types bytecode
	$(SUITE)

lint: $(BIN)/productiv-watcher
	$(BIN)/ruff check watcher tests
	$(BIN)/ruff format --check watcher tests

types: $(BIN)/productiv-watcher
	$(BIN)/mypy watcher

# Eight workers: the tests mostly wait on sockets, files and child processes, so they overlap on
# 2 cores (measured: 4 workers 100-120 s, 8 workers 67-85 s). Tests go out two at a time, the long
# ones (@pytest.mark.long) first, so that the workers end together. One collection first writes the
# bytecode of the package and of the tests' rewritten asserts, which the 8 workers then only
# read (each wrote its own on a fresh clone: 3 CPU-s apiece); written even where the environment
# says not to (PYTHONDONTWRITEBYTECODE, as in some CI images).
SUITE := env -u PYTHONDONTWRITEBYTECODE $(BIN)/pytest -q -n 8 --maxschedchunk 2

unit: bytecode
	$(SUITE)

bytecode: $(BIN)/productiv-watcher
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/pytest -q --collect-only >/dev/null

soak: $(BIN)/productiv-watcher
	$(BIN)/pytest -q -s -m soak tests/soak

# The daemon on a real systemd: this host's / under an overlay, booted by systemd-nspawn, installed
# with deploy/install.sh from a fresh clone of HEAD (about 2 minutes; needs root and overlayfs,
# installs systemd-container when missing, else says why it skips). See tests/systemd_real/.
systemd-test:
	$(PYTHON) tests/systemd_real/run.py

# rclone serve s3 + boto3 presigned URLs vs the daemon; writes docs/benchmarks.md (15-21 minutes on
# a quiet machine; `.venv/bin/python tests/bench/bench.py --quick --runs 1` tries it in ~1.5)
bench: $(BIN)/productiv-watcher
	$(BIN)/python tests/bench/bench.py --scaling 1000,5000,20000,50000 --write docs/benchmarks.md

clean:
	rm -rf $(VENV) demo *.egg-info
