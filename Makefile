# hangout developer entry points.  `make test` works on a fresh Debian 12 box
# that only has Python 3.11: it installs PostgreSQL + Redis binaries if needed,
# builds .venv, starts the embedded dev stack (server/devstack/) and runs pytest:
# once straight against PostgreSQL, once more through PgBouncer; then the
# TypeScript SDK's tests (clients/ts) under Node, and the browser demo in Chromium.

SHELL := /bin/bash

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT    := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get

PYTEST_ARGS   ?=
LOADTEST_ARGS ?=

.PHONY: all install system-deps venv devstack run test test-direct test-pgbouncer test-cluster test-ts node demo chromium test-browser test-topology loadtest stop status lock

all: test

install: system-deps venv

# PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup), redis-server
# and pgbouncer. Only the binaries are used: the dev stack runs its own
# servers on DEVSTACK_PORT (default 25432..25435), never the system ones.
system-deps:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	    || ! ls /usr/lib/postgresql/*/bin/pg_basebackup >/dev/null 2>&1 \
	    || ! command -v redis-server >/dev/null 2>&1 \
	    || ! { command -v pgbouncer || test -x /usr/sbin/pgbouncer; } >/dev/null 2>&1; then \
		echo ">> installing postgresql + redis-server + pgbouncer"; \
		$(APT) update && $(APT) install -y postgresql redis-server pgbouncer; \
	fi

venv: $(STAMP)

$(PY):
	@test -n "$(PYTHON)" || { echo "python3 not found" >&2; exit 1; }
	@$(PYTHON) -m venv $(VENV) || { \
		echo ">> venv failed; installing python3-venv"; rm -rf $(VENV); \
		$(APT) update && $(APT) install -y python3-venv && $(PYTHON) -m venv $(VENV); }

# Reinstall only when pyproject.toml or the pins are newer than the stamp.
# constraints.txt pins every package to the version the suite last passed with.
$(STAMP): $(wildcard pyproject.toml constraints.txt) | $(PY)
	@if [ -f pyproject.toml ]; then \
		$(PY) -m pip install --disable-pip-version-check -c constraints.txt -e '.[dev]' && touch $(STAMP); \
	else \
		echo ">> no pyproject.toml yet: skipping pip install"; \
	fi

# Re-pin: the newest releases that pyproject.toml's ranges allow, resolved in
# a scratch venv, written to constraints.txt (then `make test` and commit).
lock:
	@test -n "$(PYTHON)" || { echo "python3 not found" >&2; exit 1; }
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	{ sed -n '/^#/p' constraints.txt; .lock-venv/bin/python -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .lock-venv

devstack: install
	$(PY) -m server.devstack start

# Log lines as plain text for a terminal (production's default is JSON).
run: install demo
	LOG_FORMAT=$${LOG_FORMAT:-text} $(PY) -m server

test: test-direct test-pgbouncer test-cluster test-ts test-browser

test-direct: devstack
	DEVSTACK_PGBOUNCER=0 $(PY) -m pytest -q $(PYTEST_ARGS)

# The same suite with the servers behind PgBouncer in transaction mode (the
# same stack, PgBouncer on DEVSTACK_PORT+3). The search-plan test never goes
# through PgBouncer (it plans queries in a scratch database on the primary),
# so it runs in the first pass only.
test-pgbouncer: devstack
	DEVSTACK_PGBOUNCER=1 SKIP_EXPLAIN=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# The chat, fan-out, user-event, relay, presence, push and auth tests on a Redis
# Cluster: the dev stack's three masters on DEVSTACK_PORT+10..12 (buses on
# +20..22), with sharded pub/sub. Tests that look into Redis themselves find
# its keys and channels as the cluster places them (tests/conftest.py).
CLUSTER_TESTS ?= tests/test_chat.py tests/test_fanout.py tests/test_user_events.py tests/test_event_relay.py \
	tests/test_presence.py tests/test_push.py tests/test_auth.py tests/test_redis_cluster.py

test-cluster: install
	DEVSTACK_REDIS_CLUSTER=1 $(PY) -m server.devstack start
	DEVSTACK_REDIS_CLUSTER=1 DEVSTACK_PGBOUNCER=0 $(PY) -m pytest -q $(PYTEST_ARGS) $(CLUSTER_TESTS)

node:
	@command -v npm >/dev/null || { echo ">> installing nodejs + npm"; $(APT) update && $(APT) install -y nodejs npm; }

# The TypeScript SDK (clients/ts): `npm ci` from its lockfile, then its
# tests under Node 20, which start their own server processes on the dev stack.
test-ts: devstack node
	cd clients/ts && npm ci --no-audit --no-fund && PYTHON=$(abspath $(PY)) npm test

# The browser demo (clients/ts/demo, on the SDK's sources), built into
# clients/ts/demo/dist (not committed), which the server serves at GET /demo.
# `npm ci` runs when the lockfile is newer than the last install.
demo: node
	@[ clients/ts/node_modules/.package-lock.json -nt clients/ts/package-lock.json ] \
		|| (cd clients/ts && npm ci --no-audit --no-fund)
	cd clients/ts && npm run build:demo

# Debian's Chromium, for the browser test (playwright-core drives it).
chromium:
	@if ! command -v chromium >/dev/null 2>&1; then \
		echo ">> installing chromium"; \
		$(APT) update && $(APT) install -y chromium; \
	fi

# The demo in Chromium: a host and a booker sign up, book and chat, on two
# server processes the test starts on the dev stack. Screenshots of each
# step: clients/ts/test-artifacts/demo/.
test-browser: devstack demo chromium
	cd clients/ts && PYTHON=$(abspath $(PY)) CHROMIUM=$$(command -v chromium) npm run test:browser

# The multi-host topology (deploy/topology/): hosts as network namespaces,
# nginx in front of 3 hosts x 2 server processes, PgBouncer, a primary with
# 2 replicas, Redis; server hosts lost under load. Root only (it makes
# namespaces, links and a bridge on 10.77.0.0/24, all removed at the end);
# apt-installs iproute2, Debian's nginx and openssl (nginx's self-signed
# certificate) when missing. Logs of the last run:
# /tmp/hangout-topology-logs. Not part of `make test`.
test-topology: install
	@[ "$$(id -u)" = 0 ] || { echo "test-topology needs root (ip netns)" >&2; exit 1; }
	@command -v ip >/dev/null || { $(APT) update && $(APT) install -y iproute2; }
	@command -v openssl >/dev/null || { $(APT) update && $(APT) install -y openssl; }
	@{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null 2>&1 \
		|| { echo ">> installing nginx"; $(APT) update && $(APT) install -y nginx; }
	trap '$(PY) -m deploy.topology down' EXIT; HANGOUT_TOPOLOGY=1 $(PY) -m pytest -q -s tests/test_topology.py $(PYTEST_ARGS)

# Mixed locust load (loadtests/locustfile.py) against a local WORKERS=2 server
# on the dev stack: LOADTEST_USERS (500), LOADTEST_TIME (60s), LOADTEST_RATE (25);
# LOADTEST_SHAPE=ramp|storm for a load shape instead of the flat load (loadtests/shapes.py);
# LOADTEST_HOST=https://... targets a deployment instead. Reports: loadtests/reports/.
loadtest: install
	$(PY) -m loadtests.run_locust $(LOADTEST_ARGS)

# Before the first `make install` there is no dev stack to show or stop.
status:
	@if [ -x $(PY) ]; then $(PY) -m server.devstack status; else echo "not installed yet: make install"; exit 1; fi

stop:
	@if [ -x $(PY) ]; then $(PY) -m server.devstack stop; else echo "not installed: nothing to stop"; fi
