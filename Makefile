# The two set-up commands of the README: `make demo` (main job, embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= offline
export RAY_DEDUP_LOGS ?= 0

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml infra/setup.sh infra/lock-cpu.txt infra/lock-cuda.txt
	VENV=$(VENV) bash infra/setup.sh
	touch $@

setup: $(VENV)/.installed

demo: setup  ## EOSTok tiny preset on the embedded real photos: checkpoint, metrics, PNG grid under runs/
	$(PY) jobs/eostok_h.py --config configs/experiments/eostok_tiny.yaml $(ARGS)

test: setup  ## the whole CPU test suite (GPU tests are skipped without CUDA)
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: setup
	$(PY) bench/data_throughput.py && $(PY) bench/sampling.py && $(PY) bench/train_overhead.py && $(PY) bench/eval_throughput.py

clean:
	rm -rf runs .pytest_cache
