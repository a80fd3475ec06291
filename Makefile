# One-command set-up: `make test` and `make demo` install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.masklab-installed
APT_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev g++
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: setup sysdeps test test-fast lint demo bench study gpu-wheels gpu-check clean

setup: $(STAMP)

# ffcv builds from source and needs these system packages before pip can read it.
sysdeps:
	@if command -v pkg-config >/dev/null && pkg-config --exists opencv4 libturbojpeg && command -v g++ >/dev/null; then \
		echo "system packages for ffcv: present"; \
	else \
		echo "installing system packages for ffcv: $(APT_PACKAGES)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES); \
	fi

$(STAMP): pyproject.toml constraints.txt
	@$(MAKE) --no-print-directory sysdeps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e '.[ffcv,dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# TEST_WORKERS: pytest-xdist processes (one a core here: the suite is mostly single-threaded work, imports,
# numba compiles and subprocesses, so two processes use two cores better than torch's threads in one).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/masklab demo

# Every script in benchmarks/, quick: one report in runs/bench (bench.md, bench.png).
bench: $(STAMP)
	$(VENV)/bin/masklab bench --quick

# Every method against its baseline, 3 seeds (under an hour on 2 cores; not part of the tests).
# STUDY_JOBS: runs trained at once (2 on a 2-core machine uses the cores better than one run on both).
STUDY_JOBS ?= 1
study: $(STAMP)
	$(VENV)/bin/masklab study --curves
	$(VENV)/bin/masklab study --jobs $(STUDY_JOBS) --readme README.md

# The wheels a GPU machine without network lacks (Python 3.12, linux x86_64), into .whl/ to carry along.
# omegaconf 2.4 vendors its antlr4 runtime, so antlr4-python3-runtime is not needed; kornia needs kornia_rs.
GPU_WHEELS := kornia==0.9.0 kornia_rs==0.2.0 torchdata==0.11.0 omegaconf==2.4.0
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl $(GPU_WHEELS)

# The prepared device check (tools/gpu_check.py): device-aware tests, stage benchmarks, training-step timings,
# the study's GPU preset.
# make gpu-check DEVICE=cpu runs it here with tiny sizes. Report: $(OUT)/gpu.md and gpu.json.
DEVICE ?= cuda
OUT ?= runs/gpu-check
# CHECK_ARGS picks steps: "--skip study" (all but the study's GPU preset) or "--only study"; "--deadline S" fits
# the check into S seconds (each step's timeout cut to what is left; steps that no longer fit are left out).
CHECK_ARGS ?=
gpu-check:
	PYTHON=$(PYTHON) OUT=$(OUT) tools/gpu_check.sh --device $(DEVICE) --out $(OUT) $(CHECK_ARGS)

clean:
	rm -rf $(VENV) runs *.egg-info build
