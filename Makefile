# Two commands do everything on a fresh machine; each sets up .venv first when needed.
#   make demo   the CPU demo: python -m autoglm_distill (recipe=demo)
#   make demo-vision   the screenshot demo: python -m autoglm_distill recipe=demo_vision
#   make test   the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo demo-vision test setup

setup: $(VENV)/.installed

# constraints.txt: the exact versions the README's figures come from (a newer transformers trains another teacher).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(PY) -m pip install --quiet -c constraints.txt --no-build-isolation "deepspeed==0.19.8"
	touch $@

demo: setup
	$(PY) -m autoglm_distill

demo-vision: setup
	$(PY) -m autoglm_distill recipe=demo_vision

test: setup
	$(PY) -m pytest -q
