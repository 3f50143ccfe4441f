# Quick start:  make demo   (single-host demo, nothing else to install or start)
#               make test   (the whole test suite; needs RabbitMQ at 127.0.0.1:5672, see
#                            README; .ci/run installs and starts what it needs)
#               make lint   (ruff and mypy --strict; .ci/run runs it before the tests)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.base
STAMP := $(VENV)/.installed

.PHONY: demo chat test bench lint dist clean

# the package alone (what `make demo` needs: its runtime dependencies, nothing else)
$(BASE): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $(BASE)

# plus the test and dev tools
$(STAMP): $(BASE)
	$(BIN)/python -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

demo: $(BASE)
	$(BIN)/python -m hybrid_layer.demo

# the Channels tutorial's chat on several uvicorn workers (examples/chat); prints the URL
chat: $(BASE)
	$(BIN)/python -m pip install -q django 'uvicorn[standard]' prometheus_client
	$(BIN)/python examples/chat/run.py $(CHAT_ARGS)

# build the sdist and the wheel, install the wheel into a fresh venv and import it
DIST_VENV ?= build/dist-venv
dist: $(STAMP)
	rm -rf dist $(DIST_VENV)
	$(BIN)/python -m pip install -q build
	$(BIN)/python -m build -q --outdir dist . >/dev/null
	$(PY) -m venv $(DIST_VENV)
	$(DIST_VENV)/bin/python -m pip install -q dist/*.whl
	cd / && $(CURDIR)/$(DIST_VENV)/bin/python -c 'import hybrid_layer, importlib.resources as r; \
	  assert r.files("hybrid_layer").joinpath("py.typed").is_file(); \
	  print("dist ok:", hybrid_layer.__name__, [p.name for p in __import__("pathlib").Path("$(CURDIR)/dist").iterdir()])'

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# channels_rabbitmq (carehare: pamqp<4) cannot share .venv with hybrid_layer (aiormq:
# pamqp>=4): its bench workers run in a second venv; bench.py skips rabbitmq, saying why,
# if that venv could not be set up
RMQ_VENV ?= benchmarks/.venv-rabbitmq
bench: $(STAMP)
	$(BIN)/python -m pip install -q channels_redis
	@test -x $(RMQ_VENV)/bin/python || $(PY) -m venv $(RMQ_VENV) || true
	@$(RMQ_VENV)/bin/python -I -c 'import channels_rabbitmq.core, channels, msgpack' 2>/dev/null \
	  || $(RMQ_VENV)/bin/python -m pip install -q channels_rabbitmq channels msgpack \
	  || echo "make bench: could not set up $(RMQ_VENV); rabbitmq will be skipped" >&2
	$(BIN)/python benchmarks/bench.py --rabbitmq-python $(RMQ_VENV)/bin/python $(BENCH_ARGS)

# the peers' own layer tests (channels 4.3.2, channels_redis 4.3.0) against hybrid_layer,
# single host and broker mode (needs RabbitMQ); see tests/PEER_SUITES.md
.PHONY: peers
peers: $(STAMP)
	$(BIN)/python tests/peers/run_peer_suites.py $(PEERS_ARGS)

# ruff (lint and format) and mypy --strict (pyproject's [tool.mypy]; posix_ipc's types
# come from stubs/, see README "Where stubs/ comes from")
lint: $(STAMP)
	$(BIN)/ruff check hybrid_layer tests benchmarks
	$(BIN)/ruff format --check hybrid_layer
	$(BIN)/mypy hybrid_layer

clean:
	rm -rf $(VENV) build *.egg-info
