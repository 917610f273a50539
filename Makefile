# fastlmk — the two user commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.fastlmk-installed

.PHONY: setup install demo test lint bench clean

setup: $(VENV)/bin/python

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# torch is pinned to the CPU build; an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): $(VENV)/bin/python pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu)
	$(PIP) install "torch==2.13.0"
	$(PIP) install "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.18" ninja
	$(PIP) install --no-build-isolation -e ".[onnx,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m fastlmk.demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check python tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf build $(VENV) demo_out
