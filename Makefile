# Quick start:  make demo   (single-host demo, nothing else to install or start)
#               make test   (the whole test suite; broker tests need RabbitMQ, see README)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m hybrid_layer.demo

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

lint: $(STAMP)
	$(BIN)/ruff check hybrid_layer tests benchmarks
	$(BIN)/ruff format --check hybrid_layer

clean:
	rm -rf $(VENV) build *.egg-info
