# The two commands a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench schemas clean redis-server

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever the project metadata changes, so a pulled dependency bump is picked up.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# The Redis tests run a private redis-server; install it the way CI's fresh machine can.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	  || (sudo -n apt-get update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null); }

test: $(STAMP) redis-server
	$(BIN)/python -m pytest -q

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
