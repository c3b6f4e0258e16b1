# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use and (re)installs when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mealkd-installed

.PHONY: demo test install clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[test,demo]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) cli.py demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

# The GPU check (benchmarks/gpu_check.py, docs/benchmarks.md "GPU check"): `make gpu-check` with this
# venv; GPU_CHECK_ARGS="--device cpu --quick" for the CPU smoke run. On a GPU host whose Python already
# has torch, DALI and zarr (and no package index): `make gpu-check GPU_PY=python3` (no venv, no install).
GPU_PY ?= $(PY)
.PHONY: gpu-check
gpu-check: $(if $(filter $(PY),$(GPU_PY)),$(STAMP))
	PYTHONPATH=. $(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
