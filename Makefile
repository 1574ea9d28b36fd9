# `make serve` and `make test` are all a fresh clone needs (Python 3.11+ and make).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint typecheck unit bench clean crashtest screenshots

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when the project metadata changes. Debian packages, installed only when
# missing, as root, with apt-get: bubblewrap for options.sandbox and its tests;
# systemd for `systemd-analyze verify` of the units and `systemd-socket-activate`;
# chromium for the browser tests (Playwright drives /usr/bin/chromium and never
# downloads a browser of its own).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@command -v bwrap >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || apt-get install -y bubblewrap >/dev/null 2>&1 || true
	@command -v systemd-analyze >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || apt-get install -y systemd >/dev/null 2>&1 || (apt-get update >/dev/null 2>&1 && apt-get install -y systemd >/dev/null 2>&1) || true
	@[ -x /usr/bin/chromium ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || apt-get install -y chromium >/dev/null 2>&1 || (apt-get update >/dev/null 2>&1 && apt-get install -y chromium >/dev/null 2>&1) || true
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/loki serve

lint: $(STAMP)
	$(BIN)/ruff check lokid tests bench
	$(BIN)/ruff format --check lokid tests bench

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy tests bench

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck unit

# wrk (a Debian package) is the load generator when present; else a Python one.
bench: $(STAMP)
	@command -v wrk >/dev/null || [ "$$(id -u)" != 0 ] || apt-get install -y wrk >/dev/null 2>&1 || true
	$(BIN)/python -m bench health

# Crash-point testing, the full run: 100 seeds of SIGKILL under load (docs/reliability.md), ~10-13 min.
crashtest: $(STAMP)
	LOKI_CRASH_SEEDS=100 $(BIN)/python -m pytest -q tests/test_crash.py

# Re-take the web dashboard's screenshots in docs/screenshots/ (docs/web-dashboard.md).
screenshots: $(STAMP)
	LOKI_UPDATE_SCREENSHOTS=1 $(BIN)/python -m pytest -q tests/test_browser.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
