# `make run` starts the service under gunicorn; `make test` runs the tests; `make stress` fuzzes
# harder; `make bench` benchmarks it. Each creates .venv on first use and reinstalls only when a
# requirements file changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CHROMIUM := /usr/bin/chromium
REDIS_SERVER := /usr/bin/redis-server
NGINX := /usr/sbin/nginx
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: run dev test stress lint bench clean

# gunicorn -c gunicorn.conf.py, once run_gunicorn.py has checked the variables gunicorn reads itself.
run: $(VENV)/.installed
	$(BIN)/python run_gunicorn.py

dev: $(VENV)/.installed
	$(BIN)/python app.py

test: $(VENV)/.installed-dev $(CHROMIUM) $(REDIS_SERVER) $(NGINX) node_modules/.installed
	$(BIN)/python -m pytest

# The fuzz tests at 500 examples per operation instead of 20, and the long tests marked stress (STRESS=1); the
# pool model runs over Redis too, as the Redis storm does: both start their own redis-server.
stress: $(VENV)/.installed-dev $(REDIS_SERVER)
	STRESS=1 FUZZ_EXAMPLES=500 $(BIN)/python -m pytest -m "stress or fuzz" -p no:cacheprovider -o addopts="" \
		-ra --strict-markers --timeout=1800 -s --hypothesis-show-statistics

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Installs wrk, strace, chromium and redis-server (Debian packages; figure 9 starts its own redis-server) when
# missing; writes bench/RESULTS.md.
bench: $(VENV)/.installed-bench $(CHROMIUM) $(REDIS_SERVER)
	@command -v wrk >/dev/null || ($(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends wrk)
	@command -v strace >/dev/null || ($(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends strace)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache .hypothesis bench/out

# The dashboard's browser tests and benchmark drive Debian's chromium: installed when missing, never downloaded.
$(CHROMIUM):
	$(SUDO) apt-get update
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends chromium

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || \
		{ echo "workerpool needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) --version 2>&1): run make PYTHON=python3.11 (or newer)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@ $(VENV)/.installed

$(VENV)/.installed-bench: requirements.txt bench/requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt -r bench/requirements.txt
	touch $@ $(VENV)/.installed

# The Redis store's tests start their own redis-server: installed when missing.
$(REDIS_SERVER):
	$(SUDO) apt-get update
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends redis-server

# The tests of deploy/nginx.conf (the load balancer of docker-compose.redis.yml) run nginx: installed when missing
# (Debian's package, which also starts the system's nginx where systemd runs: the tests start their own).
$(NGINX):
	$(SUDO) apt-get update
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends nginx

# Redocly's OpenAPI linter, which the tests run (pinned in package.json and package-lock.json; one npm
# package, no browser download). npm comes from Debian when missing.
node_modules/.installed: package.json package-lock.json
	@command -v npm >/dev/null || ($(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends npm)
	npm ci --no-audit --no-fund --loglevel=error
	touch $@
