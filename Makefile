# The two commands a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench schemas clean redis-server chromium shellcheck lcov curl node-sdk release-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The modules setup.py compiles with mypyc: a change to one of them means a rebuild, since
# Python would keep importing the old compiled module in preference to the edited source.
COMPILED := $(shell grep -o '"policy_engine/[^"]*\.py"' setup.py | tr -d '"')

# Reinstall whenever the project metadata or a compiled module changes, so a pulled dependency
# bump is picked up and the compiled decision path is never older than its source.
# POLICY_ENGINE_COMPILE=1: here the build must compile (a user's install falls back to pure Python).
$(STAMP): pyproject.toml setup.py $(COMPILED) | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	POLICY_ENGINE_COMPILE=1 $(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# $(call apt-install,COMMAND,PACKAGE): install Debian's PACKAGE unless COMMAND is on the PATH,
# the way CI's fresh machine can (as root, or through sudo without a password).
apt-install = command -v $(1) >/dev/null 2>&1 || { \
	  echo "installing $(2) (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null) \
	  || (sudo -n apt-get update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null); }

# The Redis tests run a private redis-server.
redis-server:
	@$(call apt-install,redis-server,redis-server)

# The serve client tests call the proxy with curl and with the official TypeScript SDK under node:
# Debian's node and npm, then the SDK at the version tests/ts/package-lock.json pins (again only
# when the lock file changed since the last install).
curl:
	@$(call apt-install,curl,curl)

NODE_STAMP := tests/ts/node_modules/.installed

$(NODE_STAMP): tests/ts/package.json tests/ts/package-lock.json
	@$(call apt-install,node,nodejs npm)
	@$(call apt-install,npm,npm)
	npm ci --prefix tests/ts --no-audit --no-fund
	touch $(NODE_STAMP)

node-sdk: $(NODE_STAMP)

# The HTML report tests open the pages in Debian's headless Chromium (no browser download).
chromium:
	@$(call apt-install,chromium,chromium)

# actionlint checks the example workflow's scripts with shellcheck when it is installed.
shellcheck:
	@$(call apt-install,shellcheck,shellcheck)

# sdist + wheel as a release builds them, each installed into a fresh venv and run from there,
# also built without a C compiler (scripts/check_release.sh).
release-check: $(STAMP)
	PYTHON=$(CURDIR)/$(BIN)/python bash scripts/check_release.sh

# The coverage-format tests read `test --format lcov` back with lcov's own tools.
lcov:
	@$(call apt-install,genhtml,lcov)

# Every test against the compiled build (what installs get), then the decision path's own tests
# against its pure-Python sources (what an install without a C compiler gets): both must agree.
test: $(STAMP) redis-server chromium shellcheck lcov curl node-sdk
	$(BIN)/python -m pytest -q
	POLICY_ENGINE_PURE_PYTHON=1 $(BIN)/python -m pytest -q tests/test_decide.py tests/test_decide_settle.py \
	  tests/test_decide_async_ledger.py tests/test_features.py tests/test_tokens.py tests/test_cost.py tests/test_ledger.py \
	  tests/test_ratelimit.py tests/test_observe.py tests/test_simulate.py tests/test_telemetry.py tests/test_schemas.py
	$(MAKE) --no-print-directory release-check

demo: $(STAMP)
	$(BIN)/python -m policy_engine.demo
	@echo "\n== 4. policy as code: lint, test with coverage, simulate the sample log, explain one request"
	$(BIN)/policy-engine lint policies
	$(BIN)/policy-engine test policies examples/default_test.yaml --coverage
	$(BIN)/policy-engine simulate policies/default.yaml --requests data/requests.jsonl.gz
	$(BIN)/policy-engine explain policies/default.yaml --request examples/request.json --context examples/context.json --state examples/state.yaml

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

schemas: $(STAMP)
	$(BIN)/policy-engine schema --write schemas/

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -path ./.venv -prune -o -name '*.so' -print -delete
