"""`pytest --nbmake lessons` (and `make test`) run every lesson top to bottom in fast mode: fewer steps
and samples, the same check cells. `make lessons` runs them in full mode instead."""
import os

os.environ.setdefault("DDPMKIT_LESSONS_FAST", "1")  # the notebooks' kernels inherit it
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one kernel per core beside the other workers, as tests/conftest.py does
