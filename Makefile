# The two commands a newcomer needs: `make run` (worker + beat on embedded defaults) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test bench soak faults mutants install lock clean

# Dependencies come from the lock, every version pinned and every file's hash checked (docs/deploying.md);
# the package itself goes in without resolving anything more. An old pip is upgraded first: the lock's
# hash mode needs a recent one.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(BIN)/media-retention: $(BIN)/python pyproject.toml requirements-test.lock
	$(BIN)/pip install --quiet --require-hashes -r requirements-test.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

install: $(BIN)/media-retention

# `make lock` refreshes both locks from pyproject.toml's ranges (newest versions inside them), for CPython
# 3.11 on Linux whatever machine runs it: requirements.lock (what production installs) and
# requirements-test.lock (that plus the test extras; `make install` and CI), constrained by the first so the
# suite runs on exactly the versions production installs. uv is pinned so that two refreshes of the same
# ranges on the same day give the same files.
UV_VERSION := 0.13.8
LOCK_TARGET := --python-version 3.11 --python-platform x86_64-unknown-linux-gnu --generate-hashes --quiet

$(BIN)/uv: $(BIN)/python
	$(BIN)/pip install --quiet uv==$(UV_VERSION)

lock: $(BIN)/uv
	$(BIN)/uv pip compile pyproject.toml $(LOCK_TARGET) --upgrade -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra test -c requirements.lock $(LOCK_TARGET) --upgrade -o requirements-test.lock

run: install
	$(BIN)/media-retention run

# The suite runs in TEST_WORKERS pytest-xdist processes: much of it waits on the processes it starts (celery
# workers, moto, private Redis and PostgreSQL servers, the installed wheel), so 3 workers beat 2 on the
# 2-core machine (README, "Tests"). `make test TEST_WORKERS=0` runs it in one process; `pytest PATH` alone
# is serial (no -n in addopts). The slowest tests are listed at the end: the suite must stay well under
# 10 minutes.
TEST_WORKERS ?= 3

test: install
	$(BIN)/pytest -n $(TEST_WORKERS) --durations=25

bench: install
	$(BIN)/pytest tests/bench -s -p no:cacheprovider -o addopts=-ra -o python_files='bench_*.py' -o timeout=7200

clean:
	rm -rf $(VENV) media-retention-data

# The model-based test of the retention promises with many more examples than the default suite runs.
soak: install
	MEDIA_RETENTION_TEST_MODEL_EXAMPLES=5000 $(BIN)/pytest tests/integration/test_retention_model.py -p no:cacheprovider

# The fault-injection suite with 100 SIGKILLs of each killed command instead of 20 (seed printed; replay
# with MEDIA_RETENTION_TEST_FAULT_SEED).
faults: install
	MEDIA_RETENTION_TEST_KILLS=100 $(BIN)/pytest tests/faults -p no:cacheprovider --durations=10

# Does the model-based test see each planted safety bug (tests/mutants/mutations.py)? Each is planted in a
# scratch copy of the working tree and the model test run there; the table says killed or survived and how
# many examples it took. Options after ARGS, e.g. `make mutants ARGS='--only lookups-ignore-expiry --examples 40'`.
mutants: install
	$(BIN)/python -m tests.mutants.run $(ARGS)
