# mmdet-lrpq — the two commands a user needs: `make demo` (main job, offline) and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: install lint test demo clean-venv

MMCV   ?= lite

## install: create .venv with the verified stack. MMCV=lite (default): mmcv-lite, no compiler; the ops
##   detectors need come from torchvision (mmdet_lrpq.ops). MMCV=compiled: build mmcv's C++ ops once
##   (15-20 min on 2 cores; CUDA ops when an nvcc of torch's CUDA version and a GPU are found, force with
##   MMDET_LRPQ_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0). docs/install.md
install:
	@PYTHON=$(PYTHON) VENV=$(CURDIR)/$(VENV) MMDET_LRPQ_MMCV=$(MMCV) bash tools/install.sh

## lint: ruff (lint + format check) and mypy (pure layers and public API), settings in pyproject.toml
LINT_PATHS := mmdet_lrpq tools bench tests _mmdet_lrpq_mmcv.py setup.py
lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

## test: install if needed, then the lint and type gates, then the test suite
test: lint
	$(PY) -m pytest tests

## demo: install if needed, then run the main job on the miniature world (offline)
demo: install
	$(PY) tools/demo.py

clean-venv:
	rm -rf $(VENV)
