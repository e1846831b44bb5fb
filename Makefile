# Every target installs what it needs into .venv first, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench
PROTO_GEN := $(VENV)/proto-gen

.PHONY: run demo default-model test bench bench-train bench-serve bench-load bench-abuse bench-complete bench-startup bench-train-load bench-adapt lint proto proto-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]" --config-settings editable_mode=strict
	touch $@

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,bench]" --config-settings editable_mode=strict
	touch $@

run: $(STAMP)
	$(VENV)/bin/nextchar serve --http-port 8080

demo: $(STAMP)
	$(PY) -m nextchar.core.demo --out demo-out

# Retrain the shipped default model (core/data/default-model.npz, a few minutes) and check that the
# file is bit-identical to the recorded build (nextchar.core.default_model.SHA256). One BLAS thread;
# the environment's OpenBLAS settings are left as they are (the same kernel as the tests'): the
# bytes are the same on the same BLAS kernel only.
default-model: $(STAMP)
	OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 $(PY) -m nextchar.core.default_model --out core/data/default-model.npz

test: $(STAMP)
	$(PY) -m pytest -q

bench: bench-train bench-serve bench-load

# nextchar against PyTorch, 5M characters per cell (~8 min). Both benchmarks run their measured
# processes without this machine's OpenBLAS pin (bench/bench_env.py) and record the kernel that ran;
# the tests keep the pin.
bench-train: $(BENCH_STAMP)
	$(PY) bench/train_bench.py

bench-serve: $(STAMP)
	$(PY) bench/serve_bench.py --web

# 1,000 streaming sessions held for 60 s: zero errors, p50/p99, server memory slope
bench-load: $(STAMP)
	$(PY) bench/load_bench.py

# 100 well-behaved streams beside hostile clients for 60 s: errors, p99, server memory
bench-abuse: $(STAMP)
	$(PY) bench/abuse_bench.py

# Complete: n=3 continuations of up to 12 characters at H=256, in process and over gRPC
bench-complete: $(STAMP)
	$(PY) bench/complete_bench.py

# serving latency and throughput with and without a training job on the same machine
bench-train-load: $(STAMP)
	$(PY) bench/train_load_bench.py

# the command line's start-up: nextchar --help and nextchar predict, 20 fresh processes each
bench-startup: $(STAMP)
	$(PY) bench/startup_bench.py

# static vs adapted bits/char (dynamic evaluation) of the shipped model, in-domain and on this repository;
# then serving with every session adaptive against none (the default model's cell and size)
bench-adapt: $(STAMP)
	$(PY) bench/adapt_bench.py
	$(PY) bench/adapt_memory.py
	$(PY) bench/serve_bench.py --adapt --cell gru --cases 1x1,100x1,100x64

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy core server client cli bench tests
	$(VENV)/bin/lint-imports

proto: $(STAMP)
	rm -rf $(PROTO_GEN) && mkdir -p $(PROTO_GEN)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -Inextchar/proto=proto \
		--python_out=$(PROTO_GEN) --grpc_python_out=$(PROTO_GEN) \
		--mypy_out=$(PROTO_GEN) --mypy_grpc_out=$(PROTO_GEN) proto/nextchar.proto
	cp $(PROTO_GEN)/nextchar/proto/* proto/
	$(PY) -m nextchar.server.httpapi.openapi > server/httpapi/openapi.json  # its schemas are the proto's

# CI: the committed stubs and OpenAPI document must be what `make proto` generates.
proto-check: proto
	git diff --exit-code -- proto/ server/httpapi/openapi.json

clean:
	rm -rf $(VENV) build *.egg-info demo-out
