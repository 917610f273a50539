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

# The demo reads the MNI152 template from ../shared/data/afids-mni152 when present, else
# from the autoafids wheel (installed without dependencies: only its data files are used).
demo: install
	@test -d ../shared/data/afids-mni152 || \
		$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('autoafids') is None)" || \
		$(PIP) install --no-deps "autoafids==0.1.4"
	$(PY) -m fastlmk.demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check python tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf build $(VENV) demo_out
