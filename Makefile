# Every target creates .venv and installs the project when missing (CPU machines get torch 2.13.0 CPU).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN_DIR ?= runs/default
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: venv train test bench bench-train lint clean-runs

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing the default (CUDA) torch"; \
	else \
		echo "no GPU: installing torch==2.13.0 (CPU build)"; $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The embedded default: a short full-attention stage makes the base checkpoint, then MoBA continual
# pre-training at a longer context continues from it. Run it again to resume (resume=auto).
train: $(STAMP)
	$(PY) -m train experiment=embedded_base hydra.run.dir=$(RUN_DIR)/base $(ARGS)
	$(PY) -m train experiment=embedded_moba hydra.run.dir=$(RUN_DIR)/moba model.name_or_path=$(RUN_DIR)/base/hf $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# GPU: the kernel benchmark (writes its table into BENCHMARKS.md and results/kernels.json).
bench: $(STAMP)
	$(PY) -m train.bench_kernels $(ARGS)

# GPU: the training benchmark, 1B model on long documents, full vs MoBA up to 1M tokens (BENCHMARKS.md and
# results/train.json; ARGS="--points 1048576:512:8@sp2" on the two-GPU machine).
bench-train: $(STAMP)
	$(PY) -m train.bench $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-runs:
	rm -rf runs outputs multirun
