# One command to install and train, one to install and test:
#   make train     sets up .venv, MNIST, then trains (ARGS="--model cnn ..." to pass flags)
#   make test      sets up .venv, MNIST, then runs the test suite (slow tests: make test-all)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_CPU_VERSION ?= 2.13.0
ARGS ?= --model mlp --optimizer adam --optimizer-learning-rate 1e-4

.PHONY: setup train test test-all lint data clean

setup: $(VENV)/.installed data

# Torch first: on a machine without a GPU take the CPU build (never a multi-GB CUDA
# wheel); where nvidia-smi answers, let pip resolve the normal CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch; \
	else \
		$(PY) -m pip install -q "torch==$(TORCH_CPU_VERSION)" \
		|| $(PY) -m pip install -q "torch==$(TORCH_CPU_VERSION)" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PY) -m pip install -q -e ".[mpi,test,tensorboard]"
	@# An MPI library only where the machine has none (a cluster's own MPI is preferred).
	@# MPICH 5's PMI-2 client hangs in MPI_Init under srun --mpi=pmi2 of Debian's SLURM 22.05.
	@if command -v mpiexec >/dev/null 2>&1; then echo "using $$(command -v mpiexec)"; \
	else $(PY) -m pip install -q "mpich>=4,<5"; fi
	touch $@

data: $(VENV)/.installed
	$(PY) -m trainer.data fetch

train: setup
	$(PY) kfac.py $(ARGS)

# Whole modules on up to 4 workers (pytest-xdist): much of a test's time is waiting on its ranks.
PYTEST_WORKERS ?= -n auto --maxprocesses 4 --dist loadfile

test: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_WORKERS)

test-all: setup
	$(PY) -m pytest -q $(PYTEST_WORKERS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) experiments outputs multirun

# A private SLURM on 127.0.0.1 for trying batch jobs on one machine (tests start their own).
slurm-up: $(VENV)/.installed
	.ci/install-slurm
	$(PY) -m launcher.slurm_local start
slurm-down:
	$(PY) -m launcher.slurm_local stop
