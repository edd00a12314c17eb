# Two commands: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel; a GPU user runs `make TORCH_PIN= demo` after installing their CUDA/ROCm torch build
# into .venv (or lets pip pick one: pyproject asks torch>=2.4); an empty TORCH_PIN installs no torch here.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint install bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_PIN),$(PY) -m pip install -q "$(TORCH_PIN)")
	$(PY) -m pip install -q -e ".[test,text,web,diffusers]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ddpmkit demo

test: $(STAMP)
	$(VENV)/bin/ruff check .  # the lint rules in pyproject's [tool.ruff]
	$(PY) -m pytest -q -n auto --dist loadgroup --durations=15 tests  # one worker per core (pytest-xdist), one thread each

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/digits_quality.py

clean:
	rm -rf runs .pytest_cache
