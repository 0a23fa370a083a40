# mmdet-lrpq — the two commands a user needs: `make demo` (main job, offline) and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: install test demo clean-venv

## install: create .venv with the verified stack (mmcv built once from source, then cached).
##   mmcv's ops get CUDA when an nvcc of torch's CUDA version and a GPU are found; force with
##   `make install MMDET_LRPQ_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0`, refuse with MMDET_LRPQ_CUDA=0 (docs/install.md)
install:
	@PYTHON=$(PYTHON) VENV=$(CURDIR)/$(VENV) bash tools/install.sh

## test: install if needed, then run the test suite
test: install
	$(PY) -m pytest tests

## demo: install if needed, then run the main job on the miniature world (offline)
demo: install
	$(PY) tools/demo.py

clean-venv:
	rm -rf $(VENV)
